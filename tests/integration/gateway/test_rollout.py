"""Quality-gated canary on live traffic, through NATS and a real DB (SQLite and PostgreSQL):
a passed evaluation starts a canary, good live stats advance and promote it, a failing canary
is rolled back with no failed client request, a failed evaluation never gets traffic, and the
state survives a restart and is shared by a second replica."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest

from services.gateway.app import GatewayService
from shared.bus import BusSettings
from shared.subjects import Namespace
from tests.integration.gateway.conftest import MODEL, admin_get, admin_post, base_url, new_key
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration


async def _ask(http: httpx.AsyncClient, key: str, user: str) -> httpx.Response:
    return await http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "user": user},
    )


async def _traffic(gw: GatewayService, key: str, users: list[str]) -> Counter[str]:
    """One request per user, 16 at a time; every one must succeed. Returns who answered."""
    answered: Counter[str] = Counter()
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base_url(gw), timeout=10) as http:

        async def one(user: str) -> None:
            async with sem:
                r = await _ask(http, key, user)
            assert r.status_code == 200, r.text
            answered[r.headers["x-tuneloop-deployment"]] += 1

        await asyncio.gather(*(one(u) for u in users))
    return answered


def _state(gw: GatewayService, deployment_id: str) -> str | None:
    row = gw.state.rows.get(deployment_id)
    return row.state if row else None


async def _rollouts(bus_settings: BusSettings) -> list[tuple[str, str, float]]:
    ns = Namespace(bus_settings.prefix)
    msgs = await read_stream(bus_settings.nats_url, ns.stream, ns.subject("rollout.changed"))
    out = []
    for m in msgs:
        doc = json.loads(m.data)
        out.append((doc["deployment_id"], doc["action"], doc["weight"]))
    return out


async def test_canary_promote_rollback_refuse_restart_replicas(
    gateways, upstreams, pipeline, database_url, bus_settings
):
    base, a, b, c = [await upstreams(t) for t in ("base", "a", "b", "c")]
    async with gateways(database_url) as gw:
        key = await new_key(gw, name="traffic")
        await pipeline.deployed("base-1", base, "baseline")
        await eventually(lambda: _state(gw, "base-1") == "stable", what="baseline stable")

        # ---- a passes its evaluation: canary at the first step, sticky and weighted
        dep_a = await pipeline.deployed("cand-a", a, "candidate")
        await eventually(lambda: _state(gw, "cand-a") == "pending", what="a registered")
        assert (await _traffic(gw, key, [f"warm{i}" for i in range(10)])) == {"base-1": 10}
        await gw.asgi.state.sync_once()
        # Hold the rollout at the first step while we measure the split.
        gw.state.settings.step_min_requests = 10_000
        await pipeline.evaluated(dep_a, passed=True)
        await eventually(lambda: _state(gw, "cand-a") == "canary", what="a canary")
        assert gw.state.rows["cand-a"].weight == pytest.approx(0.2)
        split = await _traffic(gw, key, [f"user{i}" for i in range(300)])
        assert set(split) == {"base-1", "cand-a"}
        assert 0.1 < split["cand-a"] / 300 < 0.3, split  # 20% ± sampling noise
        again = await _traffic(gw, key, [f"user{i}" for i in range(300)])
        row_a = gw.state.rows["cand-a"]
        why = (row_a.state, row_a.weight, row_a.reason, gw.state.routes[MODEL].canary)
        assert again == split, why  # the same users land on the same deployment

        # ---- good live stats: advance, then promote
        gw.state.settings.step_min_requests = 6
        for batch in range(40):
            if _state(gw, "cand-a") == "stable":
                break
            await _traffic(gw, key, [f"p{batch}-{i}" for i in range(20)])
            await asyncio.sleep(0.06)
        assert _state(gw, "cand-a") == "stable"
        assert _state(gw, "base-1") == "previous"
        assert await _traffic(gw, key, [f"after{i}" for i in range(10)]) == {"cand-a": 10}

        # ---- b passes, then starts failing: rolled back, no client request fails
        dep_b = await pipeline.deployed("cand-b", b, "candidate")
        await eventually(lambda: _state(gw, "cand-b") == "pending", what="b registered")
        await pipeline.evaluated(dep_b, passed=True)
        await eventually(lambda: _state(gw, "cand-b") == "canary", what="b canary")
        b.fail_status = 500
        for batch in range(20):
            if _state(gw, "cand-b") == "rolled_back":
                break
            answered = await _traffic(gw, key, [f"r{batch}-{i}" for i in range(20)])
            assert set(answered) == {"cand-a"}  # b's failures were retried on stable
        assert _state(gw, "cand-b") == "rolled_back"
        assert b.calls >= 5
        calls_b = b.calls
        await _traffic(gw, key, [f"r-after{i}" for i in range(40)])
        assert b.calls == calls_b  # 0% at once

        # ---- c fails its evaluation: never receives traffic
        dep_c = await pipeline.deployed("cand-c", c, "candidate")
        await eventually(lambda: _state(gw, "cand-c") == "pending", what="c registered")
        await pipeline.evaluated(dep_c, passed=False)
        await eventually(lambda: _state(gw, "cand-c") == "refused", what="c refused")
        await _traffic(gw, key, [f"c{i}" for i in range(60)])
        assert c.calls == 0

        routes = (await admin_get(gw, "/admin/routes")).json()["models"][MODEL]
        by_id = {r["deployment_id"]: r for r in routes}
        assert by_id["cand-b"]["state"] == "rolled_back"
        assert "error rate" in by_id["cand-b"]["reason"]
        assert by_id["cand-a"]["live"]["requests"] > 0

    events = await _rollouts(bus_settings)
    actions = [(d, act) for d, act, _ in events]
    assert actions.count(("cand-a", "canary_started")) == 1
    assert ("cand-a", "advanced") in actions
    assert actions.count(("cand-a", "promoted")) == 1
    assert actions.count(("cand-b", "rolled_back")) == 1
    assert ("cand-c", "refused") in actions
    assert not any(d == "cand-c" and act != "refused" for d, act in actions)

    # ---- restart on the same DB: same routes; a second replica converges on admin changes
    async with gateways(database_url) as gw1, gateways(database_url) as gw2:
        for gw in (gw1, gw2):
            assert _state(gw, "cand-a") == "stable"
            assert await _traffic(gw, key, [f"x{i}" for i in range(5)]) == {"cand-a": 5}
        r = await admin_post(gw1, f"/admin/routes/{MODEL}/rollback", {})
        assert r.status_code == 200, r.text  # no canary: back to the previous stable
        await eventually(lambda: _state(gw2, "base-1") == "stable", what="replica 2 converges")
        assert await _traffic(gw2, key, [f"y{i}" for i in range(5)]) == {"base-1": 5}
        r = await admin_post(gw2, f"/admin/routes/{MODEL}/pin", {"deployment_id": "cand-a"})
        assert r.status_code == 200, r.text
        await eventually(
            lambda: gw1.state.routes[MODEL].pinned is not None, what="replica 1 sees the pin"
        )
        assert await _traffic(gw1, key, [f"z{i}" for i in range(5)]) == {"cand-a": 5}
        r = await admin_post(gw1, f"/admin/routes/{MODEL}/pin", {"deployment_id": "cand-c"})
        assert r.status_code == 409  # refused deployments cannot be pinned
