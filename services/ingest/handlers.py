"""Ingest's use cases as plain async functions: ingest files into a new dataset version,
ingest a ``DatasetSubmitted`` command, and harvest production interactions.

Dependencies come in as keyword arguments (the :class:`Ports`); nothing here knows the
broker. The CPU-heavy pipeline runs in a thread (and its worker processes), never on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlparse

import orjson
from opentelemetry.context import Context
from sqlalchemy import and_, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ingest.models import DatasetRun, DatasetVersion, HarvestCursor
from services.ingest.pipeline.formats import SourceFile
from services.ingest.pipeline.run import Pipeline, PipelineOutput, previous_sources
from services.ingest.settings import IngestSettings, ProcessingConfig
from shared.db import Database, utcnow
from shared.events import (
    ArtifactRef,
    DatasetReady,
    DatasetRejected,
    DatasetSubmitted,
    Event,
    Origin,
    SplitCounts,
    TrainingSpec,
    new_run_id,
)
from shared.interactions import Interaction
from shared.storage import ArtifactStore
from shared.telemetry import log_context, tracer

log = logging.getLogger(__name__)
PRODUCER = "ingest"


class Ports(Protocol):
    """What the handlers need from the service runtime (``ServiceRuntime`` provides it)."""

    db: Database
    store: ArtifactStore

    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]: ...

    def emit(self, session: AsyncSession, event: Event) -> None: ...


class VersionConflict(Exception):
    """Another writer added a version to this dataset line first; run again on top of it."""


class InputError(Exception):
    """The request names inputs that cannot be read (the caller's mistake)."""


Status = Literal["created", "retrain", "unchanged", "rejected", "dry_run"]
"""``retrain``: the content is an existing version, announced again for a new training spec."""


@dataclass
class IngestOutcome:
    status: Status
    dataset_name: str
    dataset_id: str | None
    run_id: str | None
    report: dict[str, Any]
    event: DatasetReady | DatasetRejected | None = None
    training: TrainingSpec | None = None

    def summary(self) -> dict[str, Any]:
        rec = self.report.get("records", {})
        return {
            "status": self.status,
            "dataset_name": self.dataset_name,
            "dataset_id": self.dataset_id,
            "run_id": self.run_id,
            "training": self.training.model_dump(mode="json") if self.training else None,
            "records": rec,
            "rejected_by_reason": self.report.get("rejected_by_reason", {}),
            "pii_scrubbed": self.report.get("pii_scrubbed", {}),
            "split": {k: self.report.get("split", {}).get(k) for k in ("train", "validation")},
        }


@dataclass
class IngestRequest:
    files: list[SourceFile]
    dataset_name: str
    origin: Origin = "upload"
    dry_run: bool = False
    config: ProcessingConfig = field(default_factory=ProcessingConfig)
    causation_id: Any = None
    # Passed on to the DatasetReady; not part of the version (see training_key).
    training: TrainingSpec | None = None


def canonical_training(spec: TrainingSpec | None) -> TrainingSpec | None:
    """None for "the trainer's own settings", however it was spelled (no spec, or one that
    sets nothing)."""
    if spec is None or spec == TrainingSpec():
        return None
    return spec


def training_key(spec: TrainingSpec | None) -> str:
    """What makes two specs the same request: sha256 of the canonical spec's JSON (sorted
    keys). The dataset version does not include it: the spec is not data."""
    canonical = canonical_training(spec)
    data = canonical.model_dump(mode="json") if canonical else None
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


# ---------------------------------------------------------------- dataset versions


async def latest_version(session: AsyncSession, dataset_name: str) -> DatasetVersion | None:
    result = await session.exec(
        select(DatasetVersion)
        .where(col(DatasetVersion.dataset_name) == dataset_name)
        .order_by(col(DatasetVersion.version).desc())
        .limit(1)
    )
    return result.first()


def _refs(row: DatasetVersion) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(row.artifacts)
    return data


async def _fetch_previous(
    store: ArtifactStore, row: DatasetVersion, workdir: Path
) -> list[SourceFile]:
    refs = _refs(row)
    train = await store.get_file(ArtifactRef(**refs["train"]), workdir / "previous-train.jsonl")
    validation = await store.get_file(
        ArtifactRef(**refs["validation"]), workdir / "previous-validation.jsonl"
    )
    return previous_sources(train, validation, f"{row.dataset_name}@{row.version}")


async def _store_outputs(
    store: ArtifactStore, output: PipelineOutput
) -> tuple[dict[str, ArtifactRef], ArtifactRef]:
    refs = {
        "train": await store.put_file(output.train_path, kind="dataset", name="train.jsonl"),
        "validation": await store.put_file(
            output.validation_path, kind="dataset", name="validation.jsonl"
        ),
        "rejected": await store.put_file(
            output.rejects_path, kind="dataset", name="rejected.jsonl"
        ),
    }
    for phase, path in output.manifest_paths.items():
        refs[f"curriculum-{phase}"] = await store.put_file(path, kind="dataset", name=path.name)
    report = dict(output.report)
    report["artifacts"] = {k: v.model_dump() for k, v in refs.items()}
    output.report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    report_ref = await store.put_file(output.report_path, kind="dataset", name="report.json")
    output.report.update(report)
    return refs, report_ref


# ---------------------------------------------------------------- ingest


InTransaction = Callable[[AsyncSession], Awaitable[None]]


async def ingest(
    request: IngestRequest,
    *,
    ports: Ports,
    settings: IngestSettings,
    executor: Executor | None = None,
    in_transaction: InTransaction | None = None,
    progress: Callable[[int], None] | None = None,
    root_span: bool = True,
) -> IngestOutcome:
    """Files → a new version of ``request.dataset_name`` and its ``DatasetReady`` (or a
    ``DatasetRejected`` when nothing survives); nothing new when the content is unchanged.

    ``in_transaction`` runs in the transaction that records the version (the harvester
    advances its cursor there). Raises :class:`VersionConflict` if another writer extended
    the line meanwhile.
    """
    # A new dataset version starts a run, and the run's trace is this one: a root span for
    # the CLI and the harvester; over HTTP, a child of the request's span (itself the root
    # unless the caller sent a traceparent).
    ctx = Context() if root_span else None
    with tracer().start_as_current_span("ingest.dataset", context=ctx) as span:
        span.set_attribute("dataset.name", request.dataset_name)
        span.set_attribute("dataset.origin", request.origin)
        workdir = Path(tempfile.mkdtemp(prefix="ingest-", dir=settings.work_dir or None))
        try:
            async with ports.db.session() as session:
                previous = await latest_version(session, request.dataset_name)
            prev_files = await _fetch_previous(ports.store, previous, workdir) if previous else []
            pipeline = Pipeline(
                request.config,
                dataset_name=request.dataset_name,
                executor=executor,
                max_in_flight=2 * max(1, settings.workers or 2) + 1,
                progress=progress,
            )
            try:
                output = await asyncio.to_thread(
                    pipeline.run, request.files, workdir=workdir / "out", previous=prev_files
                )
            except BrokenProcessPool:
                # A worker died (killed for memory?): finish this run in-process.
                log.warning("ingest worker pool is broken; processing in-process")
                pipeline = Pipeline(
                    request.config, dataset_name=request.dataset_name, progress=progress
                )
                output = await asyncio.to_thread(
                    pipeline.run, request.files, workdir=workdir / "retry", previous=prev_files
                )
            outcome = await _publish(
                request, output, previous, ports=ports, in_transaction=in_transaction
            )
            span.set_attribute("dataset.status", outcome.status)
            if outcome.dataset_id:
                span.set_attribute("dataset.id", outcome.dataset_id)
            if outcome.run_id:
                span.set_attribute("tuneloop.run_id", outcome.run_id)
            return outcome
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


async def _publish(
    request: IngestRequest,
    output: PipelineOutput,
    previous: DatasetVersion | None,
    *,
    ports: Ports,
    in_transaction: InTransaction | None,
) -> IngestOutcome:
    name = request.dataset_name
    if request.dry_run:
        return IngestOutcome("dry_run", name, output.dataset_id, None, output.report)
    dedupe = output.report.get("dedupe", {})
    usable = output.new_records + dedupe.get("exact", 0) + dedupe.get("near", 0)
    if output.dataset_id is None or usable == 0:
        # Nothing of this input passed validation (merging it with the previous version
        # would only reproduce that version): that is a rejection, not "unchanged".
        run_id = new_run_id()
        _, report_ref = await _store_outputs(ports.store, output)
        rejected = DatasetRejected(
            run_id=run_id,
            producer=PRODUCER,
            causation_id=request.causation_id,
            reason=_rejection_reason(output.report),
            retryable=False,
            dataset_name=name,
            report=report_ref,
        )
        with log_context(run_id=run_id, event_id=str(rejected.event_id)):
            async with ports.transaction() as session:
                if in_transaction:
                    await in_transaction(session)
                ports.emit(session, rejected)
            log.info("dataset %s rejected: %s", name, rejected.reason)
        return IngestOutcome("rejected", name, None, run_id, output.report, rejected)

    training = canonical_training(request.training)
    key = training_key(training)
    async with ports.db.session() as session:
        existing = await session.get(DatasetVersion, output.dataset_id)
        announced = await session.get(DatasetRun, (output.dataset_id, key)) if existing else None
    if existing is not None and announced is not None:
        if in_transaction:
            async with ports.transaction() as session:
                await in_transaction(session)
        return IngestOutcome(
            "unchanged", name, existing.dataset_id, announced.run_id, output.report, None, training
        )
    if existing is not None:
        return await _retrain(
            request, output, existing, training, key, ports=ports, in_transaction=in_transaction
        )

    refs, report_ref = await _store_outputs(ports.store, output)
    run_id = new_run_id()
    event = _dataset_ready(
        request,
        output,
        refs,
        report_ref,
        run_id=run_id,
        previous_dataset_id=previous.dataset_id if previous else None,
        training=training,
    )
    row = DatasetVersion(
        dataset_id=output.dataset_id,
        dataset_name=name,
        version=(previous.version + 1) if previous else 1,
        previous_dataset_id=previous.dataset_id if previous else None,
        origin=request.origin,
        run_id=run_id,
        event_id=str(event.event_id),
        created_at=utcnow(),
        train_count=output.train_count,
        validation_count=output.validation_count,
        artifacts=orjson.dumps({k: v.model_dump() for k, v in refs.items()}).decode(),
        report_uri=report_ref.uri,
    )
    with log_context(run_id=run_id, event_id=str(event.event_id)):
        try:
            async with ports.transaction() as session:
                session.add(row)
                await session.flush()
                session.add(_run_row(event, key))
                await session.flush()
                if in_transaction:
                    await in_transaction(session)
                ports.emit(session, event)
        except IntegrityError as exc:
            async with ports.db.session() as session:
                winner = await session.get(DatasetVersion, output.dataset_id)
            if winner is not None:  # the same content, committed by another replica
                return IngestOutcome(
                    "unchanged",
                    name,
                    winner.dataset_id,
                    winner.run_id,
                    output.report,
                    None,
                    training,
                )
            raise VersionConflict(f"dataset line {name!r} gained a version meanwhile") from exc
        log.info(
            "dataset %s version %s: %s (%d train, %d validation)",
            name,
            row.version,
            output.dataset_id,
            output.train_count,
            output.validation_count,
        )
    return IngestOutcome("created", name, output.dataset_id, run_id, output.report, event, training)


def _dataset_ready(
    request: IngestRequest,
    output: PipelineOutput,
    refs: dict[str, ArtifactRef],
    report_ref: ArtifactRef,
    *,
    run_id: str,
    previous_dataset_id: str | None,
    training: TrainingSpec | None,
) -> DatasetReady:
    assert output.dataset_id is not None
    return DatasetReady(
        run_id=run_id,
        producer=PRODUCER,
        causation_id=request.causation_id,
        dataset_id=output.dataset_id,
        dataset_name=request.dataset_name,
        origin=request.origin,
        previous_dataset_id=previous_dataset_id,
        train=refs["train"],
        validation=refs["validation"],
        report=report_ref,
        curriculum={k.split("-", 1)[1]: v for k, v in refs.items() if k.startswith("curriculum-")},
        counts=SplitCounts(train=output.train_count, validation=output.validation_count),
        counts_by_category=output.counts_by_category,
        counts_by_source=output.counts_by_source,
        training=training,
    )


def _run_row(event: DatasetReady, key: str) -> DatasetRun:
    return DatasetRun(
        dataset_id=event.dataset_id,
        training_key=key,
        run_id=event.run_id,
        event_id=str(event.event_id),
        created_at=utcnow(),
    )


async def _retrain(
    request: IngestRequest,
    output: PipelineOutput,
    existing: DatasetVersion,
    training: TrainingSpec | None,
    key: str,
    *,
    ports: Ports,
    in_transaction: InTransaction | None,
) -> IngestOutcome:
    """The content is version ``existing`` (byte for byte: same id), asked for with a
    training spec it was never announced with: no new version, a new run of this one (a
    DatasetReady with the same artifacts and the new spec). Once per (version, spec)."""
    name = request.dataset_name
    # Content-addressed: the same train/validation/manifests as the version's own.
    refs, report_ref = await _store_outputs(ports.store, output)
    run_id = new_run_id()
    event = _dataset_ready(
        request,
        output,
        refs,
        report_ref,
        run_id=run_id,
        previous_dataset_id=existing.previous_dataset_id,
        training=training,
    )
    with log_context(run_id=run_id, event_id=str(event.event_id)):
        try:
            async with ports.transaction() as session:
                session.add(_run_row(event, key))
                await session.flush()
                if in_transaction:
                    await in_transaction(session)
                ports.emit(session, event)
        except IntegrityError:  # another replica announced this spec first
            async with ports.db.session() as session:
                winner = await session.get(DatasetRun, (existing.dataset_id, key))
            return IngestOutcome(
                "unchanged",
                name,
                existing.dataset_id,
                winner.run_id if winner else None,
                output.report,
                None,
                training,
            )
        log.info(
            "dataset %s: %s announced again for a new training spec", name, existing.dataset_id
        )
    return IngestOutcome(
        "retrain", name, existing.dataset_id, run_id, output.report, event, training
    )


def _rejection_reason(report: dict[str, Any]) -> str:
    reasons = report.get("rejected_by_reason") or {}
    top = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    read = report.get("records", {}).get("read", 0)
    return f"no record survived processing ({read} read; {top or 'no records found'})"[:8000]


async def ingest_with_retry(
    request: IngestRequest, *, attempts: int = 3, **kwargs: Any
) -> IngestOutcome:
    """:func:`ingest`, run again on top of the new version when another writer won a race."""
    for attempt in range(attempts):
        try:
            return await ingest(request, **kwargs)
        except VersionConflict:
            if attempt == attempts - 1:
                raise
            log.info("dataset line %s moved on; ingesting again", request.dataset_name)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- DatasetSubmitted


def _local_path(uri: str, allowed_roots: list[Path]) -> Path:
    path = Path(unquote(urlparse(uri).path)).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in allowed_roots):
        raise InputError(f"{uri} is outside the directories ingest may read")
    if not path.is_file():
        raise InputError(f"{uri} does not exist")
    return path


