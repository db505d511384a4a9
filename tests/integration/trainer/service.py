"""Helpers to run the trainer service in-process against the test's broker and database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats

from services.trainer.app import build
from services.trainer.settings import TrainerSettings
from shared.bus import BusSettings
from shared.events import Event
from shared.service import ServiceRuntime
from shared.settings import CommonSettings
from tests.integration.streams import read_stream

# A few steps of the tiny model: enough to be real training, cheap enough for CI.
TEST_TRAINING = {
    "profile": "cpu-tiny",
    "base_model": "tiny",
    "overrides": {"max_steps_per_phase": 4},
    "prompts": ["remind me to pay rent friday"],
    "max_new_tokens": 4,
    "checkpoint_every_steps": 100,
    # One thread: on a shared 2-core machine two OpenMP threads spin against each other
    # (measured: 20 tiny steps in 1.4 s with one thread, 46 s with two under load).
    "threads": 1,
}


def common_settings(
    bus: BusSettings, database_url: str, home: Path, store_url: str
) -> CommonSettings:
    return CommonSettings(
        home=home,
        nats_url=bus.nats_url,
        subject_prefix=bus.prefix,
        artifact_store_url=store_url,
        ack_wait_s=bus.ack_wait_s,
        max_deliver=bus.max_deliver,
        duplicate_window_s=bus.duplicate_window_s,
        **{"DATABASE_URL": database_url},
    )


@asynccontextmanager
async def running_trainer(
    bus: BusSettings, database_url: str, tmp_path: Path, store_url: str, **overrides: Any
) -> AsyncIterator[ServiceRuntime]:
    settings = TrainerSettings(
        **{**TEST_TRAINING, "work_dir": tmp_path / "work", "ack_wait_s": 10.0, **overrides}
    )
    runtime, _ = build(settings, common_settings(bus, database_url, tmp_path / "home", store_url))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def events_of(bus: BusSettings, event_type: type[Event]) -> list[Any]:
    from shared.subjects import Namespace

    ns = Namespace(bus.prefix)
    msgs = await read_stream(bus.nats_url, ns.stream, ns.subject(event_type.subject))
    return [event_type.model_validate_json(m.data) for m in msgs]


async def dead_letters(bus: BusSettings) -> list[Any]:
    from shared.subjects import Namespace

    ns = Namespace(bus.prefix)
    return await read_stream(bus.nats_url, ns.dead_letter_stream)


async def consumer_done_through(bus: BusSettings, durable: str, seq: int) -> bool:
    """Has the consumer acknowledged (or terminated) everything up to stream seq ``seq``?"""
    from shared.subjects import Namespace

    nc = await nats.connect(bus.nats_url)
    try:
        info = await nc.jetstream().consumer_info(Namespace(bus.prefix).stream, durable)
        return bool(info.ack_floor and info.ack_floor.stream_seq >= seq)
    finally:
        await nc.close()


async def at_least(items: Awaitable[list[Any]], n: int) -> list[Any] | None:
    """For ``eventually``: the list once it has ``n`` items (events reach the stream through
    the outbox relay, after the message that caused them was acked)."""
    got = await items
    return got if len(got) >= n else None


def metadata_of(adapter_dir: Path) -> dict[str, Any]:
    return dict(json.loads((adapter_dir / "training_metadata.json").read_text()))
