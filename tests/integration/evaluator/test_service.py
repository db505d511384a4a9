"""The evaluator over the real bus and databases: verdicts, baseline comparison, promotion,
redelivery, unreachable and hostile deployments."""

from __future__ import annotations

import json

import pytest
from sqlmodel import select

from services.evaluator.handlers import on_model_deployed
from shared.embedded import free_port
from shared.events import (
    EvaluationCompleted,
    EvaluationFailed,
    ModelDeployed,
    RolloutChanged,
    new_run_id,
)
from tests.integration.evaluator.conftest import EXPECTED
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration


def deployed(dep_id: str, endpoint: str, role: str = "candidate") -> ModelDeployed:
    return ModelDeployed(
        run_id=new_run_id(),
        producer="inference",
        deployment_id=dep_id,
        model_id=f"model-{dep_id}",
        engine="vllm-cpu",
        endpoint=endpoint,
        served_model_name="tuneloop",
        role=role,  # type: ignore[arg-type]
    )


async def test_candidates_are_judged_against_the_stable_deployment(db, evaluator, upstream):
    async with evaluator() as ev:
        await ev.publish(deployed("base-1", upstream.endpoint("mediocre"), role="baseline"))
        good = await ev.publish(deployed("cand-good", upstream.endpoint("good")))
        done = await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "cand-good")
        assert done.passed, done.reasons
        assert done.run_id == good.run_id and done.causation_id == good.event_id
        assert done.overall_score == 1.0
        assert set(done.category_scores) == {"reminder", "meeting", "todo"}
        assert done.baseline is not None and done.baseline.deployment_id == "base-1"
        assert 0.7 <= done.baseline.overall_score < 0.9  # format and intent, not the time
        assert done.latency.p50_ms > 0 and done.latency.p99_ms >= done.latency.p95_ms
        report = json.loads(await ev.store.get_bytes(done.report))
        assert len(report["results"]) == 40 and report["gate"]["passed"] is True
        assert report["baseline"]["deployment_id"] == "base-1"
        mediocre_calls = upstream.requests["mediocre"]
        assert mediocre_calls == 40  # the baseline ran once, its result is cached

        await ev.publish(deployed("cand-bad", upstream.endpoint("bad-meeting")))
        bad = await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "cand-bad")
        assert not bad.passed
        assert bad.category_scores["meeting"] == 0.0 and bad.category_scores["todo"] == 1.0
        assert any(r.startswith("category meeting score 0.000 below minimum") for r in bad.reasons)
        assert any(r.startswith("regression vs stable in category meeting") for r in bad.reasons)
        assert upstream.requests["mediocre"] == mediocre_calls  # cached baseline reused

        # Redelivery of a ModelDeployed for the same deployment: no second run, no second verdict.
        good_calls = upstream.requests["good"]
        again = await ev.publish(deployed("cand-good", upstream.endpoint("good")))
        await ev.publish(deployed("marker", upstream.endpoint("bad-meeting")))
        await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "marker")
        assert upstream.requests["good"] == good_calls
        verdicts = [
            e for e in await ev.events(EvaluationCompleted) if e.deployment_id == "cand-good"
        ]
        assert len(verdicts) == 1 and verdicts[0].causation_id != again.event_id

        # The gateway promotes the good candidate: it becomes what the next one must beat.
        await ev.publish(
            RolloutChanged(
                run_id=good.run_id,
                producer="gateway",
                served_model_name="tuneloop",
                deployment_id="cand-good",
                action="promoted",
                weight=1.0,
            )
        )
        await ev.publish(deployed("cand-next", upstream.endpoint("mediocre")))
        nxt = await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "cand-next")
        assert nxt.baseline is not None and nxt.baseline.deployment_id == "cand-good"
        assert not nxt.passed
        assert any(r.startswith("regression vs stable: overall") for r in nxt.reasons)
        assert upstream.requests["good"] == good_calls  # the promoted run was cached too


