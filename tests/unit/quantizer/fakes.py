"""Fakes of the quantizer handler's ports (store, ledger, job)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from services.quantizer.models import QuantizedModel
from services.quantizer.quantization.merge import AdapterInfo
from services.quantizer.quantization.pipeline import JobReport, TargetResult
from shared.events import ArtifactRef, Event


def ref(name: str, size: int = 10) -> ArtifactRef:
    return ArtifactRef(
        uri=f"file:///store/{name}",
        sha256=hashlib.sha256(name.encode()).hexdigest(),
        size_bytes=size,
    )


class FakeStore:
    def __init__(self, root: Path, *, fetch_error: Exception | None = None) -> None:
        self.root = root
        self.fetch_error = fetch_error
        self.uploaded: list[Path] = []
        self.blobs: dict[str, bytes] = {}

    async def fetch_dir(self, r: ArtifactRef) -> Path:
        if self.fetch_error:
            raise self.fetch_error
        d = self.root / "adapter"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_model.safetensors").write_bytes(b"x" * 100)
        return d

    async def get_file(self, r: ArtifactRef, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text('{"messages": []}\n')
        return dest

    async def put_dir(self, directory: Path, *, kind: str) -> ArtifactRef:
        self.uploaded.append(directory)
        return ref(f"{kind}/{directory.name}", 1234)

    async def put_bytes(self, data: bytes, *, kind: str, name: str) -> ArtifactRef:
        self.blobs[name] = data
        return ref(f"{kind}/{name}", len(data))


class FakeLedger:
    def __init__(self) -> None:
        self.rows: list[QuantizedModel] = []
        self.events: list[Event] = []

    async def decided_formats(self, adapter_id: str) -> set[str]:
        return {r.format for r in self.rows if r.adapter_id == adapter_id}

    async def record(self, row: QuantizedModel, event: Event) -> bool:
        if (row.adapter_id, row.format) in {(r.adapter_id, r.format) for r in self.rows}:
            return False
        self.rows.append(row)
        self.events.append(event)
        return True


class FakeJob:
    """Stands in for run_job: every target accepted unless told otherwise."""

    def __init__(self, *, outcome: dict[str, str] | None = None, error: Exception | None = None):
        self.outcome = outcome or {}
        self.error = error
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> JobReport:
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        results = []
        for fmt in kwargs["targets"]:
            status = self.outcome.get(fmt, "accepted")
            out = kwargs["work_dir"] / fmt
            out.mkdir(parents=True, exist_ok=True)
            after = 10.2 if status == "accepted" else 14.0
            results.append(
                TargetResult(
                    format=fmt,
                    status=status,  # type: ignore[arg-type]
                    seconds=1.5,
                    perplexity_before=10.0,
                    perplexity_after=None if status == "failed" else after,
                    relative_increase=None if status == "failed" else (after - 10) / 10,
                    size_bytes=999,
                    reason=None if status == "accepted" else f"{fmt}: perplexity 10 -> 14",
                    output_dir=None if status == "failed" else out,
                )
            )
        return JobReport(
            adapter=AdapterInfo("LORA", True, 8, ["q_proj"]),
            base_model=kwargs["base_model"],
            merged_perplexity=10.0,
            merged_size_bytes=5000,
            merge_seconds=0.1,
            merge_max_logit_diff=1e-6,
            eval_tokens=100,
            eval_records=4,
            skipped_records=0,
            calibration_records=4,
            prompts=[],
            merged_generations=[],
            targets=results,
            threshold=0.05,
        )
