"""Scenarios 3 and 6: PostgreSQL stopped under a running service; poison input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.chaos.ledger import db_outage, poison

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def tuneloop(command: str, world) -> str:  # type: ignore[no-untyped-def]
    """``tuneloop COMMAND`` against the world's broker, as a user runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            command,
            "--nats-url",
            world.nats.url,
            "--prefix",
            world.prefix,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


async def test_postgres_outage_under_a_running_service(nats_server, tmp_path, span_file):
    # Backoff covers the outage (0.5+1+2+2+... over 12 attempts): a shorter-lived copy of the
    # production defaults, which cover 81 s (see README).
    result = await db_outage(
        tmp_path,
        nats_server.url,
        events=20,
        outage_s=6.0,
        backoff_s=(0.5, 1.0, 2.0),
        max_deliver=12,
    )
    print(result.row(), result.notes)
    assert result.faults == ["postgres-stop"]
    assert result.ready_during_outage is False  # /readyz said 503 while the database was gone
    assert result.ready_after is True
    assert result.acknowledged == set(range(20))
    assert result.handled == set(range(20)), f"lost: {sorted(result.lost)}"
    assert result.retried > 0  # handlers failed during the outage and were retried
    assert result.dead_letters == 0  # ... and no message was given up on
    assert result.duplicate_effects == 0


async def test_poison_input_is_dead_lettered_and_does_not_block(make_world):
    world = await make_world(consumers=1, max_deliver=4)
    result = await poison(world, good=10)
    print(result.row(), result.notes)
    assert result.handled == set(range(10))
    assert result.dead_letters == 2  # the crashing payload and the non-event
    assert result.duplicate_effects == 0
    listing = tuneloop("dead-letters", world)
    assert "poison payload: this handler always crashes on it" in listing
    assert "deliveries=4" in listing
    assert "schema validation failed" in listing
    status = tuneloop("status", world)
    assert "dead letters: 2 (inspect with `tuneloop dead-letters`)" in status, status


async def test_postgres_outage_longer_than_the_retry_budget(nats_server, tmp_path, span_file):
    # Budget 0.2 + 0.2 s over 3 deliveries, outage 4 s: the same shape as the defaults'
    # 81 s budget against a two-minute outage.
    result = await db_outage(
        tmp_path,
        nats_server.url,
        events=10,
        outage_s=4.0,
        backoff_s=(0.2,),
        max_deliver=3,
        recover_timeout_s=10.0,
    )
    print(result.row(), result.notes)
    assert result.dead_letters == 0
    assert result.handled == set(range(10))
