"""Child processes for integration tests that need a real process boundary (kill, tracing).

python -m tests.integration.procs consumer NATS_URL PREFIX DB_URL MARKER_DIR slow|fast
python -m tests.integration.procs outbox-crash NATS_URL PREFIX DB_URL
python -m tests.integration.procs publish NATS_URL PREFIX SERVICE
python -m tests.integration.procs consume-one NATS_URL PREFIX SERVICE
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from sqlalchemy import text

from shared.bus import BusSettings, Delivery, EventBus
from shared.db import Database
from shared.events import DatasetSubmitted
from shared.outbox import Inbox, complete_once, record_event
from shared.subjects import Namespace
from shared.telemetry import current_trace_id, setup_telemetry, tracer


def settings(nats_url: str, prefix: str) -> BusSettings:
    return BusSettings(
        nats_url=nats_url, prefix=prefix, ack_wait_s=1.5, max_deliver=5, backoff_s=(0.2,)
    )


async def consumer(nats_url: str, prefix: str, db_url: str, marker_dir: str, mode: str) -> None:
    db = Database(db_url)
    inbox = Inbox("effects")
    markers = Path(marker_dir)

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        (markers / f"delivered-{os.getpid()}-{delivery.attempt}").touch()

        async def effect(session) -> None:  # type: ignore[no-untyped-def]
            await session.execute(
                text("INSERT INTO test_effects (event_id, pid) VALUES (:e, :p)"),
                {"e": str(event.event_id), "p": os.getpid()},
            )

        await complete_once(db, inbox, str(event.event_id), effect)
        (markers / f"committed-{os.getpid()}").touch()
        if mode == "slow":  # committed but not yet acked: the worst moment to die
            await asyncio.sleep(600)

    bus = EventBus(settings(nats_url, prefix), service="effects")
    bus.subscribe(DatasetSubmitted, handle)
    async with bus:
        (markers / f"ready-{os.getpid()}").touch()
        await asyncio.sleep(600)


async def outbox_crash(nats_url: str, prefix: str, db_url: str) -> None:
    db = Database(db_url)
    event = DatasetSubmitted(
        run_id="run-crash", producer="crasher", dataset_name="c", files=["file:///c"]
    )
    async with db.session() as session:
        record_event(session, event, service="crasher", ns=Namespace(prefix))
    print(event.event_id, flush=True)
    # Committed, not yet published: die the hard way.
    os.kill(os.getpid(), signal.SIGKILL)


async def publish(nats_url: str, prefix: str, service: str) -> None:
    setup_telemetry(service)
    async with EventBus(settings(nats_url, prefix), service=service) as bus:
        with tracer("test").start_as_current_span("upload"):
            await bus.publish(
                DatasetSubmitted(
                    run_id="run-trace", producer=service, dataset_name="t", files=["file:///t"]
                )
            )
            print(current_trace_id(), flush=True)


async def consume_one(nats_url: str, prefix: str, service: str) -> None:
    setup_telemetry(service)
    done = asyncio.Event()

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        with tracer("test").start_as_current_span("handle"):
            print(current_trace_id(), flush=True)
        done.set()

    bus = EventBus(settings(nats_url, prefix), service=service)
    bus.subscribe(DatasetSubmitted, handle)
    async with bus:
        await asyncio.wait_for(done.wait(), 30)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    runner = {
        "consumer": consumer,
        "outbox-crash": outbox_crash,
        "publish": publish,
        "consume-one": consume_one,
    }[command]
    asyncio.run(runner(*args))  # type: ignore[operator]
