"""Event contracts of the pipeline.

One frozen pydantic model per event, past-tense names, ``extra="forbid"``. Every event
carries the envelope (``event_id``, ``schema_version``, ``occurred_at``, ``run_id``,
``producer``) and, where it points at something heavy, an :class:`ArtifactRef`.

A run is one dataset version travelling through the services; its ``run_id`` is set
by ingest and copied onto every event that follows from it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from shared import subjects

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"

Stage = Literal["ingest", "trainer", "quantizer", "inference", "evaluator", "gateway"]
TrainingMethod = Literal["dora", "qdora", "lora", "qlora"]
ModelFormat = Literal["awq-w4a16", "gptq-w4a16", "gguf-q4_k_m", "bf16-merged", "adapter"]
Engine = Literal["vllm", "vllm-cpu", "llama-cpp"]
Origin = Literal["upload", "harvest"]


E = TypeVar("E", bound="Event")


def new_run_id() -> str:
    """A fresh run id (one per dataset version entering the pipeline)."""
    return f"run-{uuid4().hex[:16]}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ArtifactRef(_Frozen):
    """A pointer to bytes in the artifact store, verified on download."""

    uri: str = Field(min_length=1, max_length=2048, pattern=r"^(file|gs)://")
    sha256: str = Field(pattern=SHA256_RE.pattern)
    size_bytes: int = Field(ge=0)


class Event(_Frozen):
    """Envelope shared by every event. Subclasses set ``subject`` and ``stage``."""

    subject: ClassVar[str]
    stage: ClassVar[Stage]

    event_id: UUID = Field(default_factory=uuid4)
    schema_version: int = Field(default=1, ge=1)
    occurred_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    run_id: str = Field(pattern=_ID)
    producer: str = Field(min_length=1, max_length=100)
    # The event this one was caused by, for lineage (None for the first of a run).
    causation_id: UUID | None = None

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @property
    def msg_id(self) -> str:
        """The JetStream ``Nats-Msg-Id``: a republish of the same event is deduplicated."""
        return str(self.event_id)

    def follow(self, event_type: type[E], **fields: Any) -> E:
        """Build the next event of the same run, caused by this one."""
        fields.setdefault("run_id", self.run_id)
        fields.setdefault("causation_id", self.event_id)
        return event_type(**fields)


class StageFailed(Event):
    """Base of every stage's failure event."""

    reason: str = Field(min_length=1, max_length=8000)
    retryable: bool = False
    failed_event_id: UUID | None = None


# ---------------------------------------------------------------- ingest


class TrainingSpec(_Frozen):
    """How to train on one dataset version, set by whoever asks for the run.

    Unset fields fall back to the trainer's settings (``TRAINER_PROFILE``, ``TRAINER_METHOD``,
    ``TRAINER_BASE_MODEL``, ``TRAINER_OVERRIDES``); ``overrides`` are applied over the profile
    exactly like ``TRAINER_OVERRIDES`` (per-event keys win). The trainer validates the result
    and refuses an invalid or forbidden one with ``TrainingFailed``; the spec is part of the
    resolved config, so a different spec on the same dataset trains a different adapter.
    """

    profile: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")
    method: TrainingMethod | None = None
    base_model: str | None = Field(default=None, min_length=1, max_length=500)
    overrides: dict[str, bool | int | float | str | list[str] | None] = Field(
        default_factory=dict, max_length=64
    )


class DatasetSubmitted(Event):
    """Command-style event: files already in the artifact store, to be ingested."""

    subject = subjects.DATASET_SUBMITTED
    stage = "ingest"

    dataset_name: str = Field(pattern=_ID)
    files: list[str] = Field(min_length=1, max_length=1000)
    format: Literal["auto", "alpaca", "openai", "sharegpt"] = "auto"
    domain: str | None = Field(default=None, max_length=200)
    # Passed on unchanged to the DatasetReady this produces.
    training: TrainingSpec | None = None

    @field_validator("files")
    @classmethod
    def _uris(cls, files: list[str]) -> list[str]:
        for uri in files:
            if not uri.startswith(("file://", "gs://")):
                raise ValueError(f"file {uri!r} must be a file:// or gs:// URI")
        return files


class SplitCounts(_Frozen):
    train: int = Field(ge=0)
    validation: int = Field(ge=0)


class DatasetReady(Event):
    subject = subjects.DATASET_READY
    stage = "ingest"

    dataset_id: str = Field(pattern=_ID)
    dataset_name: str = Field(pattern=_ID)
    origin: Origin = "upload"
    previous_dataset_id: str | None = None
    train: ArtifactRef
    validation: ArtifactRef
    report: ArtifactRef
    curriculum: dict[str, ArtifactRef] = Field(default_factory=dict)
    counts: SplitCounts
    counts_by_category: dict[str, int] = Field(default_factory=dict)
    counts_by_source: dict[str, int] = Field(default_factory=dict)
    # Per-run training settings (None: the trainer's own settings). Re-publishing a
    # DatasetReady with another spec retrains the same data differently.
    training: TrainingSpec | None = None


class DatasetRejected(StageFailed):
    subject = subjects.DATASET_REJECTED
    stage = "ingest"

    dataset_name: str | None = None
    report: ArtifactRef | None = None


