"""DeploymentRetired through NATS and a real DB (SQLite and PostgreSQL): a retired previous
stable leaves the routes and cannot be rolled back to (409), a retired canary is rolled back at
once with an event saying why (once, however often the event comes), and malformed, oversized
or hostile retirements are dead-lettered without touching the routes."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from shared.bus import EventBus
from shared.subjects import DEPLOYMENT_RETIRED, Namespace
from tests.integration.gateway.conftest import MODEL, admin_get, admin_post, base_url, new_key
from tests.integration.gateway.test_rollout import _rollouts, _state, _traffic
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration


async def test_retired_previous_and_canary(
    gateways, upstreams, pipeline, database_url, bus_settings
):
    base, a, b = [await upstreams(t) for t in ("base", "a", "b")]
    ns = Namespace(bus_settings.prefix)
    async with gateways(database_url) as gw:
        key = await new_key(gw)
        await pipeline.deployed("base-1", base, "baseline")
        await eventually(lambda: _state(gw, "base-1") == "stable", what="baseline stable")
        dep_a = await pipeline.deployed("cand-a", a, "candidate")
        await eventually(lambda: _state(gw, "cand-a") == "pending", what="a registered")
        await pipeline.evaluated(dep_a, passed=True)
        await eventually(lambda: _state(gw, "cand-a") == "canary", what="a canary")
        r = await admin_post(gw, f"/admin/routes/{MODEL}/promote", {"deployment_id": "cand-a"})
        assert r.status_code == 200, r.text
        assert _state(gw, "base-1") == "previous"

        # ---- inference retires the previous stable: gone from the routes, no rollback to it
        await pipeline.retired("base-1", reason="retired: cand-b promoted")
        await eventually(lambda: _state(gw, "base-1") == "retired", what="base retired")
        listed = (await admin_get(gw, "/admin/routes")).json()["models"][MODEL]
        assert [d["deployment_id"] for d in listed] == ["cand-a"]
        r = await admin_post(gw, f"/admin/routes/{MODEL}/rollback", {})
        assert r.status_code == 409
        assert "retired by inference" in r.json()["error"]["message"]
        r = await admin_post(gw, f"/admin/routes/{MODEL}/rollback", {"deployment_id": "base-1"})
        assert r.status_code == 409
        assert "retired by inference (its engine is gone)" in r.json()["error"]["message"]
        r = await admin_post(gw, f"/admin/routes/{MODEL}/promote", {"deployment_id": "base-1"})
        assert r.status_code == 409
        assert await _traffic(gw, key, [f"u{i}" for i in range(10)]) == {"cand-a": 10}
        assert base.calls == 0

        # ---- the active canary's engine is retired: 0% at once, rolled_back says why
        gw.state.settings.step_min_requests = 10_000  # hold b at its first step
        dep_b = await pipeline.deployed("cand-b", b, "candidate")
        await eventually(lambda: _state(gw, "cand-b") == "pending", what="b registered")
        await pipeline.evaluated(dep_b, passed=True)
        await eventually(lambda: _state(gw, "cand-b") == "canary", what="b canary")
        event = await pipeline.retired("cand-b", reason="evicted: engine budget full")
        async with EventBus(bus_settings, service="redeliver") as bus:  # past the dedupe
            await bus.publish_raw(
                ns.subject(DEPLOYMENT_RETIRED),
                event.model_dump_json().encode(),
                msg_id=str(uuid.uuid4()),
            )
        await eventually(lambda: _state(gw, "cand-b") == "retired", what="b retired")
        calls = b.calls
        assert await _traffic(gw, key, [f"v{i}" for i in range(40)]) == {"cand-a": 40}
        assert b.calls == calls

        # ---- malformed, oversized, hostile: dead letters; the routes do not move
        async with EventBus(bus_settings, service="hostile") as bus:
            good = event.model_dump(mode="json")

            def variant(**fields: object) -> bytes:
                return json.dumps({**good, "event_id": str(uuid.uuid4()), **fields}).encode()

            for payload in (
                b"not json",
                b'{"deployment_id": "cand-a"}',
                variant(deployment_id="cand-a", reason="x" * 5000),  # oversized
                variant(deployment_id="../../etc/passwd"),
                variant(deployment_id="cand-a", served_model_name="another-model"),
            ):
                await bus.publish_raw(
                    ns.subject(DEPLOYMENT_RETIRED), payload, msg_id=str(uuid.uuid4())
                )
        dead = await eventually(
            lambda: _dead(bus_settings.nats_url, ns, 5), timeout_s=30, what="dead letters"
        )
        assert len(dead) == 5
        assert _state(gw, "cand-a") == "stable"
        assert await _traffic(gw, key, [f"w{i}" for i in range(5)]) == {"cand-a": 5}
        async with httpx.AsyncClient(base_url=base_url(gw)) as http:
            assert (await http.get("/readyz")).status_code == 200

    rollbacks = [e for e in await _rollouts(bus_settings) if e[:2] == ("cand-b", "rolled_back")]
    assert rollbacks == [("cand-b", "rolled_back", 0.0)]
    msgs = await read_stream(bus_settings.nats_url, ns.stream, ns.subject("rollout.changed"))
    assert any(b"engine retired by inference: evicted" in m.data for m in msgs)


async def _dead(nats_url: str, ns: Namespace, n: int) -> list[object] | None:
    msgs = await read_stream(nats_url, ns.dead_letter_stream, ns.dead_letter(DEPLOYMENT_RETIRED))
    return msgs if len(msgs) >= n else None
