"""shared/bus.py against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import itertools
import json

import nats
import pytest

from shared.bus import (
    DLQ_DELIVERIES_HEADER,
    DLQ_REASON_HEADER,
    Delivery,
    EventBus,
    PermanentError,
)
from shared.events import DatasetSubmitted, TrainingFailed
from shared.subjects import Namespace
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration


def submitted(n: int = 0) -> DatasetSubmitted:
    return DatasetSubmitted(
        run_id=f"run-{n}", producer="test", dataset_name=f"d{n}", files=[f"file:///tmp/{n}.jsonl"]
    )


async def test_publish_reaches_durable_consumer_and_duplicate_publish_is_handled_once(
    bus_settings,
):
    seen: list[tuple[DatasetSubmitted, int]] = []

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        seen.append((event, delivery.attempt))

    consumer = EventBus(bus_settings, service="consumer")
    consumer.subscribe(DatasetSubmitted, handle)
    async with EventBus(bus_settings, service="producer") as producer, consumer:
        event = submitted(1)
        first = await producer.publish(event)
        again = await producer.publish(event)  # a retried publish: same Nats-Msg-Id
        assert not first.duplicate
        assert again.duplicate
        assert again.seq == first.seq
        await producer.publish(submitted(2))
        await eventually(lambda: len(seen) >= 2, what="two deliveries")
        await asyncio.sleep(0.5)  # room for a wrongful third delivery
    assert [e.dataset_name for e, _ in seen] == ["d1", "d2"]
    assert seen[0][0] == event
    assert all(attempt == 1 for _, attempt in seen)


async def test_failing_handler_is_retried_with_backoff_then_dead_lettered(bus_settings):
    attempts: list[float] = []
    good: list[str] = []
    loop = asyncio.get_running_loop()

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        if event.dataset_name == "bad":
            attempts.append(loop.time())
            raise RuntimeError("disk on fire")
        good.append(event.dataset_name)

    bus = EventBus(bus_settings, service="svc")
    bus.subscribe(DatasetSubmitted, handle)
    ns = Namespace(bus_settings.prefix)
    async with bus:
        bad = DatasetSubmitted(run_id="r", producer="t", dataset_name="bad", files=["file:///x"])
        await bus.publish(bad)
        await bus.publish(submitted(7))
        await eventually(lambda: good == ["d7"], what="the good message")
        dead = await eventually(
            lambda: read_stream(bus_settings.nats_url, ns.dead_letter_stream), what="dead letter"
        )
        await asyncio.sleep(0.8)
    assert len(attempts) == bus_settings.max_deliver == 3
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # nak delays 0.2 s then 0.4 s: the gaps grow and are at least the configured backoff
    assert gaps[0] >= 0.18 and gaps[1] >= 0.38, gaps
    assert len(dead) == 1
    assert dead[0].subject == ns.dead_letter("dataset.submitted")
    assert json.loads(dead[0].data) == json.loads(bad.model_dump_json())
    assert "disk on fire" in dead[0].headers[DLQ_REASON_HEADER]
    assert dead[0].headers[DLQ_DELIVERIES_HEADER] == "3"


async def test_schema_invalid_payload_is_dead_lettered_on_first_delivery(bus_settings):
    handled: list[str] = []

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        handled.append(event.dataset_name)

    bus = EventBus(bus_settings, service="svc")
    bus.subscribe(DatasetSubmitted, handle)
    ns = Namespace(bus_settings.prefix)
    garbage = b'{"run_id": "r", "producer": "x", "dataset_name": "../../etc", "files": []}'
    async with bus:
        nc = await nats.connect(bus_settings.nats_url)
        js = nc.jetstream()
        await js.publish(ns.subject("dataset.submitted"), garbage, stream=ns.stream)
        await js.publish(ns.subject("dataset.submitted"), b"\xff\xfe not json", stream=ns.stream)
        await nc.close()
        await bus.publish(submitted(3))
        await eventually(lambda: handled == ["d3"], what="the good message after garbage")
        dead = await eventually(
            lambda: _at_least(read_stream(bus_settings.nats_url, ns.dead_letter_stream), 2),
            what="two dead letters",
        )
    assert [m.data for m in dead] == [garbage, b"\xff\xfe not json"]
    assert all(m.headers[DLQ_DELIVERIES_HEADER] == "1" for m in dead)
    assert all("schema validation failed" in m.headers[DLQ_REASON_HEADER] for m in dead)


async def test_permanent_error_is_dead_lettered_without_retry(bus_settings):
    calls = 0

    async def handle(event: TrainingFailed, delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("method lora is forbidden by policy")

    bus = EventBus(bus_settings, service="svc")
    bus.subscribe(TrainingFailed, handle)
    ns = Namespace(bus_settings.prefix)
    async with bus:
        await bus.publish(TrainingFailed(run_id="r", producer="t", reason="x"))
        dead = await eventually(
            lambda: read_stream(bus_settings.nats_url, ns.dead_letter_stream), what="dead letter"
        )
        await asyncio.sleep(0.5)
    assert calls == 1
    assert dead[0].headers[DLQ_REASON_HEADER] == "method lora is forbidden by policy"


@pytest.mark.parametrize("heartbeat", [True, False])
async def test_heartbeat_keeps_long_handler_from_redelivery(bus_settings, heartbeat):
    """Two replicas share the durable; the first takes a message and works 3x ack_wait."""
    deliveries: list[tuple[str, int]] = []
    ack_wait = 1.0

    def handler(replica: str):
        async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
            deliveries.append((replica, delivery.attempt))
            await asyncio.sleep(3 * ack_wait)

        return handle

    first = EventBus(bus_settings, service="svc")
    first.subscribe(DatasetSubmitted, handler("a"), ack_wait_s=ack_wait, heartbeat=heartbeat)
    second = EventBus(bus_settings, service="svc")
    second.subscribe(DatasetSubmitted, handler("b"), ack_wait_s=ack_wait, heartbeat=heartbeat)
    async with first:
        await first.publish(submitted(1))
        await eventually(lambda: deliveries, what="first delivery")
        async with second:
            await asyncio.sleep(3 * ack_wait + 1.0)
    if heartbeat:
        assert deliveries == [("a", 1)]
    else:  # the control: without the heartbeat the other replica gets it again
        assert len(deliveries) >= 2
        assert deliveries[1] == ("b", 2)


async def _at_least(coro, n):
    items = await coro
    return items if len(items) >= n else None
