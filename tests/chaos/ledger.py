"""The chaos harness: real nats-server, real PostgreSQL, consumer processes, and a nemesis.

Used by ``tests/chaos`` (assertions) and ``bench/chaos.py`` (the table). Every scenario
returns a :class:`Result` with the Jepsen-style ledger: each publish is *acknowledged*
(PubAck, or an outbox row committed), *failed* (the server said it was not stored) or
*unknown* (timeout, connection lost mid-request); *handled* = distinct events whose side
effect exists; *duplicated* = redeliveries the inbox absorbed; *duplicate effects* = events
with more than one effect row (must be 0); *lost* = acknowledged but never handled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError
from sqlalchemy import text

from shared.bus import EventBus, PublishError
from shared.db import Database
from shared.embedded import NatsServer, free_port
from shared.events import DatasetSubmitted
from shared.outbox import OutboxRelay, record_event
from shared.subjects import Namespace
from tests.chaos.worker import SCHEMA, chaos_bus_settings

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


def ledger_event(n: int) -> DatasetSubmitted:
    return DatasetSubmitted(
        run_id=f"ledger-{n}", producer="chaos", dataset_name=f"n{n}", files=["file:///ledger"]
    )


@dataclass
class Result:
    scenario: str
    faults: list[str] = field(default_factory=list)
    published: int = 0
    acknowledged: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)
    handled: set[int] = field(default_factory=set)
    duplicated: int = 0
    duplicate_effects: int = 0
    dead_letters: int = 0
    recover_s: float = 0.0
    retried: int = 0
    ready_during_outage: bool | None = None
    ready_after: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> set[int]:
        return self.acknowledged - self.handled

    def row(self) -> list[str]:
        kinds: dict[str, int] = {}
        for f in self.faults:
            kinds[f.split(" ")[0]] = kinds.get(f.split(" ")[0], 0) + 1
        return [
            self.scenario,
            ", ".join(f"{k}x{v}" for k, v in sorted(kinds.items())) or "-",
            f"{len(self.acknowledged)}/{len(self.failed)}/{len(self.unknown)}",
            str(len(self.handled)),
            f"{self.duplicated} ({self.duplicate_effects} eff)",
            str(len(self.lost)),
            str(self.dead_letters),
            f"{self.recover_s:.1f}",
        ]


class ChaosWorld:
    """One nats-server on a fixed port and store (restartable at the same URL), one
    PostgreSQL database, and consumer processes sharing one durable."""

    def __init__(self, root: Path, db_url: str, *, consumers: int = 2, max_deliver: int = 30):
        self.root = root
        self.db_url = db_url
        self.db = Database(db_url)
        self.prefix = f"c{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.n_consumers = consumers
        self.max_deliver = max_deliver
        self.nats = NatsServer(root / "nats", port=self.port)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ready_dir = root / "ready"
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self.settings = chaos_bus_settings(self.nats.url, self.prefix, max_deliver)

    async def start(self) -> None:
        self.nats.start()
        async with self.db.session() as session:
            for ddl in SCHEMA:
                await session.execute(text(ddl))
        await self.db.migrate()
        for _ in range(self.n_consumers):
            self.procs.append(self.spawn_consumer())
        await self.wait_ready(self.procs)

    def spawn_consumer(self) -> subprocess.Popen[bytes]:
        log = (self.root / "consumers.log").open("ab")
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.worker",
                self.nats.url,
                self.prefix,
                self.db_url,
                str(self.ready_dir),
                str(self.max_deliver),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, procs: list[subprocess.Popen[bytes]], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not all((self.ready_dir / f"ready-{p.pid}").exists() for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError("consumers did not become ready")
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"consumer {p.pid} exited with {p.returncode}")
            await asyncio.sleep(0.1)

    def kill_consumer(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def restart_consumer(self, i: int) -> None:
        self.procs[i] = self.spawn_consumer()

    def kill_broker(self) -> None:
        self.nats.kill()
        self.nats.stop()  # closes its log

    def restart_broker(self) -> None:
        self.nats = NatsServer(self.root / "nats", port=self.port)
        self.nats.start()

    async def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.nats.stop()
        await self.db.dispose()

    # ------------------------------------------------------------------ observations

    async def effects(self) -> tuple[set[int], int]:
        """Handled event numbers, and how many of them have more than one effect row."""
        async with self.db.session() as session:
            rows = (
                await session.execute(text("SELECT n, count(*) FROM chaos_effects GROUP BY n"))
            ).all()
        return {int(n) for n, _ in rows}, sum(1 for _, c in rows if c > 1)

    async def absorbed(self) -> int:
        async with self.db.session() as session:
            value = (
                await session.execute(text("SELECT count(*) FROM chaos_deliveries WHERE absorbed"))
            ).scalar_one()
        return int(value)

    async def dead_letters(self) -> int:
        nc = await nats.connect(self.nats.url)
        try:
            info = await nc.jetstream().stream_info(Namespace(self.prefix).dead_letter_stream)
            return int(info.state.messages)
        finally:
            await nc.close()

    async def wait_handled(self, wanted: set[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            handled, _ = await self.effects()
            if wanted <= handled:
                return True
            await asyncio.sleep(0.2)
        return False

    async def finish(self, result: Result, *, settle_s: float = 3.0, timeout_s: float = 60) -> None:
        """Wait for every acknowledged event (or time out), then let stray redeliveries land."""
        t0 = time.monotonic()
        await self.wait_handled(result.acknowledged, timeout_s)
        result.recover_s = time.monotonic() - t0
        await asyncio.sleep(settle_s)
        result.handled, result.duplicate_effects = await self.effects()
        result.duplicated = await self.absorbed()
        result.dead_letters = await self.dead_letters()


# ---------------------------------------------------------------------- producers


async def publish_classified(bus: EventBus, n: int, result: Result) -> None:
    """One publish, classified the Jepsen way (no retry: the point is to see all three)."""
    result.published += 1
    try:
        await bus.publish(ledger_event(n))
    except PublishError as exc:
        if isinstance(exc.__cause__, NoRespondersError | NoStreamResponseError):
            result.failed.add(n)  # the server answered 503: no stream took it
        else:
            result.unknown.add(n)  # timeout / connection lost: it may or may not be stored
        return
    result.acknowledged.add(n)


async def publish_until_acked(bus: EventBus, n: int, result: Result, timeout_s: float) -> None:
    """What a producer does in practice: retry the same event (same Nats-Msg-Id) until a
    PubAck; the broker's duplicate window drops the copies."""
    deadline = time.monotonic() + timeout_s
    result.published += 1
    event = ledger_event(n)  # built once: every retry carries the same event id
    while True:
        try:
            await bus.publish(event)
        except PublishError:
            if time.monotonic() > deadline:
                result.unknown.add(n)
                return
            await asyncio.sleep(0.2)
            continue
        result.acknowledged.add(n)
        return


