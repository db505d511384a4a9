"""TrainingDone → one AdapterQuantized (or QuantizationFailed) per target.

Plain async functions; the bus, database and store come in as arguments. The heavy job runs
in a child process (:func:`run_in_process`): in a thread it held the GIL long enough (5 s
measured on a loaded 2-core machine) to starve the event loop's heartbeat, and a process per
job also hands all of torch's memory back when it ends.

Idempotency: a (adapter id, target) pair is decided once. Targets already recorded are
skipped before any work; the row and its event commit together, and the table's unique key
makes a racing duplicate a no-op.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.quantizer.models import QuantizedModel
from services.quantizer.quantization.pipeline import (
    JobError,
    JobReport,
    TargetResult,
    run_job,
)
from services.quantizer.settings import QuantizerSettings
from shared.basemodels import resolve_base_model
from shared.events import AdapterQuantized, ArtifactRef, Event, QuantizationFailed, TrainingDone
from shared.procs import worker_pool
from shared.storage import ArtifactCorrupted, ArtifactError, ArtifactNotFound, UnsafeKey

log = logging.getLogger(__name__)
PRODUCER = "quantizer"


class Store(Protocol):
    async def fetch_dir(self, ref: ArtifactRef) -> Path: ...
    async def get_file(self, ref: ArtifactRef, dest: Path) -> Path: ...
    async def put_dir(self, directory: Path, *, kind: str) -> ArtifactRef: ...
    async def put_bytes(self, data: bytes, *, kind: str, name: str) -> ArtifactRef: ...


class Ledger(Protocol):
    """Where decisions are recorded, each with its event, in one transaction."""

    async def decided_formats(self, adapter_id: str) -> set[str]: ...

    async def record(self, row: QuantizedModel, event: Event) -> bool:
        """False when that (adapter, format) was already recorded (nothing emitted)."""


Job = Callable[..., JobReport]
Resolve = Callable[[str], str]
Runner = Callable[..., Awaitable[JobReport]]


async def run_in_process(job: Job, **kwargs: Any) -> JobReport:
    """Run ``job(**kwargs)`` in a fresh (spawned) process and return its result."""
    pool = worker_pool(1, "spawn")
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, functools.partial(job, **kwargs))
    finally:
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


async def run_in_thread(job: Job, **kwargs: Any) -> JobReport:
    """For tests and the CLI: the job in a worker thread of this process."""
    return await asyncio.to_thread(job, **kwargs)


@dataclass(frozen=True)
class Failure:
    reason: str
    retryable: bool = False


def model_id_for(adapter_id: str, fmt: str) -> str:
    mid = f"{adapter_id}.{fmt}"
    if len(mid) <= 200:
        return mid
    digest = hashlib.sha256(adapter_id.encode()).hexdigest()[:16]
    return f"{adapter_id[:150]}.{digest}.{fmt}"


def _row(
    event: TrainingDone, fmt: str, status: str, emitted: Event, **fields: Any
) -> QuantizedModel:
    return QuantizedModel(
        model_id=model_id_for(event.adapter_id, fmt),
        adapter_id=event.adapter_id,
        format=fmt,
        status=status,
        run_id=event.run_id,
        training_event_id=str(event.event_id),
        base_model=event.base_model,
        dataset_id=event.dataset_id,
        event_id=str(emitted.event_id),
        **fields,
    )


async def _fail_all(
    event: TrainingDone, targets: list[str], failure: Failure, ledger: Ledger
) -> list[Event]:
    emitted: list[Event] = []
    for fmt in targets:
        failed = event.follow(
            QuantizationFailed,
            producer=PRODUCER,
            reason=f"{fmt}: {failure.reason}"[:8000],
            retryable=failure.retryable,
            failed_event_id=event.event_id,
            adapter_id=event.adapter_id,
            format=fmt,
        )
        row = _row(event, fmt, "failed", failed, reason=failure.reason[:8000])
        if await ledger.record(row, failed):
            emitted.append(failed)
    return emitted


def _check_inputs(event: TrainingDone, settings: QuantizerSettings) -> Failure | None:
    if not settings.base_model_allowed(event.base_model):
        return Failure(f"base model {event.base_model!r} is not in the quantizer's allow-list")
    if event.adapter.size_bytes > settings.max_adapter_bytes:
        return Failure(f"adapter manifest is {event.adapter.size_bytes} bytes, over the limit")
    if event.validation is None:
        if settings.require_validation:
            return Failure("TrainingDone carries no validation split: the quality gate needs one")
    elif event.validation.size_bytes > settings.max_validation_bytes:
        return Failure(
            f"validation split is {event.validation.size_bytes} bytes, over the "
            f"{settings.max_validation_bytes} limit"
        )
    return None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def on_training_done(
    event: TrainingDone,
    *,
    store: Store,
    ledger: Ledger,
    settings: QuantizerSettings,
    work_root: Path,
    job: Job = run_job,
    resolve: Resolve = resolve_base_model,
    runner: Runner = run_in_process,
    final_attempt: bool = True,
) -> list[Event]:
    """Quantize ``event``'s adapter to every configured target not decided yet.

    Returns the events recorded (empty for a redelivery of finished work). Bad input ends in
    QuantizationFailed events; unexpected errors propagate for the bus to retry, except on
    the final attempt, where they too become (retryable) QuantizationFailed events.
    """
    wanted = settings.targets_for(event.base_model)
    decided = await ledger.decided_formats(event.adapter_id)
    pending = [t for t in wanted if t not in decided]
    if not pending:
        log.info("adapter %s: every target already decided; nothing to do", event.adapter_id)
        return []
    failure = _check_inputs(event, settings)
    if failure:
        return await _fail_all(event, pending, failure, ledger)

    work = work_root / uuid.uuid4().hex
    try:
        report = await _run(
            event,
            pending,
            work,
            store=store,
            settings=settings,
            job=job,
            resolve=resolve,
            runner=runner,
        )
        if isinstance(report, Failure):
            return await _fail_all(event, pending, report, ledger)
        return await _publish(event, report, store=store, ledger=ledger)
    except Exception as exc:
        if not final_attempt:
            raise
        log.exception("quantization of %s failed on its final attempt", event.adapter_id)
        return await _fail_all(event, pending, Failure(f"gave up: {exc!r}", True), ledger)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _run(
    event: TrainingDone,
    targets: list[str],
    work: Path,
    *,
    store: Store,
    settings: QuantizerSettings,
    job: Job,
    resolve: Resolve,
    runner: Runner,
) -> JobReport | Failure:
    try:
        adapter_dir = await store.fetch_dir(event.adapter)
    except (ArtifactCorrupted, UnsafeKey, ArtifactNotFound) as exc:
        return Failure(f"adapter artifact unusable: {exc}")
    except (ArtifactError, KeyError, ValueError) as exc:  # a malformed manifest
        return Failure(f"adapter artifact unusable: {exc!r}")
    size = await asyncio.to_thread(_dir_bytes, adapter_dir)
    if size > settings.max_adapter_bytes:
        return Failure(f"adapter is {size} bytes, over the {settings.max_adapter_bytes} limit")
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    validation = work / "validation.jsonl"
    if event.validation is not None:
        try:
            await store.get_file(event.validation, validation)
        except (ArtifactCorrupted, UnsafeKey, ArtifactNotFound) as exc:
            return Failure(f"validation split unusable: {exc}")
    else:
        return Failure("no validation split")
    try:
        base_dir = await asyncio.to_thread(resolve, event.base_model)
    except (FileNotFoundError, ValueError) as exc:
        return Failure(f"base model {event.base_model!r}: {exc}")
    try:
        return await runner(
            job,
            base_dir=base_dir,
            base_model=event.base_model,
            adapter_dir=adapter_dir,
            validation=validation,
            targets=targets,
            work_dir=work / "out",
            settings=settings.job_settings(),
        )
    except JobError as exc:
        return Failure(exc.reason, exc.retryable)


async def _publish(
    event: TrainingDone, report: JobReport, *, store: Store, ledger: Ledger
) -> list[Event]:
    report_json = json.dumps(report.as_dict(), indent=1, sort_keys=True).encode()
    report_ref = await store.put_bytes(
        report_json, kind="quantization-report", name="quantization_report.json"
    )
    emitted: list[Event] = []
    for result in report.targets:
        out = await _decide(event, result, report_ref, store=store)
        row_event, row = out
        if await ledger.record(row, row_event):
            emitted.append(row_event)
    return emitted


async def _decide(
    event: TrainingDone, result: TargetResult, report_ref: ArtifactRef, *, store: Store
) -> tuple[Event, QuantizedModel]:
    numbers = {
        "perplexity_before": _finite(result.perplexity_before),
        "perplexity_after": _finite(result.perplexity_after),
        "relative_increase": _finite(result.relative_increase),
        "seconds": result.seconds,
        "size_bytes": result.size_bytes,
        "report_uri": report_ref.uri,
    }
    if result.status == "accepted" and result.output_dir is not None:
        if result.format == "adapter":
            artifact = event.adapter  # passed through as trained: same bytes, same ref
        else:
            artifact = await store.put_dir(result.output_dir, kind="model")
        quantized = event.follow(
            AdapterQuantized,
            producer=PRODUCER,
            model_id=model_id_for(event.adapter_id, result.format),
            adapter_id=event.adapter_id,
            dataset_id=event.dataset_id,
            base_model=event.base_model,
            format=result.format,
            artifact=artifact,
            perplexity_before=_finite(result.perplexity_before),
            perplexity_after=_finite(result.perplexity_after),
            validation=event.validation,
        )
        row = _row(
            event,
            result.format,
            "accepted",
            quantized,
            artifact_uri=artifact.uri,
            artifact_sha256=artifact.sha256,
            **{
                **numbers,
                "size_bytes": artifact.size_bytes
                if result.format == "adapter"
                else result.size_bytes,
            },
        )
        return quantized, row
    reason = result.reason or f"{result.format}: {result.status}"
    reason += f" (report {report_ref.uri})"
    failed = event.follow(
        QuantizationFailed,
        producer=PRODUCER,
        reason=reason[:8000],
        retryable=False,
        failed_event_id=event.event_id,
        adapter_id=event.adapter_id,
        format=result.format,
    )
    return failed, _row(event, result.format, result.status, failed, reason=reason, **numbers)


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