async def _download(uri: str, dest: Path, *, store: ArtifactStore, roots: list[Path]) -> Path:
    if uri.startswith("file://"):
        return _local_path(uri, roots)
    from shared.storage import ArtifactNotFound, GcsBackend

    parsed = urlparse(uri)
    backend = GcsBackend(parsed.netloc)
    try:
        await asyncio.to_thread(backend.download, parsed.path.lstrip("/"), dest)
    except ArtifactNotFound as exc:
        raise InputError(f"{uri} does not exist") from exc
    return dest


async def on_dataset_submitted(
    event: DatasetSubmitted,
    *,
    ports: Ports,
    settings: IngestSettings,
    executor: Executor | None = None,
    allowed_roots: list[Path],
) -> IngestOutcome:
    """Ingest files that are already in an artifact store (``file://`` under an allowed
    directory, or ``gs://``). Unreadable inputs publish a ``DatasetRejected``."""
    with tempfile.TemporaryDirectory(
        prefix="ingest-submitted-", dir=settings.work_dir or None
    ) as tmp:
        files = []
        try:
            for i, uri in enumerate(event.files):
                name = Path(urlparse(uri).path).name or f"file-{i}"
                path = await _download(
                    uri, Path(tmp) / f"{i}-{name}", store=ports.store, roots=allowed_roots
                )
                files.append(SourceFile(path, name, event.format, domain=event.domain))
        except InputError as exc:
            rejected = event.follow(
                DatasetRejected,
                producer=PRODUCER,
                reason=str(exc),
                retryable=False,
                failed_event_id=event.event_id,
                dataset_name=event.dataset_name,
            )
            async with ports.transaction() as session:
                ports.emit(session, rejected)
            return IngestOutcome("rejected", event.dataset_name, None, event.run_id, {}, rejected)
        request = IngestRequest(
            files=files,
            dataset_name=event.dataset_name,
            config=settings.processing,
            causation_id=event.event_id,
            training=event.training,
        )
        return await ingest_with_retry(
            request, ports=ports, settings=settings, executor=executor, root_span=False
        )