async def _nemesis(
    world: ChaosWorld,
    result: Result,
    rng: random.Random,
    *,
    faults: int,
    broker: bool,
    consumers: bool,
    stop: asyncio.Event,
) -> None:
    """Kill things at random points until ``faults`` faults were injected."""
    choices = (["broker"] if broker else []) + (["consumer"] if consumers else [])
    # Each kind at least once (in a random order), then at random.
    plan = rng.sample(choices, len(choices)) + [rng.choice(choices) for _ in range(faults)]
    for what in plan[: max(faults, len(choices))]:
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        if what == "broker":
            world.kill_broker()
            result.faults.append(f"broker-kill at {time.monotonic():.1f}")
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            await asyncio.to_thread(world.restart_broker)
        else:
            i = rng.randrange(len(world.procs))
            world.kill_consumer(i)
            result.faults.append(f"consumer-kill pid {world.procs[i].pid}")
            await asyncio.sleep(rng.uniform(0.0, 0.8))
            world.restart_consumer(i)
    stop.set()


async def ledger(
    world: ChaosWorld,
    *,
    events: int,
    faults: int,
    seed: int,
    via_outbox: bool = False,
    broker: bool = True,
    consumers: bool = True,
) -> Result:
    """Scenario 2: numbered events published while the nemesis kills consumers and broker.

    ``via_outbox``: each event is committed to the outbox (acknowledged = committed) and a
    relay publishes it, as a service's handler does."""
    result = Result("ledger (outbox)" if via_outbox else "ledger (publish)")
    rng = random.Random(seed)  # the nemesis's own: the producer's pacing must not shift it
    pace = random.Random(seed + 1)
    stop = asyncio.Event()
    bus = EventBus(world.settings, service="chaos-producer")
    await bus.start()
    relay = OutboxRelay(world.db, bus, service="chaos-producer", poll_interval_s=0.2)
    if via_outbox:
        relay.start()
    nemesis = asyncio.create_task(
        _nemesis(world, result, rng, faults=faults, broker=broker, consumers=consumers, stop=stop)
    )
    try:
        n = 0
        while n < events or not stop.is_set():
            if n >= events:
                await asyncio.sleep(0.1)
                continue
            if via_outbox:
                async with world.db.session() as session:
                    record_event(session, ledger_event(n), service="chaos-producer", ns=bus.ns)
                relay.notify()
                result.published += 1
                result.acknowledged.add(n)
            else:
                await publish_classified(bus, n, result)
            n += 1
            await asyncio.sleep(pace.uniform(0.0, 0.03))
        await nemesis
        for i, p in enumerate(world.procs):  # anything the nemesis left dead comes back
            if p.poll() is not None:
                world.restart_consumer(i)
        if via_outbox:
            for _ in range(300):  # the relay drains what the broker kills left pending
                if not await relay.pending():
                    break
                await asyncio.sleep(0.2)
        await world.finish(result)
    finally:
        nemesis.cancel()
        await relay.stop()
        await bus.close()
    return result


