"""shared/db.py: migrations and a repository round trip on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect
from sqlmodel import col, select

from shared.db import Database
from shared.events import DatasetSubmitted
from shared.interactions import Interaction
from shared.outbox import Inbox, InboxEntry, OutboxMessage, complete_once, record_event
from shared.subjects import Namespace

pytestmark = pytest.mark.integration


async def test_migrations_create_the_schema_and_are_idempotent(db: Database):
    await db.migrate()  # second run: nothing to do, no error
    async with db.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert {"bus_outbox", "bus_inbox", "gateway_interactions", "alembic_version"} <= tables


async def test_outbox_row_round_trip_with_timezone_aware_datetimes(db: Database):
    event = DatasetSubmitted(run_id="run-x", producer="p", dataset_name="d", files=["file:///d"])
    async with db.session() as session:
        record_event(session, event, service="ingest", ns=Namespace("tuneloop"))
    async with db.session() as session:
        row = (await session.exec(select(OutboxMessage))).one()
    assert row.event_id == str(event.event_id)
    assert row.subject == "tuneloop.dataset.submitted"
    assert DatasetSubmitted.model_validate_json(row.payload) == event
    assert row.created_at.tzinfo is not None
    assert abs(row.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert row.published_at is None


async def test_datetimes_in_other_zones_come_back_as_the_same_instant(db: Database):
    plus_five = datetime(2026, 11, 21, 17, 30, tzinfo=timezone(timedelta(hours=5)))
    async with db.session() as session:
        session.add(
            Interaction(
                id="r1",
                created_at=plus_five,
                served_model_name="m",
                deployment_id="d",
                request="[]",
                response_text="hi",
                status_code=200,
                latency_ms=1.5,
            )
        )
    async with db.session() as session:
        got = (await session.exec(select(Interaction).where(col(Interaction.id) == "r1"))).one()
    assert got.created_at == plus_five
    assert got.created_at.utcoffset() == timedelta(0)


async def test_naive_datetimes_are_refused(db: Database):
    with pytest.raises(Exception, match="naive datetime"):
        async with db.session() as session:
            session.add(InboxEntry(consumer="c", key="k", processed_at=datetime(2026, 1, 1)))


async def test_inbox_makes_the_second_completion_a_no_op(db: Database):
    inbox = Inbox("trainer")
    effects: list[str] = []

    async def effect(session) -> None:
        effects.append("ran")

    assert await complete_once(db, inbox, "dataset-1", effect) is True
    assert await complete_once(db, inbox, "dataset-1", effect) is False
    assert await complete_once(db, inbox, "dataset-2", effect) is True
    assert effects == ["ran", "ran"]


async def test_failed_effect_rolls_back_and_can_run_again(db: Database):
    inbox = Inbox("trainer")

    async def broken(session) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await complete_once(db, inbox, "k", broken)
    async with db.session() as session:
        assert not await inbox.seen(session, "k")


async def test_ping_reports_an_unreachable_database(tmp_path):
    db = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    assert await db.ping() is False
    await db.dispose()