# ---------------------------------------------------------------- harvest


@dataclass
class HarvestOutcome:
    status: Literal["not_enough", "created", "retrain", "unchanged", "rejected", "conflict"]
    eligible: int
    scanned: int
    ingest: IngestOutcome | None = None


def interaction_record(row: Interaction, category: str) -> dict[str, Any] | None:
    """The interaction as an OpenAI chat record, or None if its request is not usable."""
    try:
        request = orjson.loads(row.request)
    except orjson.JSONDecodeError:
        return None
    if isinstance(request, dict) and isinstance(request.get("messages"), list):
        messages = request["messages"]
    elif isinstance(request, list):
        messages = request
    elif isinstance(request, dict) and isinstance(request.get("prompt"), str):
        messages = [{"role": "user", "content": request["prompt"]}]
    else:
        return None
    clean = [
        {"role": m.get("role"), "content": m.get("content")}
        for m in messages
        if isinstance(m, dict)
    ]
    clean.append({"role": "assistant", "content": row.response_text})
    return {
        "messages": clean,
        "category": category,
        "source": f"harvest:{row.served_model_name}"[:200],
    }


def _eligible(row: Interaction, quality: float) -> bool:
    if not 200 <= row.status_code < 300:
        return False
    if row.feedback_rating is not None and row.feedback_rating < 0:
        return False
    good_score = row.quality_score is not None and row.quality_score >= quality
    return good_score or (row.feedback_rating or 0) > 0


