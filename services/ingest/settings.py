"""Ingest settings (env prefix ``INGEST_``): validation bounds, PII, dedupe, split, curriculum,
upload limits and the harvester. The processing part is :class:`ProcessingConfig`, which is
hashed into every dataset version (change it and the same records make a new version)."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProcessingConfig(BaseModel):
    """Everything that decides what a dataset version contains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # FinRisk's defaults: prompt 50-30,000 chars, answer 100-30,000 chars.
    min_input_chars: int = Field(default=50, ge=0)
    max_input_chars: int = Field(default=30_000, ge=1)
    min_output_chars: int = Field(default=100, ge=0)
    max_output_chars: int = Field(default=30_000, ge=1)
    # The trainer reads at most 256 messages a record.
    max_turns: int = Field(default=256, ge=2, le=256)
    reject_error_text: bool = True
    scrub_pii: bool = True
    near_dedupe: bool = True
    near_threshold: float = Field(default=0.8, gt=0, le=1)
    num_perm: int = Field(default=128, ge=16, le=512)
    shingle_words: int = Field(default=3, ge=1, le=8)
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    split_seed: int = 42
    curriculum_seed: int = 42
    # Records per curriculum phase; None = the train split's size (A, B) or 10% of it (C).
    target_records: dict[str, int] = Field(default_factory=dict)
    # Phase B domain weights. Without them a domain's weight is its size ** temperature
    # (0.5: a domain ten times larger gets about three times the share, so none dominates).
    domain_weights: dict[str, float] = Field(default_factory=dict)
    domain_temperature: float = Field(default=0.5, ge=0, le=1)
    stress_fraction: float = Field(default=0.1, gt=0, le=1)
    # The gap the report measures ("950 of 1,200").
    target_count: int | None = Field(default=None, ge=1)
    short_output_chars: int = Field(default=200, ge=0)
    long_output_chars: int = Field(default=8_000, ge=1)

    def digest_input(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    def with_overrides(self, overrides: dict[str, Any] | None) -> ProcessingConfig:
        if not overrides:
            return self
        return ProcessingConfig.model_validate({**self.model_dump(), **overrides})


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INGEST_", extra="ignore", populate_by_name=True, env_nested_delimiter="__"
    )

    http_host: str = Field(
        default="127.0.0.1", validation_alias=AliasChoices("INGEST_HTTP_HOST", "TUNELOOP_HTTP_HOST")
    )
    http_port: int = Field(default=0, ge=0, le=65535)
    # file:// inputs of a DatasetSubmitted must lie under one of these (besides the store).
    import_dirs: list[str] = Field(default_factory=list)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    default_dataset_name: str = "main"
    # HTTP upload: the whole request body, streamed to disk while counted.
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    work_dir: str = ""
    # Worker processes for parse/validate/scrub/sketch; 0 = one per CPU, 1 = in-process.
    workers: int = Field(default=0, ge=0)
    # Harvester (FinRisk: DATA_COLLECTION_QUALITY=0.9, MIN_EXAMPLES).
    harvest_enabled: bool = True
    harvest_interval_s: float = Field(default=300.0, gt=0)
    harvest_quality: float = Field(
        default=0.9,
        ge=0,
        le=1,
        validation_alias=AliasChoices("INGEST_HARVEST_QUALITY", "DATA_COLLECTION_QUALITY"),
    )
    harvest_min_examples: int = Field(
        default=100,
        ge=1,
        validation_alias=AliasChoices("INGEST_HARVEST_MIN_EXAMPLES", "MIN_EXAMPLES"),
    )
    harvest_dataset_name: str = "main"
    harvest_category: str = "production"
    # Only interactions older than this are read, so a late commit is not skipped by the cursor.
    harvest_settle_s: float = Field(default=5.0, ge=0)
    harvest_batch: int = Field(default=5_000, ge=1)
