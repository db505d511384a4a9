"""The evaluator over the real bus and databases: verdicts, baseline comparison, promotion,
redelivery, unreachable and hostile deployments."""

from __future__ import annotations

import json

import pytest

from shared.embedded import free_port
from shared.events import (
    EvaluationCompleted,
    EvaluationFailed,
    ModelDeployed,
    RolloutChanged,
    new_run_id,
)

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
        await ev.publish(deployed("gone", f"http://127.0.0.1:{free_port()}/v1"))
        gone = await ev.wait_for(EvaluationFailed, lambda e: e.deployment_id == "gone")
        assert gone.retryable and "never answered" in gone.reason

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
        assert all(len(o) <= 20_000 for o in outputs)
        assert any("SCORE: 10" in o for o in outputs)  # recorded as data, scored as nothing
        # nothing was redelivered or dead-lettered: hostile output is a result, not an error
        assert len(await ev.events(EvaluationFailed)) == 2
