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
from shared.events import EvaluationCompleted, Event, LatencyPercentiles, ModelDeployed
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
        ).one() == 4

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