async def test_unreachable_vanishing_and_hostile_deployments(db, evaluator, upstream):
    async with evaluator() as ev:
        first = await ev.publish(deployed("gone", f"http://127.0.0.1:{free_port()}/v1"))
        gone = await ev.wait_for(EvaluationFailed, lambda e: e.deployment_id == "gone")
        assert gone.retryable and "never answered" in gone.reason
        # the same announcement again changes nothing; a new one (the engine is back) retries
        assert await on_model_deployed(first, ports=ev.ports) is None
        await ev.publish(deployed("gone", upstream.endpoint("good")))
        back = await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "gone")
        assert back.passed and upstream.requests["good"] == 40

        await ev.publish(deployed("dies", upstream.endpoint("dies")))
        dies = await ev.wait_for(EvaluationFailed, lambda e: e.deployment_id == "dies")
        assert "stopped answering mid-run" in dies.reason, dies.reason

        await ev.publish(deployed("hostile", upstream.endpoint("hostile")))
        hostile = await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "hostile")
        assert not hostile.passed and hostile.overall_score < 0.6
        assert any("below minimum" in r for r in hostile.reasons)
        assert any("no baseline comparison" in r for r in hostile.reasons)
        report = json.loads(await ev.store.get_bytes(hostile.report))
        outputs = [r["output"] for r in report["results"]]
        assert any(r["output_truncated"] for r in report["results"])
        assert all(len(o) <= 4000 for o in outputs)  # the report keeps a bounded excerpt
        assert any("SCORE: 10" in o for o in outputs)  # recorded as data, scored as nothing
        # nothing was redelivered or dead-lettered: hostile output is a result, not an error
        assert len(await ev.events(EvaluationFailed)) == 2


class FakeEmbedder:
    """Stands in for MiniLM here (the real model is tested in test_similarity.py)."""

    async def similarity(self, a: str, b: str) -> float:
        return 1.0 if b in a else 0.0