async def broker_restart(world: ChaosWorld, *, events: int) -> Result:
    """Scenario 1: SIGKILL nats-server during a publish burst and again between two
    batches; consumers are never restarted and must reconnect by themselves."""
    result = Result("broker restart")
    pids = [p.pid for p in world.procs]
    bus = EventBus(world.settings, service="chaos-producer")
    await bus.start()
    try:
        half = events // 2
        burst = [
            asyncio.create_task(publish_until_acked(bus, n, result, timeout_s=60))
            for n in range(half)
        ]
        await asyncio.sleep(0.05)
        world.kill_broker()  # mid-burst
        result.faults.append("broker-kill mid-burst")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(world.restart_broker)
        await asyncio.gather(*burst)
        await world.wait_handled(result.acknowledged, 60)
        world.kill_broker()  # between stages: everything so far acked and handled
        result.faults.append("broker-kill between batches")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(world.restart_broker)
        for n in range(half, events):
            await publish_until_acked(bus, n, result, timeout_s=60)
        await world.finish(result)
    finally:
        await bus.close()
    alive = [p.pid for p in world.procs if p.poll() is None]
    if alive != pids:
        result.notes.append(f"consumers restarted: {pids} -> {alive}")
    return result


async def db_outage(
    root: Path,
    nats_url: str,
    *,
    events: int,
    outage_s: float,
    backoff_s: tuple[float, ...] | None = None,
    max_deliver: int | None = None,
    recover_timeout_s: float = 120.0,
) -> Result:
    """Scenario 3: PostgreSQL stopped under a running service (a real :class:`ServiceRuntime`)
    while events keep arriving; it is resumed on the same data directory after ``outage_s``.

    ``backoff_s``/``max_deliver`` left out = the service defaults (what production runs)."""
    import httpx

    from shared.embedded import EmbeddedPostgres
    from shared.service import ServiceRuntime
    from shared.settings import CommonSettings
    from tests.chaos.worker import make_handler

    result = Result(f"postgres outage {outage_s:.0f}s")
    pg = EmbeddedPostgres(root / "pg").start()
    prefix = f"c{uuid.uuid4().hex[:10]}"
    common = CommonSettings(
        home=root / "home", nats_url=nats_url, subject_prefix=prefix, database_url=pg.url
    )
    runtime = ServiceRuntime("chaosdb", common)
    runtime.bus.subscribe(
        DatasetSubmitted,
        make_handler(runtime.db, 0),
        durable="chaos-db",
        backoff_s=backoff_s,
        max_deliver=max_deliver,
    )
    producer = EventBus(chaos_bus_settings(nats_url, prefix), service="chaos-producer")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.http), base_url="http://t")
    try:
        async with runtime.db.session() as session:
            for ddl in SCHEMA:
                await session.execute(text(ddl))
        await runtime.start()
        await producer.start()
        db = Database(pg.url)  # the observer's own connection
        try:
            half = events // 2
            for n in range(half):
                await publish_until_acked(producer, n, result, timeout_s=30)
            await _wait_effects(db, set(range(half)), 60)
            await asyncio.to_thread(pg.stop)
            result.faults.append("postgres-stop")
            for n in range(half, events):  # the broker still takes events
                await publish_until_acked(producer, n, result, timeout_s=30)
            readyz = await http.get("/readyz")
            result.ready_during_outage = readyz.status_code == 200
            result.notes.append(f"/readyz during outage: {readyz.status_code} {readyz.json()}")
            await asyncio.sleep(outage_s)
            await asyncio.to_thread(pg.resume)
            t0 = time.monotonic()
            await _wait_effects(db, result.acknowledged, recover_timeout_s)
            result.recover_s = time.monotonic() - t0
            readyz = await http.get("/readyz")
            result.ready_after = readyz.status_code == 200
            await asyncio.sleep(2.0)
            async with db.session() as session:
                rows = (
                    await session.execute(text("SELECT n, count(*) FROM chaos_effects GROUP BY n"))
                ).all()
                result.duplicated = int(
                    (
                        await session.execute(
                            text("SELECT count(*) FROM chaos_deliveries WHERE absorbed")
                        )
                    ).scalar_one()
                )
                result.retried = int(
                    (
                        await session.execute(
                            text("SELECT count(*) FROM chaos_deliveries WHERE attempt > 1")
                        )
                    ).scalar_one()
                )
            result.handled = {int(n) for n, _ in rows}
            result.duplicate_effects = sum(1 for _, c in rows if c > 1)
            nc = await nats.connect(nats_url)
            try:
                info = await nc.jetstream().stream_info(Namespace(prefix).dead_letter_stream)
                result.dead_letters = int(info.state.messages)
            finally:
                await nc.close()
        finally:
            await db.dispose()
    finally:
        await http.aclose()
        await producer.close()
        await runtime.stop()
        pg.stop()
    return result