async def _cursor(db: Database, name: str) -> HarvestCursor:
    """The line's cursor, created on first use (a racing replica's insert is fine)."""
    async with db.session() as session:
        cursor = await session.get(HarvestCursor, name)
    if cursor is not None:
        return cursor
    with contextlib.suppress(IntegrityError):
        async with db.session() as session:
            session.add(HarvestCursor(dataset_name=name, generation=0, updated_at=utcnow()))
    async with db.session() as session:
        created = await session.get(HarvestCursor, name)
    assert created is not None
    return created


async def _scan(
    db: Database, cursor: HarvestCursor, settings: IngestSettings, until: datetime
) -> AsyncIterator[list[Interaction]]:
    """Interactions after the cursor, in (created_at, id) order, in batches."""
    after_at, after_id = cursor.last_created_at, cursor.last_id or ""
    while True:
        query = select(Interaction).where(col(Interaction.created_at) <= until)
        if after_at is not None:
            query = query.where(
                or_(
                    col(Interaction.created_at) > after_at,
                    and_(col(Interaction.created_at) == after_at, col(Interaction.id) > after_id),
                )
            )
        query = query.order_by(col(Interaction.created_at), col(Interaction.id)).limit(
            settings.harvest_batch
        )
        async with db.session() as session:
            rows = list((await session.exec(query)).all())
        if not rows:
            return
        yield rows
        after_at, after_id = rows[-1].created_at, rows[-1].id


