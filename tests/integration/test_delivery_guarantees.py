"""Crashes at the worst moments: a consumer killed mid-work, a producer killed after commit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.bus import EventBus
from shared.events import DatasetSubmitted
from shared.outbox import OutboxRelay, record_event
from shared.subjects import Namespace
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.procs", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_consumer_killed_mid_work_is_redelivered_and_effect_happens_once(
    bus_settings, db, database_url, tmp_path
):
    async with db.session() as session:
        await session.execute(text("CREATE TABLE test_effects (event_id VARCHAR(64), pid INTEGER)"))
    markers = tmp_path / "markers"
    markers.mkdir()
    url, prefix = bus_settings.nats_url, bus_settings.prefix
    first = spawn("consumer", url, prefix, database_url, str(markers), "slow")
    try:
        await eventually(lambda: list(markers.glob("ready-*")), what="consumer ready")
        async with EventBus(bus_settings, service="producer") as producer:
            event = DatasetSubmitted(
                run_id="r", producer="p", dataset_name="k", files=["file:///k"]
            )
            await producer.publish(event)
        await eventually(lambda: (markers / f"committed-{first.pid}").exists(), what="first commit")
        first.kill()  # SIGKILL after the effect committed, before the ack
        first.wait()
        second = spawn("consumer", url, prefix, database_url, str(markers), "fast")
        try:
            await eventually(
                lambda: (markers / f"committed-{second.pid}").exists(),
                timeout_s=30,
                what="redelivery to the new consumer",
            )
        finally:
            second.kill()
            second.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert (markers / f"delivered-{second.pid}-2").exists()
    async with db.session() as session:
        rows = (await session.exec(text("SELECT event_id, pid FROM test_effects"))).all()
    assert rows == [(str(event.event_id), first.pid)]


async def test_outbox_crash_after_commit_before_publish_loses_nothing(
    bus_settings, db, database_url
):
    ns = Namespace(bus_settings.prefix)
    crasher = spawn("outbox-crash", bus_settings.nats_url, bus_settings.prefix, database_url)
    out, err = crasher.communicate(timeout=60)
    assert crasher.returncode == -9, err.decode()
    event_id = out.decode().strip()

    async with EventBus(bus_settings, service="crasher") as bus:
        relay = OutboxRelay(db, bus, service="crasher", poll_interval_s=0.1)
        assert await relay.pending() == 1
        relay.start()
        await eventually(lambda: _pending_is(relay, 0), what="relay drained")
        await relay.stop()
    messages = await read_stream(bus_settings.nats_url, ns.stream)
    assert [json.loads(m.data)["event_id"] for m in messages] == [event_id]


async def test_outbox_republish_after_crash_between_publish_and_mark_is_deduplicated(
    bus_settings, db
):
    """The relay died after the PubAck but before marking the row: the next relay
    publishes again and the server drops it (same Nats-Msg-Id)."""
    ns = Namespace(bus_settings.prefix)
    event = DatasetSubmitted(run_id="r", producer="p", dataset_name="d", files=["file:///d"])
    async with db.session() as session:
        record_event(session, event, service="svc", ns=ns)
    async with EventBus(bus_settings, service="svc") as bus:
        relay = OutboxRelay(db, bus, service="svc")
        # Publish the row without marking it, as a relay killed mid-drain would have.
        relay._mark_published = _noop  # type: ignore[method-assign]
        assert await relay.drain() == 1
        relay = OutboxRelay(db, bus, service="svc")
        assert await relay.drain() == 1
        assert await relay.pending() == 0
    messages = await read_stream(bus_settings.nats_url, ns.stream)
    assert len(messages) == 1


async def test_relay_keeps_rows_while_broker_is_unreachable(db, nats_server, prefix):
    """A relay whose publish fails leaves the row pending with the error recorded."""
    from shared.bus import BusSettings, PublishError

    ns = Namespace(prefix)
    async with db.session() as session:
        record_event(
            session,
            DatasetSubmitted(run_id="r", producer="p", dataset_name="d", files=["file:///d"]),
            service="s",
            ns=ns,
        )
    settings = BusSettings(nats_url=nats_server.url, prefix=prefix, publish_timeout_s=0.5)
    bus = EventBus(settings, service="s")
    await bus.broker.connect()  # connected, but the stream was never created
    try:
        relay = OutboxRelay(db, bus, service="s")
        with pytest.raises(PublishError):
            await relay.drain()
        assert await relay.pending() == 1
    finally:
        await bus.close()


async def _noop(row) -> None:
    return None


async def _pending_is(relay: OutboxRelay, n: int) -> bool:
    return await relay.pending() == n


async def test_one_trace_id_across_publish_and_consume_in_two_processes(bus_settings, span_file):
    url, prefix = bus_settings.nats_url, bus_settings.prefix
    # Create the streams first so the consumer can attach before the publish.
    async with EventBus(bus_settings, service="setup"):
        pass
    consumer = spawn("consume-one", url, prefix, "svc-consumer")
    await asyncio.sleep(1.5)
    publisher = spawn("publish", url, prefix, "svc-producer")
    pub_out, pub_err = publisher.communicate(timeout=60)
    con_out, con_err = consumer.communicate(timeout=60)
    assert publisher.returncode == 0, pub_err.decode()
    assert consumer.returncode == 0, con_err.decode()
    trace_id = pub_out.decode().split()[0]
    assert len(trace_id) == 32
    assert con_out.decode().split()[0] == trace_id

    spans = [json.loads(line) for line in span_file.read_text().splitlines()]
    mine = [s for s in spans if s["trace_id"] == trace_id]
    by_name = {(s["service"], s["name"]): s for s in mine}
    publish = by_name[("svc-producer", "publish dataset.submitted")]
    consume = by_name[("svc-consumer", "consume dataset.submitted")]
    assert consume["parent_span_id"] == publish["span_id"]
    assert consume["attributes"]["tuneloop.run_id"] == "run-trace"
