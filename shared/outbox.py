"""Transactional outbox and inbox.

Outbox: a handler records the events it emits in the *same* database transaction as the
state change that causes them (:func:`record_event`). A relay (:class:`OutboxRelay`) publishes
pending rows with ``Nats-Msg-Id`` = event id and marks them published. A crash between the
commit and the publish loses nothing (the row is still pending); a crash between the publish
and the mark publishes again, and the server drops the duplicate.

Inbox: :class:`Inbox` records which event ids (or business keys) a consumer has completed, in
the same transaction as the effect; a redelivered event finds its key and does nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Integer, String, Text, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from shared import failpoints
from shared.aio import cancel_and_wait, wait_set
from shared.bus import EVENT_TYPE_HEADER, EventBus, PublishError
from shared.db import Database, UTCDateTime, utcnow
from shared.events import Event
from shared.subjects import Namespace
from shared.telemetry import inject_trace_headers

log = logging.getLogger(__name__)


class OutboxMessage(SQLModel, table=True):
    __tablename__ = "bus_outbox"

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    event_id: str = Field(sa_column=Column(String(36), nullable=False, unique=True))
    service: str = Field(sa_column=Column(String(64), nullable=False))
    subject: str = Field(sa_column=Column(String(255), nullable=False))
    event_type: str = Field(sa_column=Column(String(100), nullable=False))
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    headers: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    published_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    last_error: str | None = Field(default=None, sa_column=Column(Text))


class InboxEntry(SQLModel, table=True):
    __tablename__ = "bus_inbox"

    consumer: str = Field(sa_column=Column(String(100), primary_key=True))
    key: str = Field(sa_column=Column(String(255), primary_key=True))
    event_id: str | None = Field(default=None, sa_column=Column(String(36)))
    processed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


def record_event(session: AsyncSession, event: Event, *, service: str, ns: Namespace) -> None:
    """Stage ``event`` for publishing; it commits (or rolls back) with ``session``.

    The current trace context is stored with it, so the relay's publish continues the trace
    of the handler that caused it.
    """
    session.add(
        OutboxMessage(
            event_id=str(event.event_id),
            service=service,
            subject=ns.subject(event.subject),
            event_type=type(event).__name__,
            run_id=event.run_id,
            payload=event.model_dump_json(),
            headers=json.dumps(
                {**inject_trace_headers({}), EVENT_TYPE_HEADER: type(event).__name__}
            ),
            created_at=utcnow(),
        )
    )


class OutboxRelay:
    """Publishes one service's pending outbox rows, in order, until stopped.

    Wakes on :meth:`notify` (call it after a commit that recorded events) or every
    ``poll_interval_s``. Several relays for one service may run: the broker's dedupe window
    absorbs a row published twice.
    """

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        *,
        service: str,
        poll_interval_s: float = 1.0,
        batch_size: int = 100,
    ) -> None:
        self.db = db
        self.bus = bus
        self.service = service
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.service}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                published = await self.drain()
            except Exception as exc:  # DB or broker down: keep the rows, try again later
                log.warning("outbox relay: %r; retrying in %.1fs", exc, self.poll_interval_s)
                published = 0
            if published:
                continue
            await wait_set(self._wake, self.poll_interval_s)
            self._wake.clear()

    async def pending(self) -> int:
        async with self.db.session() as session:
            result = await session.exec(
                select(func.count()).where(
                    col(OutboxMessage.service) == self.service,
                    col(OutboxMessage.published_at).is_(None),
                )
            )
            return int(result.one())

    async def drain(self) -> int:
        """Publish every pending row once; returns how many were published."""
        async with self.db.session() as session:
            result = await session.exec(
                select(OutboxMessage)
                .where(
                    col(OutboxMessage.service) == self.service,
                    col(OutboxMessage.published_at).is_(None),
                )
                .order_by(col(OutboxMessage.id))
                .limit(self.batch_size)
            )
            rows = list(result.all())
        count = 0
        for row in rows:
            try:
                await self.bus.publish_raw(
                    row.subject,
                    row.payload.encode(),
                    msg_id=row.event_id,
                    headers=json.loads(row.headers),
                )
            except PublishError as exc:
                await self._mark_failed(row, exc)
                raise
            failpoints.hit(f"{self.service}.outbox.published")
            await self._mark_published(row)
            count += 1
        return count

    async def _mark_published(self, row: OutboxMessage) -> None:
        async with self.db.session() as session:
            await session.execute(
                update(OutboxMessage)
                .where(col(OutboxMessage.id) == row.id)
                .values(published_at=utcnow(), attempts=col(OutboxMessage.attempts) + 1)
            )

    async def _mark_failed(self, row: OutboxMessage, exc: Exception) -> None:
        try:
            async with self.db.session() as session:
                await session.execute(
                    update(OutboxMessage)
                    .where(col(OutboxMessage.id) == row.id)
                    .values(attempts=col(OutboxMessage.attempts) + 1, last_error=repr(exc)[:2000])
                )
        except Exception:  # the DB may be what is down; the row stays pending either way
            log.debug("could not record publish failure", exc_info=True)


class AlreadyProcessed(Exception):
    """This consumer already completed this key: the caller should do nothing."""


class Inbox:
    """Idempotency for one consumer: has this event (or business key) been completed?"""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer

    async def seen(self, session: AsyncSession, key: str) -> bool:
        row = await session.get(InboxEntry, (self.consumer, key))
        return row is not None

    async def mark(self, session: AsyncSession, key: str, *, event_id: str | None = None) -> None:
        """Record ``key`` as completed, in the caller's transaction.

        Raises :class:`AlreadyProcessed` if another delivery completed it first (the caller's
        transaction must then be rolled back, which leaving the ``db.session()`` block by
        this exception does).
        """
        session.add(
            InboxEntry(consumer=self.consumer, key=key, event_id=event_id, processed_at=utcnow())
        )
        try:
            await session.flush()
        except IntegrityError as exc:
            raise AlreadyProcessed(f"{self.consumer} already processed {key}") from exc


async def complete_once(
    db: Database,
    inbox: Inbox,
    key: str,
    effect: Any,
    *,
    event_id: str | None = None,
) -> bool:
    """Run ``effect(session)`` and mark ``key`` done in one transaction, unless already done.

    Returns False when the key had been completed before (nothing was run).
    """
    try:
        async with db.session() as session:
            if await inbox.seen(session, key):
                return False
            await effect(session)
            await inbox.mark(session, key, event_id=event_id)
    except AlreadyProcessed:
        return False
    return True
