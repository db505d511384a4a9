"""Route state in the DB (SQLite and PostgreSQL): idempotent event handlers, conditional
transitions (two replicas deciding the same step: one wins, one event), admin conflicts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.gateway.control import GatewayState
from services.gateway.handlers import on_evaluation_completed, on_model_deployed
from services.gateway.models import GatewayDeployment, GatewayReplicaStats
from services.gateway.routing import state as route_state
from services.gateway.settings import GatewaySettings
from shared.bus import PermanentError
from shared.db import Database
from shared.events import (
    DeploymentRetired,
    EvaluationCompleted,
    Event,
    LatencyPercentiles,
    ModelDeployed,
)
from shared.outbox import OutboxMessage, record_event
from shared.subjects import Namespace

pytestmark = pytest.mark.integration


class DbOutbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.db.session() as session:
            yield session

    def emit(self, session: AsyncSession, event: Event) -> None:
        record_event(session, event, service="gateway", ns=Namespace("t"))


def deployed(dep: str, role: str = "candidate", model: str = "m") -> ModelDeployed:
    return ModelDeployed(
        run_id=f"run-{dep}",
        producer="inference",
        deployment_id=dep,
        model_id=f"model-{dep}",
        engine="vllm",
        endpoint="http://127.0.0.1:9",
        served_model_name=model,
        role=role,  # type: ignore[arg-type]
    )


def evaluated(ev: ModelDeployed, passed: bool, model: str = "m") -> EvaluationCompleted:
    return ev.follow(
        EvaluationCompleted,
        producer="evaluator",
        deployment_id=ev.deployment_id,
        model_id=ev.model_id,
        served_model_name=model,
        benchmark="b",
        passed=passed,
        overall_score=0.5,
        latency=LatencyPercentiles(p50_ms=1, p95_ms=2, p99_ms=3),
    )


async def no_probe(endpoint: str, name: str) -> tuple[str | None, int | None]:
    return None, None


async def outbox_actions(db: Database) -> list[str]:
    async with db.session() as session:
        rows = (await session.exec(select(OutboxMessage).order_by(col(OutboxMessage.id)))).all()
    return [r.payload for r in rows]


async def test_handlers_are_idempotent_and_transitions_conditional(db: Database):
    state = GatewayState(GatewaySettings(), db, DbOutbox(db), admin_key=None)
    base, cand = deployed("base", "baseline"), deployed("cand")
    for _ in range(2):  # redelivery changes nothing
        await on_model_deployed(base, state=state, probe=no_probe)
        await on_model_deployed(cand, state=state, probe=no_probe)
    passed = evaluated(cand, True)
    await on_evaluation_completed(passed, state=state)
    await on_evaluation_completed(passed, state=state)
    payloads = await outbox_actions(db)
    assert len(payloads) == 2  # baseline promoted, canary started: once each
    assert '"canary_started"' in payloads[1] and '"weight":0.1' in payloads[1]
    assert state.routes["m"].canary is not None and state.routes["m"].canary_weight == 0.1

    # Two replicas decide the same advance from the same step: one wins.
    async def advance() -> int:
        async with db.session() as session:
            events = await route_state.advance(
                session, "cand", expected_step=0, new_step=1, weight=0.25, reason="r", metrics={}
            )
        return len(events)

    assert sorted(await asyncio.gather(advance(), advance())) == [0, 1]
    async with db.session() as session:
        stale = await route_state.rollback(
            session, "cand", expected_step=0, reason="late", metrics={}
        )
        assert stale == []  # decided from a step that is gone
        row = await route_state.get(session, "cand")
        assert (row.state, row.step, row.weight) == ("canary", 1, 0.25)

    # Live stats are shared through the DB: each replica judges on all replicas' traffic.
    peer = GatewayState(GatewaySettings(), db, DbOutbox(db), admin_key=None)
    for s in (state, peer):
        await s.sync_once(force=True)
    for ok in (True, True, False):
        state.record_outcome("cand", 1, ok, 10.0)
    for ok in (True, False):
        peer.record_outcome("cand", 1, ok, 20.0)
    for s in (state, peer):
        await s.publish_stats()
    for s in (state, peer):
        await s.refresh_peers()
        combined = s.combined("cand", 1)
        assert (combined.requests, combined.errors, combined.latency_samples) == (5, 2, 3)
        assert s.live_stats("cand")["requests"] == 5
    await state.publish_stats()  # an update of its own row, not a second row
    async with db.session() as session:
        assert (
            await session.exec(select(func.count()).select_from(GatewayReplicaStats))
        ).one() == 6  # per replica: the stable's rolling and paired windows, the canary's

    # A failed evaluation: refused, and it cannot be given traffic or pinned.
    bad = deployed("bad")
    await on_model_deployed(bad, state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(bad, False), state=state)
    async with db.session() as session:
        assert (await route_state.get(session, "bad")).state == "refused"
    with pytest.raises(route_state.Conflict):
        async with db.session() as session:
            await route_state.set_weight(session, "bad", weight=0.5, reason="admin")
    with pytest.raises(route_state.Conflict):
        async with db.session() as session:
            await route_state.pin(session, "m", "bad", reason="admin")
    with pytest.raises(route_state.UnknownDeployment):
        async with db.session() as session:
            await route_state.pin(session, "m", "ghost", reason="admin")

    # Hostile or early evaluations.
    with pytest.raises(route_state.UnknownDeployment):  # retried by the bus until deployed
        await on_evaluation_completed(evaluated(deployed("later"), True), state=state)
    other = deployed("other-model-dep")
    await on_model_deployed(other, state=state, probe=no_probe)
    with pytest.raises(PermanentError):
        await on_evaluation_completed(evaluated(other, True, model="x"), state=state)

    # Promotion keeps the old stable as previous; a newer baseline does not displace it.
    async with db.session() as session:
        await route_state.promote(session, "cand", expected_step=1, reason="ok", metrics={})
    await on_model_deployed(deployed("base-2", "baseline"), state=state, probe=no_probe)
    async with db.session() as session:
        states = dict(
            (
                await session.exec(
                    select(GatewayDeployment.deployment_id, GatewayDeployment.state)  # type: ignore[call-overload]
                )
            ).all()
        )
        count = (await session.exec(select(func.count()).select_from(OutboxMessage))).one()
    assert states["cand"] == "stable" and states["base"] == "previous"
    assert states["base-2"] == "previous" and states["bad"] == "refused"
    assert count == len(await outbox_actions(db))

    # Manual weights: a pending deployment becomes a canary with auto-advance off; 0% = rollback.
    await on_model_deployed(deployed("manual"), state=state, probe=no_probe)
    async with db.session() as session:
        events = await route_state.set_weight(session, "manual", weight=0.3, reason="admin")
        assert [e.action for e in events] == ["advanced"]
        row = await route_state.get(session, "manual")
        assert (row.state, row.weight, row.auto) == ("canary", 0.3, False)
    async with db.session() as session:
        events = await route_state.set_weight(session, "manual", weight=0.0, reason="admin")
        assert [e.action for e in events] == ["rolled_back"]
        assert (await route_state.get(session, "manual")).state == "rolled_back"
    with pytest.raises(route_state.Conflict):
        async with db.session() as session:
            await route_state.set_weight(session, "cand", weight=0.5, reason="already stable")

    # Model facts unknown at announcement (engine not answering yet) are asked for again.
    answers: list[tuple[str | None, int | None]] = [(None, None), ("engine-name", 2048)]

    async def late_probe(endpoint: str, name: str) -> tuple[str | None, int | None]:
        return answers.pop(0)

    prober = GatewayState(GatewaySettings(), db, DbOutbox(db), admin_key=None, probe=late_probe)
    await prober.sync_once(force=True)
    assert prober.upstreams["cand"].max_context_tokens is None
    assert await prober.reprobe() == 0  # still unknown
    assert await prober.reprobe() == 0  # and not asked again right away
    prober._probed.clear()
    assert await prober.reprobe() == 1
    assert prober.upstreams["cand"].max_context_tokens == 2048
    assert prober.upstreams["cand"].upstream_model == "engine-name"
    await state.sync_once()
    assert state.upstreams["cand"].max_context_tokens == 2048  # other replicas see it too


def retired(dep: str, model: str = "m", reason: str = "retired: x promoted") -> DeploymentRetired:
    return DeploymentRetired(
        run_id=f"run-{dep}",
        producer="inference",
        deployment_id=dep,
        model_id=f"model-{dep}",
        served_model_name=model,
        reason=reason,
    )


async def _states(db: Database) -> dict[str, tuple[str, bool]]:
    async with db.session() as session:
        rows = (await session.exec(select(GatewayDeployment))).all()
    return {r.deployment_id: (r.state, r.retired_at is not None) for r in rows}


async def test_canary_is_judged_against_the_stable_of_the_same_period(db: Database):
    """A slow spell on the gateway itself (GC pause, busy host) slows the canary's and the
    stable's requests alike: no rollback, even though the stable's rolling window is mostly
    older, fast outcomes. A canary that is slow on its own is still rolled back."""
    settings = GatewaySettings(slo_min_samples=5, step_min_requests=10_000)
    state = GatewayState(settings, db, DbOutbox(db), admin_key=None)
    base, cand = deployed("base", "baseline"), deployed("cand")
    await on_model_deployed(base, state=state, probe=no_probe)
    for _ in range(1000):  # before the canary: a long history of fast answers
        state.record_outcome("base", -1, True, 5.0)
    await on_model_deployed(cand, state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(cand, True), state=state)
    assert state.routes["m"].canary is not None
    for i in range(80):  # a slow spell: 2 in 5 requests take 600 ms, on both deployments
        state.record_outcome("base", -1, True, 600.0 if i % 5 < 2 else 5.0)
    for i in range(20):
        state.record_outcome("cand", 0, True, 600.0 if i % 5 < 2 else 5.0)
    assert state.combined("base", -1).p95_ms == 5.0  # the rolling window hides the spell
    assert await state.control_once() == []
    assert state.rows["cand"].state == "canary"

    for _ in range(20):  # now the canary alone is slow
        state.record_outcome("cand", 0, True, 2000.0)
    for _ in range(80):
        state.record_outcome("base", -1, True, 5.0)
    [rolled_back] = await state.control_once()
    assert rolled_back.action == "rolled_back" and "p95 latency" in rolled_back.reason
    assert state.rows["cand"].state == "rolled_back"

    # The next canary is compared with the stable from its own start, not the last one's.
    assert state.stats.get("base", -2).requests == 160
    nxt = deployed("cand2")
    await on_model_deployed(nxt, state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(nxt, True), state=state)
    assert state.stats.get("base", -2).requests == 0
    state.record_outcome("base", -1, True, 5.0)
    assert state.stats.get("base", -2).requests == 1


async def test_retirement_drops_unrouted_rolls_back_canaries_and_keeps_a_marked_stable(
    db: Database,
):
    from services.gateway.control import STABLE_RETIRED
    from services.gateway.handlers import on_deployment_retired

    state = GatewayState(GatewaySettings(), db, DbOutbox(db), admin_key=None)
    for ev in (deployed("base", "baseline"), deployed("a"), deployed("b"), deployed("c")):
        await on_model_deployed(ev, state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(deployed("a"), True), state=state)
    async with state.changing() as session:  # a promoted: base is kept as previous
        await route_state.promote(session, "a", expected_step=0, reason="ok", metrics={})
    await on_evaluation_completed(evaluated(deployed("b"), True), state=state)
    before = len(await outbox_actions(db))
    assert (await _states(db))["base"] == ("previous", False)

    # The previous stable's engine is gone: it is no longer a rollback target; no traffic
    # moved, so no event. A redelivery changes nothing.
    gone = retired("base")
    for _ in range(2):
        await on_deployment_retired(gone, state=state)
    assert (await _states(db))["base"] == ("retired", True)
    assert len(await outbox_actions(db)) == before
    for op in (
        lambda s: route_state.promote(s, "base", expected_step=None, reason="admin", metrics={}),
        lambda s: route_state.set_weight(s, "base", weight=0.5, reason="admin"),
        lambda s: route_state.pin(s, "m", "base", reason="admin"),
    ):
        with pytest.raises(route_state.Conflict, match="retired by inference"):
            async with db.session() as session:
                await op(session)

    # The active canary: 0% at once, with a rolled_back event that says why.
    assert state.routes["m"].canary is not None
    await on_deployment_retired(retired("b", reason="evicted: engine budget full"), state=state)
    assert (await _states(db))["b"] == ("retired", True)
    assert state.routes["m"].canary is None and "b" not in state.upstreams
    payloads = await outbox_actions(db)
    assert len(payloads) == before + 1
    assert '"rolled_back"' in payloads[-1] and '"deployment_id":"b"' in payloads[-1]
    assert "engine retired by inference: evicted" in payloads[-1]

    # A pending deployment retired before its evaluation never becomes a canary.
    await on_deployment_retired(retired("c"), state=state)
    await on_evaluation_completed(evaluated(deployed("c"), True), state=state)
    assert (await _states(db))["c"] == ("retired", True)

    # The stable: kept (dropping it would leave the model with no route), marked and alerted.
    await on_deployment_retired(retired("a", reason="gone: restart failed"), state=state)
    assert (await _states(db))["a"] == ("stable", True)
    assert state.routes["m"].stable is not None and state.routes["m"].stable.deployment_id == "a"
    assert STABLE_RETIRED.labels("m")._value.get() == 1
    assert len(await outbox_actions(db)) == before + 1
    # Replaced later, it is retired, not kept as a previous stable.
    await on_model_deployed(deployed("d"), state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(deployed("d"), True), state=state)
    async with state.changing() as session:
        await route_state.promote(session, "d", expected_step=0, reason="ok", metrics={})
    assert (await _states(db))["a"] == ("retired", True)
    assert STABLE_RETIRED.labels("m")._value.get() == 0

    # A pinned previous whose engine goes: unpinned with a rolled_back event.
    await on_model_deployed(deployed("e"), state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(deployed("e"), True), state=state)
    async with state.changing() as session:
        await route_state.promote(session, "e", expected_step=0, reason="ok", metrics={})
    async with state.changing() as session:
        await route_state.pin(session, "m", "d", reason="admin")
    assert state.routes["m"].pinned is not None
    await on_deployment_retired(retired("d"), state=state)
    assert state.routes["m"].pinned is None and (await _states(db))["d"] == ("retired", True)
    assert '"rolled_back"' in (await outbox_actions(db))[-1]

    # Retired before it was ever registered (events on two subjects can arrive in any order):
    # recorded as retired, so the late ModelDeployed cannot route to an engine that is gone.
    await on_deployment_retired(retired("early"), state=state)
    await on_model_deployed(deployed("early"), state=state, probe=no_probe)
    await on_evaluation_completed(evaluated(deployed("early"), True), state=state)
    assert (await _states(db))["early"] == ("retired", True)

    # Hostile: a retirement naming another model's deployment is refused (dead letter).
    with pytest.raises(PermanentError):
        await on_deployment_retired(retired("e", model="other"), state=state)
    assert (await _states(db))["e"] == ("stable", False)