# ---------------------------------------------------------------- trainer


class PhaseMetrics(_Frozen):
    phase: str = Field(min_length=1, max_length=50)
    steps: int = Field(ge=0)
    final_loss: float | None = None
    seconds: float = Field(ge=0)
    tokens_per_second: float | None = Field(default=None, ge=0)


class TrainingDone(Event):
    subject = subjects.TRAINING_DONE
    stage = "trainer"

    adapter_id: str = Field(pattern=_ID)
    dataset_id: str = Field(pattern=_ID)
    base_model: str = Field(min_length=1, max_length=500)
    method: TrainingMethod
    hyperparameters_hash: str = Field(min_length=8, max_length=64)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    adapter: ArtifactRef
    phases: list[PhaseMetrics] = Field(default_factory=list)
    tokens_per_second: float | None = Field(default=None, ge=0)
    # The dataset's validation split, passed on for the perplexity gate and benchmarks.
    validation: ArtifactRef | None = None


class TrainingFailed(StageFailed):
    subject = subjects.TRAINING_FAILED
    stage = "trainer"

    dataset_id: str | None = None


# ---------------------------------------------------------------- quantizer


class AdapterQuantized(Event):
    subject = subjects.ADAPTER_QUANTIZED
    stage = "quantizer"

    model_id: str = Field(pattern=_ID)
    adapter_id: str = Field(pattern=_ID)
    dataset_id: str | None = None
    base_model: str = Field(min_length=1, max_length=500)
    format: ModelFormat
    artifact: ArtifactRef
    perplexity_before: float | None = Field(default=None, ge=0)
    perplexity_after: float | None = Field(default=None, ge=0)
    validation: ArtifactRef | None = None


class QuantizationFailed(StageFailed):
    subject = subjects.QUANTIZATION_FAILED
    stage = "quantizer"

    adapter_id: str | None = None
    format: ModelFormat | None = None


# ---------------------------------------------------------------- inference


class ModelDeployed(Event):
    subject = subjects.MODEL_DEPLOYED
    stage = "inference"

    deployment_id: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_ID)
    engine: Engine
    endpoint: str = Field(pattern=r"^https?://", max_length=2048)
    served_model_name: str = Field(min_length=1, max_length=200)
    format: ModelFormat = "bf16-merged"
    # "baseline" deployments (the base model) are what new ones are compared against.
    role: Literal["candidate", "baseline"] = "candidate"
    dataset_id: str | None = None
    validation: ArtifactRef | None = None


class DeploymentRetired(Event):
    """Inference stopped serving a deployment and released its engine; routes to it go."""

    subject = subjects.DEPLOYMENT_RETIRED
    stage = "inference"

    deployment_id: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_ID)
    served_model_name: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=4000)


class DeploymentFailed(StageFailed):
    subject = subjects.DEPLOYMENT_FAILED
    stage = "inference"

    model_id: str | None = None


# ---------------------------------------------------------------- evaluator


class LatencyPercentiles(_Frozen):
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)


class BaselineComparison(_Frozen):
    deployment_id: str = Field(pattern=_ID)
    overall_score: float
    category_scores: dict[str, float] = Field(default_factory=dict)
    latency: LatencyPercentiles | None = None


class EvaluationCompleted(Event):
    subject = subjects.EVALUATION_COMPLETED
    stage = "evaluator"

    deployment_id: str = Field(pattern=_ID)
    model_id: str = Field(pattern=_ID)
    served_model_name: str = Field(min_length=1, max_length=200)
    benchmark: str = Field(min_length=1, max_length=200)
    passed: bool
    overall_score: float
    category_scores: dict[str, float] = Field(default_factory=dict)
    latency: LatencyPercentiles
    baseline: BaselineComparison | None = None
    reasons: list[str] = Field(default_factory=list)
    report: ArtifactRef | None = None


class EvaluationFailed(StageFailed):
    subject = subjects.EVALUATION_FAILED
    stage = "evaluator"

    deployment_id: str | None = None


# ---------------------------------------------------------------- gateway


class RolloutChanged(Event):
    """The gateway moved traffic: a canary started, advanced, was promoted or rolled back."""

    subject = subjects.ROLLOUT_CHANGED
    stage = "gateway"

    served_model_name: str = Field(min_length=1, max_length=200)
    deployment_id: str = Field(pattern=_ID)
    action: Literal["canary_started", "advanced", "promoted", "rolled_back", "refused"]
    weight: float = Field(ge=0, le=1)
    reason: str = Field(default="", max_length=4000)
    metrics: dict[str, float] = Field(default_factory=dict)


EVENT_TYPES: tuple[type[Event], ...] = (
    DatasetSubmitted,
    DatasetReady,
    DatasetRejected,
    TrainingDone,
    TrainingFailed,
    AdapterQuantized,
    QuantizationFailed,
    ModelDeployed,
    DeploymentRetired,
    DeploymentFailed,
    EvaluationCompleted,
    EvaluationFailed,
    RolloutChanged,
)
EVENT_BY_SUBJECT: dict[str, type[Event]] = {t.subject: t for t in EVENT_TYPES}
