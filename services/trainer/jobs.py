"""The training-job repository over the database; events it emits go through the outbox in
the same transaction as the job's state change."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.trainer.models import TrainingJob
from shared.db import utcnow
from shared.events import ArtifactRef, Event, TrainingDone, TrainingFailed

ClaimStatus = Literal["claimed", "done", "failed", "busy"]


class Transactional(Protocol):
    """What :class:`shared.service.ServiceRuntime` offers: a unit of work and an outbox."""

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]: ...

    def emit(self, session: AsyncSession, event: Event) -> None: ...


class JobRepository(Protocol):
    """The port the handler uses (a fake of it serves the unit tests)."""

    async def get(self, adapter_id: str) -> TrainingJob | None: ...

    async def claim(
        self, job: TrainingJob, *, lease_s: float
    ) -> tuple[ClaimStatus, TrainingJob]: ...

    async def heartbeat(
        self, adapter_id: str, *, owner: str, phase: str | None, step: int
    ) -> None: ...

    async def record_checkpoint(
        self, adapter_id: str, *, ref: ArtifactRef, phase: str, step: int
    ) -> None: ...

    async def cancel_requested(self, adapter_id: str) -> bool: ...

    async def complete(
        self, adapter_id: str, *, event: TrainingDone, metrics: dict[str, Any]
    ) -> bool: ...

    async def fail(
        self,
        adapter_id: str | None,
        *,
        event: TrainingFailed,
        status: Literal["failed", "cancelled"] = "failed",
    ) -> None: ...


class SqlJobs:
    """:class:`JobRepository` on the service's database."""

    def __init__(self, tx: Transactional) -> None:
        self.tx = tx

    async def get(self, adapter_id: str) -> TrainingJob | None:
        async with self.tx.transaction() as s:
            return await s.get(TrainingJob, adapter_id)

    async def list(self, limit: int = 50) -> list[TrainingJob]:
        async with self.tx.transaction() as s:
            rows = await s.exec(
                select(TrainingJob).order_by(col(TrainingJob.updated_at).desc()).limit(limit)
            )
            return list(rows.all())

    async def claim(self, job: TrainingJob, *, lease_s: float) -> tuple[ClaimStatus, TrainingJob]:
        """Take the job for ``job.owner`` unless it is finished or held by a live owner.

        A redelivery of the event that started it means its holder died (JetStream redelivers
        only after heartbeats stopped), so it is taken over whatever the lease says.
        """
        now = utcnow()
        try:
            async with self.tx.transaction() as s:
                row = await s.get(TrainingJob, job.adapter_id)
                if row is None:
                    job.attempts, job.created_at, job.updated_at, job.heartbeat_at = (
                        1,
                        now,
                        now,
                        now,
                    )
                    s.add(job)
                    await s.flush()
                    return "claimed", job
                if row.status in ("done", "failed"):
                    return row.status, row  # type: ignore[return-value]
                stale = row.heartbeat_at < now - timedelta(seconds=lease_s)
                mine = row.owner == job.owner or row.event_id == job.event_id
                if row.status == "running" and not (stale or mine):
                    return "busy", row
                result = await s.execute(
                    update(TrainingJob)
                    .where(
                        col(TrainingJob.adapter_id) == job.adapter_id,
                        col(TrainingJob.updated_at) == row.updated_at,
                    )
                    .values(
                        status="running",
                        owner=job.owner,
                        attempts=row.attempts + 1,
                        event_id=job.event_id,
                        run_id=job.run_id,
                        cancel_requested=False,
                        reason=None,
                        updated_at=now,
                        heartbeat_at=now,
                    )
                )
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    return "busy", row
                await s.refresh(row)
                return "claimed", row
        except IntegrityError:  # another replica inserted it first
            return "busy", job

    async def heartbeat(self, adapter_id: str, *, owner: str, phase: str | None, step: int) -> None:
        async with self.tx.transaction() as s:
            await s.execute(
                update(TrainingJob)
                .where(
                    col(TrainingJob.adapter_id) == adapter_id,
                    col(TrainingJob.owner) == owner,
                    col(TrainingJob.status) == "running",
                )
                .values(heartbeat_at=utcnow(), phase=phase, step=step)
            )

    async def record_checkpoint(
        self, adapter_id: str, *, ref: ArtifactRef, phase: str, step: int
    ) -> None:
        now = utcnow()
        async with self.tx.transaction() as s:
            await s.execute(
                update(TrainingJob)
                .where(col(TrainingJob.adapter_id) == adapter_id)
                .values(
                    checkpoint_ref=ref.model_dump_json(),
                    checkpoint_phase=phase,
                    checkpoint_step=step,
                    heartbeat_at=now,
                    updated_at=now,
                )
            )

    async def request_cancel(self, adapter_id: str) -> bool:
        async with self.tx.transaction() as s:
            result = await s.execute(
                update(TrainingJob)
                .where(
                    col(TrainingJob.adapter_id) == adapter_id,
                    col(TrainingJob.status) == "running",
                )
                .values(cancel_requested=True, updated_at=utcnow())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def cancel_requested(self, adapter_id: str) -> bool:
        async with self.tx.transaction() as s:
            row = await s.get(TrainingJob, adapter_id)
            return bool(row and row.cancel_requested)

    async def complete(
        self, adapter_id: str, *, event: TrainingDone, metrics: dict[str, Any]
    ) -> bool:
        """Mark done and record TrainingDone, once: False if it was already done."""
        async with self.tx.transaction() as s:
            row = await s.get(TrainingJob, adapter_id)
            if row is None or row.status == "done":
                return False
            row.status = "done"
            row.adapter_ref = event.adapter.model_dump_json()
            row.metrics_json = json.dumps(metrics)
            row.updated_at = utcnow()
            s.add(row)
            self.tx.emit(s, event)
            return True

    async def fail(
        self,
        adapter_id: str | None,
        *,
        event: TrainingFailed,
        status: Literal["failed", "cancelled"] = "failed",
    ) -> None:
        try:
            async with self.tx.transaction() as s:
                if adapter_id is not None:
                    row = await s.get(TrainingJob, adapter_id)
                    if row is not None:
                        row.status = status
                        row.reason = event.reason
                        row.updated_at = utcnow()
                        s.add(row)
                self.tx.emit(s, event)
        except IntegrityError:  # the same failure was recorded by an earlier delivery
            return


def job_view(job: TrainingJob) -> dict[str, Any]:
    """The public JSON of a job (HTTP and CLI)."""
    loads: Callable[[str | None], Any] = lambda v: json.loads(v) if v else None  # noqa: E731
    return {
        "adapter_id": job.adapter_id,
        "dataset_id": job.dataset_id,
        "base_model": job.base_model,
        "method": job.method,
        "config_hash": job.config_hash,
        "status": job.status,
        "attempts": job.attempts,
        "phase": job.phase,
        "step": job.step,
        "checkpoint": {
            "phase": job.checkpoint_phase,
            "step": job.checkpoint_step,
            "ref": loads(job.checkpoint_ref),
        },
        "adapter": loads(job.adapter_ref),
        "metrics": loads(job.metrics_json),
        "reason": job.reason,
        "cancel_requested": job.cancel_requested,
        "run_id": job.run_id,
        "updated_at": job.updated_at.isoformat(),
    }


__all__ = ["ClaimStatus", "JobRepository", "SqlJobs", "Transactional", "job_view"]
