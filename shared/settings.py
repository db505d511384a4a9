"""Settings every service shares, read from ``TUNELOOP_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.bus import BusSettings

DEV_ADMIN_KEY = "tl-dev-admin-key"


class CommonSettings(BaseSettings):
    """Where the broker, database and artifact store are. Validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_", extra="ignore")

    home: Path = Field(default=Path(".tuneloop"), description="Run directory (logs, spans, data)")
    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = "tuneloop"
    database_url: str = Field(
        default="",
        validation_alias="DATABASE_URL",
        description="SQLAlchemy URL; empty = SQLite file under home",
    )
    artifact_store_url: str = Field(default="", description="file:///dir or gs://bucket/prefix")
    dev_mode: bool = True
    admin_key: SecretStr = SecretStr(DEV_ADMIN_KEY)
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=5, ge=1)
    duplicate_window_s: float = Field(default=3600.0, gt=0)
    stream_replicas: int = Field(default=1, ge=1, le=5, description="3 on a NATS cluster")
    http_host: str = Field(default="127.0.0.1", description="0.0.0.0 in containers")

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> CommonSettings:
        if not self.dev_mode and self.admin_key.get_secret_value() == DEV_ADMIN_KEY:
            raise ValueError(
                "TUNELOOP_ADMIN_KEY is the development default: set a secret or "
                "TUNELOOP_DEV_MODE=true"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.home / 'tuneloop.db').resolve()}"

    @property
    def resolved_artifact_store_url(self) -> str:
        return self.artifact_store_url or (self.home / "artifacts").resolve().as_uri()

    def bus_settings(self) -> BusSettings:
        return BusSettings(
            nats_url=self.nats_url,
            prefix=self.subject_prefix,
            ack_wait_s=self.ack_wait_s,
            max_deliver=self.max_deliver,
            duplicate_window_s=self.duplicate_window_s,
            stream_replicas=self.stream_replicas,
        )
