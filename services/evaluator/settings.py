"""Evaluator settings (``EVALUATOR_*`` environment variables), validated at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.evaluator.gate import GateSettings
from services.evaluator.runner import RunOptions

BENCHMARKS_DIR = Path(__file__).parent / "benchmarks"


class EvaluatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVALUATOR_", extra="ignore")

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8085, ge=0, le=65535)

    # ---- what to run
    benchmark: Path = Field(
        default=BENCHMARKS_DIR / "demotask.json", description="Benchmark file (JSON or JSONL)"
    )
    # When a ModelDeployed carries the dataset's validation split, benchmark on it instead
    # (similarity-scored, held out from training).
    use_validation_split: bool = False
    similarity_threshold: float = Field(default=0.7, ge=-1, le=1)
    max_items: int = Field(default=0, ge=0, description="0 = every item; else a seeded sample")
    sample_seed: int = 0
    # Run the benchmark on a baseline deployment as soon as it is deployed, so the first
    # candidate finds the comparison cached.
    warm_baseline: bool = True

    # ---- how to ask
    concurrency: int = Field(default=8, ge=1, le=512)
    request_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)
    max_tokens: int = Field(default=128, ge=1, le=32_768)
    temperature: float = Field(default=0.0, ge=0, le=2)
    seed: int = 0
    max_response_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_output_chars: int = Field(default=20_000, ge=100)
    abort_after_consecutive_failures: int = Field(default=8, ge=1)
    unreachable_fraction: float = Field(default=0.5, gt=0, le=1)
    endpoint_api_key: SecretStr | None = None

    # ---- judge (optional): any OpenAI-compatible endpoint
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_api_key: SecretStr | None = None

    # ---- the gate
    gate_min_overall: float = Field(default=0.80, ge=0, le=1)
    gate_min_category: float = Field(default=0.70, ge=0, le=1)
    gate_max_mean_latency_ms: float | None = Field(default=2000.0, gt=0)
    gate_max_p95_latency_ms: float | None = Field(default=None, gt=0)
    gate_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    gate_max_regression: float = Field(default=0.02, ge=0, le=1)
    gate_max_category_regression: float = Field(default=0.05, ge=0, le=1)
    gate_require_baseline: bool = False

    # ---- bus
    ack_wait_s: float = Field(default=60.0, gt=0)

    def gate(self) -> GateSettings:
        return GateSettings(
            min_overall=self.gate_min_overall,
            min_category=self.gate_min_category,
            max_mean_latency_ms=self.gate_max_mean_latency_ms,
            max_p95_latency_ms=self.gate_max_p95_latency_ms,
            max_error_rate=self.gate_max_error_rate,
            max_regression=self.gate_max_regression,
            max_category_regression=self.gate_max_category_regression,
            require_baseline=self.gate_require_baseline,
        )

    def run_options(self) -> RunOptions:
        return RunOptions(
            concurrency=self.concurrency,
            retries=self.retries,
            retry_backoff_s=self.retry_backoff_s,
            max_tokens=self.max_tokens,
            max_output_chars=self.max_output_chars,
            abort_after_consecutive_failures=self.abort_after_consecutive_failures,
            unreachable_fraction=self.unreachable_fraction,
        )
