"""A consumer process for the chaos tier: handles numbered ledger events exactly once.

python -m tests.chaos.worker NATS_URL PREFIX DB_URL READY_DIR MAX_DELIVER

Each delivery of ``DatasetSubmitted(dataset_name="n<k>")`` runs its side effect (a row in
``chaos_effects``, no unique key: a second row would be a duplicate side effect) through the
inbox, then logs the delivery in ``chaos_deliveries`` (``absorbed`` = the inbox said done
before). ``dataset_name="poison"`` crashes the handler every time.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.bus import BusSettings, Delivery, EventBus
from shared.db import Database
from shared.events import DatasetSubmitted
from shared.outbox import Inbox, complete_once

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS chaos_effects "
    "(n INTEGER NOT NULL, event_id VARCHAR(64), pid INTEGER)",
    "CREATE TABLE IF NOT EXISTS chaos_deliveries "
    "(n INTEGER NOT NULL, pid INTEGER, attempt INTEGER, absorbed BOOLEAN)",
)


def chaos_bus_settings(nats_url: str, prefix: str, max_deliver: int = 30) -> BusSettings:
    # Many deliveries allowed: a message may meet several SIGKILLed consumers in a row.
    return BusSettings(
        nats_url=nats_url,
        prefix=prefix,
        ack_wait_s=2.0,
        max_deliver=max_deliver,
        backoff_s=(0.2, 0.5, 1.0),
        duplicate_window_s=600.0,
        publish_timeout_s=2.0,
    )


def make_handler(db: Database, pid: int):  # type: ignore[no-untyped-def]
    inbox = Inbox("chaos-ledger")

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        if event.dataset_name == "poison":
            raise ValueError("poison payload: this handler always crashes on it")
        n = int(event.dataset_name.removeprefix("n"))

        async def effect(session: AsyncSession) -> None:
            await session.execute(
                text("INSERT INTO chaos_effects (n, event_id, pid) VALUES (:n, :e, :p)"),
                {"n": n, "e": str(event.event_id), "p": pid},
            )

        done = await complete_once(db, inbox, str(event.event_id), effect)
        async with db.session() as session:
            await session.execute(
                text(
                    "INSERT INTO chaos_deliveries (n, pid, attempt, absorbed) "
                    "VALUES (:n, :p, :a, :b)"
                ),
                {"n": n, "p": pid, "a": delivery.attempt, "b": not done},
            )

    return handle


async def main(nats_url: str, prefix: str, db_url: str, ready_dir: str, max_deliver: str) -> None:
    db = Database(db_url)
    bus = EventBus(chaos_bus_settings(nats_url, prefix, int(max_deliver)), service="chaos")
    bus.subscribe(DatasetSubmitted, make_handler(db, os.getpid()), durable="chaos-ledger")
    async with bus:
        (Path(ready_dir) / f"ready-{os.getpid()}").touch()
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
