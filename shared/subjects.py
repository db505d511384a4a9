"""Subject names of the pipeline: the only place a subject string is spelled out.

Subjects are ``<prefix>.<noun>.<past-verb>``; the default prefix is ``tuneloop``. A
:class:`Namespace` applies a prefix so that tests (and several installations on one
broker) never see each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "tuneloop"

# Suffixes below a namespace's prefix.
DATASET_SUBMITTED = "dataset.submitted"
DATASET_READY = "dataset.ready"
DATASET_REJECTED = "dataset.rejected"
TRAINING_DONE = "adapter.trained"
TRAINING_FAILED = "training.failed"
ADAPTER_QUANTIZED = "adapter.quantized"
QUANTIZATION_FAILED = "quantization.failed"
MODEL_DEPLOYED = "model.deployed"
DEPLOYMENT_FAILED = "deployment.failed"
DEPLOYMENT_RETIRED = "model.retired"
EVALUATION_COMPLETED = "evaluation.completed"
EVALUATION_FAILED = "evaluation.failed"
ROLLOUT_CHANGED = "rollout.changed"

# Dead letters live in their own subject space and stream: "<prefix>-dlq.<suffix>".
DEAD_LETTER_SUFFIX = "-dlq"


@dataclass(frozen=True)
class Namespace:
    """A prefix for subjects and stream names."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or not all(c.isalnum() or c in "-_" for c in self.prefix):
            raise ValueError(f"subject prefix {self.prefix!r} must be [A-Za-z0-9_-]+")

    def subject(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def dead_letter(self, suffix: str) -> str:
        return f"{self.prefix}{DEAD_LETTER_SUFFIX}.{suffix}"

    @property
    def stream(self) -> str:
        """The one JetStream stream holding every pipeline event."""
        return self.prefix.upper().replace("-", "_")

    @property
    def dead_letter_stream(self) -> str:
        return f"{self.stream}_DLQ"

    @property
    def all_subjects(self) -> str:
        return f"{self.prefix}.>"

    @property
    def all_dead_letters(self) -> str:
        return f"{self.prefix}{DEAD_LETTER_SUFFIX}.>"