async def _wait_effects(db: Database, wanted: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with db.session() as session:
                rows = (await session.execute(text("SELECT DISTINCT n FROM chaos_effects"))).all()
            if wanted <= {int(n) for (n,) in rows}:
                return
        except Exception as exc:  # still down / reconnecting
            log.debug("database not back yet: %r", exc)
        await asyncio.sleep(0.2)


async def poison(world: ChaosWorld, *, good: int) -> Result:
    """Scenario 6: a payload that crashes the handler every time, and one that is not even
    an event, published ahead of ``good`` ordinary events."""
    result = Result("poison input")
    bus = EventBus(world.settings, service="chaos-producer")
    await bus.start()
    try:
        await bus.publish(
            DatasetSubmitted(
                run_id="ledger-poison",
                producer="chaos",
                dataset_name="poison",
                files=["file:///poison"],
            )
        )
        await bus.publish_raw(
            bus.ns.subject(DatasetSubmitted.subject),
            b'{"hostile": "not an event", "x": "' + b"A" * 10_000 + b'"}',
            msg_id=f"hostile-{uuid.uuid4()}",
        )
        result.faults += ["poison-payload", "schema-invalid-payload"]
        for n in range(good):
            await publish_until_acked(bus, n, result, timeout_s=30)
        t0 = time.monotonic()
        await world.wait_handled(result.acknowledged, 60)
        result.recover_s = time.monotonic() - t0
        result.notes.append(
            f"dead letters when the good events were done: {await world.dead_letters()}"
        )
        for _ in range(300):
            if await world.dead_letters() >= 2:
                break
            await asyncio.sleep(0.2)
        await world.finish(result, settle_s=1.0)
    finally:
        await bus.close()
    return result
