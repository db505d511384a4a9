"""Gateway settings (``GATEWAY_*`` environment variables), validated at start-up."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    http_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("GATEWAY_HTTP_HOST", "TUNELOOP_HTTP_HOST"),
    )
    http_port: int = Field(default=8080, ge=0, le=65535)

    # ---- limits
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="413 above this")
    max_json_depth: int = Field(default=32, ge=4, description="400 above this nesting")
    upstream_timeout_s: float = Field(default=120.0, gt=0, description="504 past this deadline")
    upstream_connect_timeout_s: float = Field(default=3.0, gt=0)
    # Streams: the longest silence between two chunks before the stream is ended with an error.
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    upstream_pool_size: int = Field(
        default=256, ge=1, description="keep-alive connections/upstream"
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After on 503")
    # Context check: a prompt of more than this many characters per context token is refused
    # before any upstream call (a lower bound on tokens; the upstream checks exactly).
    chars_per_token_bound: float = Field(default=8.0, gt=0)
    default_max_context_tokens: int | None = Field(default=None, ge=1)

    # ---- circuit breaker
    breaker_failures: int = Field(default=5, ge=1, description="consecutive failures to open")
    breaker_cooldown_s: float = Field(default=5.0, gt=0)

    # ---- rollout
    canary_steps: Annotated[list[float], NoDecode] = Field(default=[0.10, 0.25, 0.50, 1.0])
    step_min_requests: int = Field(default=200, ge=1)
    step_min_seconds: float = Field(default=300.0, ge=0)
    # SLO relative to stable: error rate may exceed stable's by at most this much...
    slo_max_error_rate_increase: float = Field(default=0.02, ge=0, le=1)
    # ...and p95 latency may be at most ratio x stable's p95 + slack.
    slo_max_p95_ratio: float = Field(default=1.5, ge=1)
    slo_p95_slack_ms: float = Field(default=50.0, ge=0)
    # Fewest canary outcomes before the SLO is judged (errors and latency).
    slo_min_samples: int = Field(default=20, ge=1)
    # The canary's p95 counts as above the limit only when its lower confidence bound is:
    # higher = fewer false rollbacks from a few slow requests, slower to catch a real one.
    slo_latency_confidence: float = Field(default=0.99, ge=0.5, le=0.9999)
    stats_window: int = Field(default=2000, ge=10, description="latency samples kept")
    control_interval_s: float = Field(default=0.5, gt=0)
    # How often each replica re-reads routes and keys from the DB (replica convergence).
    sync_interval_s: float = Field(default=1.0, gt=0)

    # ---- capture
    enable_data_collection: bool = Field(
        default=True,
        validation_alias=AliasChoices("GATEWAY_ENABLE_DATA_COLLECTION", "ENABLE_DATA_COLLECTION"),
    )
    capture_queue_size: int = Field(default=10_000, ge=1)
    capture_batch_size: int = Field(default=100, ge=1)
    capture_flush_s: float = Field(default=0.2, gt=0)
    capture_max_text_chars: int = Field(default=200_000, ge=1000)

    # ---- keys
    default_rpm: int | None = Field(default=None, ge=1, description="requests/min per key")
    default_tpm: int | None = Field(default=None, ge=1, description="tokens/min per key")
    # Dev mode: create a client key at start (printed once) when none exists.
    dev_client_key: bool = True
    # Share of model requests recorded as OpenTelemetry spans (trace ids are always propagated).
    trace_sample_ratio: float = Field(default=0.01, ge=0, le=1)
    # On shutdown, requests in flight (long streams too) get this long to finish before they
    # are cancelled; capture is drained after them. Keep it under the orchestrator's grace
    # period (k8s terminationGracePeriodSeconds).
    shutdown_grace_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("canary_steps", mode="before")
    @classmethod
    def _steps(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(v) for v in value.replace(" ", "").split(",") if v]
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> GatewaySettings:
        steps = self.canary_steps
        if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("canary_steps must be increasing fractions in (0, 1]")
        if steps[-1] != 1.0:
            self.canary_steps = [*steps, 1.0]
        return self