async def _late_feedback(
    db: Database, cursor: HarvestCursor, settings: IngestSettings, until: datetime
) -> AsyncIterator[list[Interaction]]:
    """Interactions the main cursor already passed that got positive feedback since the
    last harvest (feedback usually comes after the answer). Already-harvested ones come
    back too; dedupe against the previous version drops them."""
    if cursor.last_created_at is None:
        return
    # Strictly after the last feedback_at read: every row with that very timestamp was read
    # then (the scan reads all of them up to ``until``, which lags behind commits).
    after_at, after_id = cursor.feedback_after, None
    while True:
        query = select(Interaction).where(
            col(Interaction.feedback_rating) > 0,
            col(Interaction.feedback_at) <= until,
            or_(
                col(Interaction.created_at) < cursor.last_created_at,
                and_(
                    col(Interaction.created_at) == cursor.last_created_at,
                    col(Interaction.id) <= (cursor.last_id or ""),
                ),
            ),
        )
        if after_at is not None and after_id is None:
            query = query.where(col(Interaction.feedback_at) > after_at)
        elif after_at is not None:  # the next page of this scan
            query = query.where(
                or_(
                    col(Interaction.feedback_at) > after_at,
                    and_(col(Interaction.feedback_at) == after_at, col(Interaction.id) > after_id),
                )
            )
        query = query.order_by(col(Interaction.feedback_at), col(Interaction.id)).limit(
            settings.harvest_batch
        )
        async with db.session() as session:
            rows = list((await session.exec(query)).all())
        if not rows:
            return
        yield rows
        last = rows[-1]
        assert last.feedback_at is not None
        after_at, after_id = last.feedback_at, last.id


