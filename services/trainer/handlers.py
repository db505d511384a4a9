"""DatasetReady → a trained adapter → TrainingDone (or TrainingFailed).

Plain async functions; the bus, the database and the artifact store come in as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.trainer.jobs import JobRepository
from services.trainer.models import TrainingJob
from services.trainer.settings import TrainerSettings
from services.trainer.training.checkpoints import has_local_progress, snapshot
from services.trainer.training.config import (
    ConfigError,
    Layer,
    TrainingConfig,
    adapter_id_for,
)
from services.trainer.training.data import (
    PHASE_ORDER,
    DataError,
    Phase,
    plan_phases,
    read_records,
)
from services.trainer.training.runner import Outcome, run_worker
from shared import failpoints
from shared.aio import cancel_and_wait
from shared.basemodels import resolve_base_model
from shared.bus import PermanentError
from shared.db import utcnow
from shared.events import (
    ArtifactRef,
    DatasetReady,
    PhaseMetrics,
    TrainingDone,
    TrainingFailed,
    TrainingSpec,
)
from shared.storage import ArtifactCorrupted, ArtifactStore, UnsafeKey

log = logging.getLogger(__name__)

PRODUCER = "trainer"
EVENT_NS = uuid.UUID("7b0c6f5e-2f3a-4f7e-9a51-3c1d0e2b8a44")
# Bounds on what a DatasetReady may make us download.
MAX_TRAIN_BYTES = 50 * 2**30
MAX_MANIFEST_BYTES = 200 * 2**20

WorkerRun = Callable[..., Awaitable[Outcome]]
SPEC_SOURCE = "the run's TrainingSpec"


def event_uuid(*parts: str) -> uuid.UUID:
    """Deterministic event ids: a retried handler emits the same event (deduplicated)."""
    return uuid.uuid5(EVENT_NS, ":".join(parts))


@dataclass(frozen=True)
class Plan:
    """What a DatasetReady resolves to, before any data is downloaded."""

    config: TrainingConfig
    base_model: str
    adapter_id: str


def plan_for(event: DatasetReady, settings: TrainerSettings) -> Plan:
    return make_plan(event.dataset_id, settings, spec=event.training)


def make_plan(
    dataset_id: str,
    settings: TrainerSettings,
    *,
    spec: TrainingSpec | None = None,
    layers: Sequence[Layer] = (),
    phases: list[str] | None = None,
) -> Plan:
    """Resolve the config and the adapter id it produces.

    Order: the profile (``spec.profile`` or ``TRAINER_PROFILE``) → ``TRAINER_OVERRIDES`` /
    ``TRAINER_METHOD`` → ``layers`` (the CLI's flags) → ``spec.overrides`` / ``spec.method``
    → ``phases``. Raises :class:`ConfigError` for an invalid, over-the-limits or forbidden
    config and for a base model the settings do not allow a spec to pick.
    """
    stack = list(layers)
    if spec is not None:
        stack.append(Layer(SPEC_SOURCE, spec.overrides, spec.method))
    if phases:
        stack.append(Layer("--phase", {"phases": phases}))
    config = settings.resolve(
        *stack,
        profile=spec.profile if spec else None,
        profile_source=SPEC_SOURCE if spec and spec.profile else "",
    )
    base_model = settings.base_model
    if spec is not None and spec.base_model is not None:
        base_model = allowed_base_model(spec.base_model, settings)
    return Plan(
        config=config,
        base_model=base_model,
        adapter_id=adapter_id_for(dataset_id, base_model, config),
    )


def allowed_base_model(name: str, settings: TrainerSettings) -> str:
    """A spec's base model, if the settings allow it (exact names only: a spec never makes
    the trainer load an arbitrary path or hub id)."""
    if name == settings.base_model or name in settings.allowed_base_models:
        return name
    allowed = sorted({settings.base_model, *settings.allowed_base_models})
    raise ConfigError(
        f"base model {name[:200]!r} from {SPEC_SOURCE} is not allowed on this trainer; "
        f"allowed: {allowed} (TRAINER_BASE_MODEL, TRAINER_ALLOWED_BASE_MODELS)"
    )


def local_base_model(name: str) -> str:
    """The checkpoint directory of a base model; never a hub id (no downloads at run time)."""
    try:
        path = resolve_base_model(name)
    except ImportError as exc:  # its package is not installed here: retrying cannot help
        raise FileNotFoundError(f"base model {name[:200]!r} is not available here: {exc}") from exc
    if not os.path.isabs(path) or not os.path.isdir(path):
        raise FileNotFoundError(
            f"base model {name[:200]!r} is not a local checkpoint (the trainer never downloads "
            "a model at run time: use a built-in name or an absolute path)"
        )
    return path


async def refuse(
    event: DatasetReady,
    reason: str,
    *,
    jobs: JobRepository,
    adapter_id: str | None = None,
    retryable: bool = False,
    status: str = "failed",
) -> TrainingFailed:
    """Record a TrainingFailed (through the outbox) for this DatasetReady."""
    failed = event.follow(
        TrainingFailed,
        event_id=event_uuid(str(event.event_id), "failed", adapter_id or "-", status),
        producer=PRODUCER,
        reason=reason[:8000],
        retryable=retryable,
        failed_event_id=event.event_id,
        dataset_id=event.dataset_id,
    )
    await jobs.fail(
        adapter_id, event=failed, status="cancelled" if status == "cancelled" else "failed"
    )
    return failed


async def on_dataset_ready(
    event: DatasetReady,
    *,
    store: ArtifactStore,
    jobs: JobRepository,
    settings: TrainerSettings,
    work_root: Path,
    run: WorkerRun = run_worker,
    worker_env: dict[str, str] | None = None,
) -> TrainingDone | TrainingFailed | None:
    """Train the adapter this dataset asks for, once.

    Returns the event recorded (None when there was nothing to do: already trained, or being
    trained by a live replica). Raises :class:`PermanentError` after recording a
    TrainingFailed for anything retrying cannot fix; any other exception means "retry"
    (the redelivery resumes from the last checkpoint).
    """
    try:
        plan = plan_for(event, settings)
    except ConfigError as exc:
        await refuse(event, str(exc), jobs=jobs)
        raise PermanentError(str(exc)) from exc

    now = utcnow()
    status, job = await jobs.claim(
        TrainingJob(
            adapter_id=plan.adapter_id,
            dataset_id=event.dataset_id,
            base_model=plan.base_model,
            method=plan.config.method,
            config_hash=plan.config.config_hash(),
            config_json=json.dumps(plan.config.canonical(), sort_keys=True),
            status="running",
            owner=settings.worker_id,
            run_id=event.run_id,
            event_id=str(event.event_id),
            created_at=now,
            updated_at=now,
            heartbeat_at=now,
        ),
        lease_s=settings.lease_s,
    )
    if status != "claimed":
        log.info("adapter %s is %s: nothing to do for %s", plan.adapter_id, status, event.event_id)
        return None

    work = work_root / plan.adapter_id
    try:
        spec = await prepare(event, plan, job, store=store, settings=settings, work=work)
    except (DataError, UnsafeKey, ArtifactCorrupted, FileNotFoundError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise  # a full disk or a flaky mount: retry
        reason = f"cannot train on dataset {event.dataset_id}: {exc}"
        await refuse(event, reason, jobs=jobs, adapter_id=plan.adapter_id)
        raise PermanentError(reason) from exc

    outcome = await _train(
        spec, plan, store=store, jobs=jobs, settings=settings, run=run, env=worker_env
    )
    if outcome.status == "crashed":
        raise RuntimeError(outcome.reason[-2000:])
    if outcome.status == "cancelled":
        await refuse(
            event,
            "training cancelled on request",
            jobs=jobs,
            adapter_id=plan.adapter_id,
            retryable=True,
            status="cancelled",
        )
        return None
    if outcome.status == "failed":
        reason = outcome.reason
        checkpoint = await _last_good_checkpoint(jobs, plan.adapter_id, outcome)
        if checkpoint:
            reason += f" (last good checkpoint: {checkpoint})"
        elif outcome.kind == "diverged":
            reason += " (no checkpoint was saved before it)"
        failed = await refuse(event, reason, jobs=jobs, adapter_id=plan.adapter_id)
        raise PermanentError(f"{outcome.kind or 'failed'}: {failed.reason}")
    return await _finish(event, plan, outcome, store=store, jobs=jobs, settings=settings, work=work)


async def _last_good_checkpoint(
    jobs: JobRepository, adapter_id: str, outcome: Outcome
) -> str | None:
    """The job's last stored checkpoint, unless it is not older than the step that diverged
    (the worker does not save that step; this guards the claim in the failure's reason)."""
    job = await jobs.get(adapter_id)
    if job is None or not job.checkpoint_ref:
        return None
    bad_step = outcome.metadata.get("step")
    if (
        outcome.kind == "diverged"
        and isinstance(bad_step, int)
        and job.checkpoint_phase == outcome.metadata.get("phase")
        and (job.checkpoint_step or 0) >= bad_step
    ):
        return None
    uri = json.loads(job.checkpoint_ref)["uri"]
    return f"{job.checkpoint_phase} step {job.checkpoint_step} at {uri}"


async def prepare(
    event: DatasetReady,
    plan: Plan,
    job: TrainingJob,
    *,
    store: ArtifactStore,
    settings: TrainerSettings,
    work: Path,
) -> dict[str, Any]:
    """Restore the last checkpoint if this machine has none, fetch and check the data, and
    write the worker's spec."""
    if job.checkpoint_ref and not await asyncio.to_thread(has_local_progress, work):
        ref = ArtifactRef.model_validate_json(job.checkpoint_ref)
        log.info(
            "restoring checkpoint %s step %s from %s",
            job.checkpoint_phase,
            job.checkpoint_step,
            ref.uri,
        )
        await store.get_dir(ref, work)
    if event.train.size_bytes > MAX_TRAIN_BYTES:
        raise DataError(f"train split is {event.train.size_bytes} bytes (limit {MAX_TRAIN_BYTES})")
    data = work / "data"
    await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
    train_path = await store.get_file(event.train, data / "train.jsonl")
    records = await asyncio.to_thread(read_records, train_path, source="train split")
    unknown = sorted(set(event.curriculum) - set(PHASE_ORDER))
    if unknown:  # before downloading anything a hostile event points at
        raise DataError(f"unknown curriculum phases {unknown[:5]}; expected {list(PHASE_ORDER)}")
    manifests: dict[str, bytes] = {}
    for name, ref in sorted(event.curriculum.items()):
        if ref.size_bytes > MAX_MANIFEST_BYTES:
            raise DataError(f"curriculum manifest {name} is too large ({ref.size_bytes} bytes)")
        manifests[name] = await store.get_bytes(ref)
    phases = plan_phases(records, manifests, plan.config.phases)
    base_path = await asyncio.to_thread(local_base_model, plan.base_model)
    phase_specs = [await asyncio.to_thread(write_phase, data, phase) for phase in phases]
    return worker_spec(
        work,
        plan,
        phase_specs,
        base_path,
        settings,
        metadata={
            "dataset_name": event.dataset_name,
            "run_id": event.run_id,
            "training_spec": event.training.model_dump(mode="json") if event.training else None,
        },
        dataset_id=event.dataset_id,
        train_records=len(records),
    )


def worker_spec(
    work: Path,
    plan: Plan,
    phases: list[dict[str, Any]],
    base_path: str,
    settings: TrainerSettings,
    *,
    dataset_id: str,
    train_records: int,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the training worker reads (the service and ``tuneloop train`` build the same)."""
    return {
        "work_dir": str(work),
        "base_model_path": base_path,
        "config": plan.config.model_dump(mode="json"),
        "phases": phases,
        "checkpoint_every_steps": settings.checkpoint_every_steps,
        "checkpoint_every_s": settings.checkpoint_every_s,
        "prompts": settings.prompts,
        "max_new_tokens": settings.max_new_tokens,
        "threads": settings.threads,
        "step_delay_s": settings.step_delay_s,
        "metadata": {
            "adapter_id": plan.adapter_id,
            "dataset_id": dataset_id,
            "base_model": plan.base_model,
            "config_hash": plan.config.config_hash(),
            "train_records": train_records,
            **(metadata or {}),
        },
    }


def write_phase(data: Path, phase: Phase) -> dict[str, Any]:
    path = data / f"phase-{phase.name}.jsonl"
    with path.open("w") as fh:
        for record in phase.records:
            fh.write(json.dumps({"messages": record["messages"]}) + "\n")
    return {
        "name": phase.name,
        "file": str(path),
        "sequential": phase.sequential,
        "description": phase.description,
    }


async def _train(
    spec: dict[str, Any],
    plan: Plan,
    *,
    store: ArtifactStore,
    jobs: JobRepository,
    settings: TrainerSettings,
    run: WorkerRun,
    env: dict[str, str] | None,
) -> Outcome:
    work = Path(spec["work_dir"])
    progress: dict[str, Any] = {"phase": None, "step": 0}
    beat_every = min(settings.lease_s / 4.0, 30.0)

    async def on_progress(update: dict[str, Any]) -> None:
        kind = update.get("type")
        if kind in ("step", "phase_start"):
            progress["phase"], progress["step"] = update.get("phase"), update.get("step", 0)
        elif kind == "checkpoint":
            path = Path(update["path"])
            if not path.is_relative_to(work):
                return
            snap = await asyncio.to_thread(snapshot, work, path)
            try:
                ref = await store.put_dir(snap, kind="trainer-checkpoint")
            finally:
                shutil.rmtree(snap, ignore_errors=True)
            await jobs.record_checkpoint(
                plan.adapter_id, ref=ref, phase=str(update["phase"]), step=int(update["step"])
            )
            log.info("checkpoint %s step %s stored at %s", update["phase"], update["step"], ref.uri)
            failpoints.hit("trainer.checkpoint.stored")

    async def beat() -> None:
        while True:
            await asyncio.sleep(beat_every)
            with contextlib.suppress(Exception):
                await jobs.heartbeat(
                    plan.adapter_id,
                    owner=settings.worker_id,
                    phase=progress["phase"],
                    step=int(progress["step"] or 0),
                )

    async def should_stop() -> bool:
        return await jobs.cancel_requested(plan.adapter_id)

    beater = asyncio.create_task(beat())
    started = time.monotonic()
    try:
        outcome = await run(spec, on_progress=on_progress, should_stop=should_stop, env=env)
    finally:
        await cancel_and_wait(beater)
    log.info(
        "training %s ended %s after %.1fs",
        plan.adapter_id,
        outcome.status,
        time.monotonic() - started,
    )
    return outcome


async def _finish(
    event: DatasetReady,
    plan: Plan,
    outcome: Outcome,
    *,
    store: ArtifactStore,
    jobs: JobRepository,
    settings: TrainerSettings,
    work: Path,
) -> TrainingDone | None:
    adapter = await store.put_dir(work / "adapter", kind="adapter")
    meta = outcome.metadata
    done = event.follow(
        TrainingDone,
        event_id=event_uuid(plan.adapter_id, "done"),
        producer=PRODUCER,
        adapter_id=plan.adapter_id,
        dataset_id=event.dataset_id,
        base_model=plan.base_model,
        method=plan.config.method,
        hyperparameters_hash=plan.config.config_hash(),
        hyperparameters=plan.config.canonical(),
        adapter=adapter,
        phases=[
            PhaseMetrics(
                phase=p["phase"],
                steps=p["steps"],
                final_loss=p.get("final_loss"),
                seconds=p["seconds"],
                tokens_per_second=p.get("tokens_per_second"),
            )
            for p in meta.get("phases", [])
        ],
        tokens_per_second=meta.get("tokens_per_second"),
        validation=event.validation,
    )
    recorded = await jobs.complete(plan.adapter_id, event=done, metrics=meta)
    if not settings.keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return done if recorded else None
