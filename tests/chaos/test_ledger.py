"""Scenarios 1 and 2: the broker and consumers SIGKILLed under load, nothing acknowledged lost,
nothing done twice."""

from __future__ import annotations

import pytest

from tests.chaos.ledger import broker_restart, ledger

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def assert_ledger_holds(result) -> None:  # type: ignore[no-untyped-def]
    print(result.row(), result.faults, result.notes)
    assert result.faults, "the nemesis injected nothing"
    assert not result.lost, f"acknowledged but never handled: {sorted(result.lost)}"
    assert result.duplicate_effects == 0
    assert result.dead_letters == 0
    # Only events that were published can have been handled (no phantom effects).
    assert result.handled <= result.acknowledged | result.unknown


async def test_ledger_publish_under_consumer_and_broker_kills(make_world):
    world = await make_world(consumers=2)
    result = await ledger(world, events=150, faults=5, seed=12)
    assert_ledger_holds(result)
    assert any(f.startswith("broker-kill") for f in result.faults)
    assert any(f.startswith("consumer-kill") for f in result.faults)
    assert result.acknowledged  # the run made progress


async def test_ledger_outbox_under_consumer_and_broker_kills(make_world):
    world = await make_world(consumers=2)
    result = await ledger(world, events=150, faults=5, seed=7, via_outbox=True)
    assert_ledger_holds(result)
    # Committed to the outbox = acknowledged: every single one must have been handled.
    assert result.handled == set(range(150))


async def test_broker_restart_mid_burst_and_between_batches(make_world):
    world = await make_world(consumers=2)
    pids = [p.pid for p in world.procs]
    result = await broker_restart(world, events=120)
    print(result.row(), result.notes)
    assert result.acknowledged == set(range(120))
    assert result.handled == set(range(120))
    assert result.duplicate_effects == 0
    assert result.dead_letters == 0
    # The same consumer processes did all of it: they reconnected by themselves.
    assert [p.pid for p in world.procs] == pids
    assert all(p.poll() is None for p in world.procs)