async def harvest(
    *,
    ports: Ports,
    settings: IngestSettings,
    executor: Executor | None = None,
    now: datetime | None = None,
) -> HarvestOutcome:
    """Good production interactions since the cursor → a new version of the harvest line
    (merged with its previous version), once at least ``harvest_min_examples`` exist.

    Safe in several replicas: the cursor only advances from the generation that was read,
    in the transaction that records the version (the loser's transaction rolls back)."""
    name = settings.harvest_dataset_name
    until = (now or datetime.now(UTC)) - timedelta(seconds=settings.harvest_settle_s)
    cursor = await _cursor(ports.db, name)
    scanned = eligible = 0
    last: tuple[datetime | None, str | None] = (cursor.last_created_at, cursor.last_id)
    feedback_after = cursor.feedback_after
    with tempfile.TemporaryDirectory(
        prefix="ingest-harvest-", dir=settings.work_dir or None
    ) as tmp:
        path = Path(tmp) / "interactions.jsonl"
        with path.open("wb") as out:

            def take(row: Interaction) -> None:
                nonlocal eligible
                if _eligible(row, settings.harvest_quality):
                    record = interaction_record(row, settings.harvest_category)
                    if record is not None:
                        out.write(orjson.dumps(record) + b"\n")
                        eligible += 1

            async for rows in _late_feedback(ports.db, cursor, settings, until):
                for row in rows:
                    scanned += 1
                    feedback_after = row.feedback_at
                    take(row)
            async for rows in _scan(ports.db, cursor, settings, until):
                for row in rows:
                    scanned += 1
                    last = (row.created_at, row.id)
                    take(row)
        if eligible < settings.harvest_min_examples:
            return HarvestOutcome("not_enough", eligible, scanned)
        seen_generation = cursor.generation
        last_at, last_id = last

        async def advance(session: AsyncSession) -> None:
            result = await session.exec(
                update(HarvestCursor)
                .where(
                    col(HarvestCursor.dataset_name) == name,
                    col(HarvestCursor.generation) == seen_generation,
                )
                .values(
                    last_created_at=last_at,
                    last_id=last_id,
                    feedback_after=feedback_after,
                    generation=seen_generation + 1,
                    updated_at=utcnow(),
                )
            )
            if result.rowcount != 1:
                raise _CursorMoved()

        request = IngestRequest(
            files=[SourceFile(path, "interactions.jsonl", "openai", source="harvest")],
            dataset_name=name,
            origin="harvest",
            config=settings.processing,
        )
        try:
            outcome = await ingest(
                request,
                ports=ports,
                settings=settings,
                executor=executor,
                in_transaction=advance,
            )
        except (_CursorMoved, VersionConflict):
            log.info("harvest: another replica harvested these interactions first")
            return HarvestOutcome("conflict", eligible, scanned)
    status: Literal["created", "retrain", "unchanged", "rejected"] = (
        "created" if outcome.status == "created" else outcome.status  # type: ignore[assignment]
    )
    return HarvestOutcome(status, eligible, scanned, outcome)


class _CursorMoved(Exception):
    pass