async def test_validation_split_is_the_benchmark_when_configured(db, evaluator, upstream):
    async with evaluator(use_validation_split=True) as ev:
        ev.ports.scoring.embedder = FakeEmbedder()
        prompts = list(EXPECTED)[:6]
        records = [
            {"id": f"v{i}", "category": "val", "source": "upload", "messages": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": json.dumps(EXPECTED[p])}]}
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        ref = await ev.store.put_bytes(data, kind="datasets", name="validation.jsonl")
        event = deployed("cand-val", upstream.endpoint("good")).model_copy(
            update={"validation": ref, "dataset_id": "ds-1"}
        )
        await ev.publish(event)
        done = await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "cand-val")
        assert done.benchmark.startswith("validation-ds-1@")
        assert done.category_scores == {"val": 1.0} and done.passed, done.reasons
        assert upstream.requests["good"] == 6


async def test_the_service_process_evaluates_and_stops_on_sigterm(bus_settings, upstream, tmp_path):
    import asyncio
    import os
    import signal
    import sys

    from shared.bus import EventBus

    port = free_port()
    env = {
        **os.environ,
        "TUNELOOP_HOME": str(tmp_path),
        "TUNELOOP_NATS_URL": bus_settings.nats_url,
        "TUNELOOP_SUBJECT_PREFIX": bus_settings.prefix,
        "EVALUATOR_HTTP_PORT": str(port),
        "EVALUATOR_GATE_MIN_OVERALL": "0.6",
        "EVALUATOR_GATE_MIN_CATEGORY": "0.6",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.evaluator.app", env=env, cwd=os.getcwd()
    )
    try:
        async with EventBus(bus_settings, service="pipeline-test") as bus:
            await bus.publish(deployed("proc-1", upstream.endpoint("good")))
            msgs = await eventually(
                lambda: read_stream(
                    bus_settings.nats_url,
                    bus.ns.stream,
                    bus.ns.subject(EvaluationCompleted.subject),
                ),
                timeout_s=90,
                what="EvaluationCompleted from the service process",
            )
        done = EvaluationCompleted.model_validate_json(msgs[0].data)
        assert done.deployment_id == "proc-1" and done.passed, done.reasons

        import httpx

        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert health.json()["service"] == "evaluator"
        assert 'tuneloop_evaluator_evaluations_total{outcome="passed"} 1.0' in metrics.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_concurrent_deliveries_record_one_verdict(db, evaluator, upstream):
    import asyncio

    from shared.outbox import OutboxMessage

    async with evaluator() as ev:
        event = deployed("twice", upstream.endpoint("good"))
        results = await asyncio.gather(
            on_model_deployed(event, ports=ev.ports), on_model_deployed(event, ports=ev.ports)
        )
        assert sum(r is not None for r in results) == 1
        async with ev.runtime.db.session() as session:
            rows = (await session.exec(select(OutboxMessage))).all()
        assert [r.event_type for r in rows if "twice" in r.payload] == ["EvaluationCompleted"]


async def test_evaluations_route_reads_runs_and_refuses_bad_ids(db, evaluator, upstream):
    import httpx

    async with evaluator() as ev:
        await ev.publish(deployed("base-r", upstream.endpoint("mediocre"), role="baseline"))
        await ev.publish(deployed("cand-r", upstream.endpoint("good")))
        await ev.wait_for(EvaluationCompleted, lambda e: e.deployment_id == "cand-r")
        transport = httpx.ASGITransport(app=ev.runtime.http)
        async with httpx.AsyncClient(transport=transport, base_url="http://ev") as client:
            ok = await client.get("/evaluations/cand-r")
            base = await client.get("/evaluations/base-r")
            unknown = await client.get("/evaluations/nobody")
            bad = [
                await client.get(path)
                for path in (
                    "/evaluations/" + "a" * 5000,
                    "/evaluations/..%2F..%2Fetc",
                    "/evaluations/%00",
                    "/evaluations/x'%20OR%201=1--",
                )
            ]
    assert ok.status_code == 200
    run = ok.json()["runs"][0]
    assert run["kind"] == "candidate" and run["passed"] is True and run["overall_score"] == 1.0
    assert run["summary"]["category_scores"]["todo"] == 1.0 and run["report_uri"]
    assert base.json()["runs"][0]["kind"] == "baseline"  # the cached baseline run
    assert unknown.status_code == 404
    # refused by validation (422), or not even routed (a decoded '/' leaves the route: 404)
    assert [r.status_code for r in bad] == [422, 404, 422, 422]


async def test_only_promotions_move_stable_and_late_ones_do_not_win(db, evaluator):
    from datetime import timedelta

    from services.evaluator.handlers import on_rollout_changed
    from services.evaluator.models import EvaluatorStable

    def rollout(dep_id: str, action: str, minutes: int) -> RolloutChanged:
        event = RolloutChanged(run_id=new_run_id(), producer="gateway",
                               served_model_name="tuneloop", deployment_id=dep_id,
                               action=action, weight=1.0)  # type: ignore[arg-type]  # fmt: skip
        return event.model_copy(
            update={"occurred_at": event.occurred_at + timedelta(minutes=minutes)}
        )

    async with evaluator() as ev:
        tx = ev.runtime.transaction
        assert not await on_rollout_changed(rollout("a", "canary_started", 0), transaction=tx)
        assert await on_rollout_changed(rollout("new", "promoted", 10), transaction=tx)
        assert not await on_rollout_changed(rollout("old", "promoted", 5), transaction=tx)
        assert not await on_rollout_changed(rollout("x", "rolled_back", 20), transaction=tx)
        async with ev.runtime.db.session() as session:
            stable = await session.get(EvaluatorStable, "tuneloop")
        assert stable is not None and (stable.deployment_id, stable.source) == ("new", "promoted")
