"""Scenarios 4 and 5 in the whole loop (tiny model, real NATS, SQLite, vLLM CPU, the six
services under the supervisor); the scenarios themselves are in :mod:`tests.chaos.loop`.

4. every service is SIGKILLed at a point inside its work (shared/failpoints.py: mid-work at a
   heartbeat, or after committing and before acknowledging, or after publishing and before
   marking the outbox row), restarted by the supervisor, and the run still ends with exactly
   one effect per stage;
5. the canary's vLLM engine is SIGKILLed under live traffic: the gateway stops sending it
   requests, rolls it back, and no client request fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.events import RolloutChanged
from tests.chaos.loop import CRASHES, STAGE_EFFECTS, engine_death, service_crashes
from tests.e2e.harness import VLLM_PYTHON

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.e2e,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM env: scripts/setup.sh --vllm"),
]
SERVICES = ("ingest", "trainer", "quantizer", "inference", "evaluator", "gateway")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


async def test_every_service_killed_inside_its_work_still_one_effect_per_stage(
    tmp_path: Path, models_dir: Path
) -> None:
    outcome = await service_crashes(tmp_path / "home", models_dir)
    demo = outcome.demo
    story = "\n".join(
        [type(e).__name__ + " " + e.model_dump_json()[:200] for e in demo.events]
        + demo.supervisor_notes
    )
    print(outcome.result.row(), outcome.result.notes)
    assert demo.outcome == "promoted", story
    # Every failpoint fired: each service was SIGKILLed, and the supervisor restarted it.
    assert outcome.fired == sorted(c.split("@")[0] for c in CRASHES), story
    for service in SERVICES:
        assert any(n.startswith(f"{service} exited") for n in demo.supervisor_notes), story
    # Exactly one effect per stage in the stream, nothing failed, one row per service table.
    assert {name: outcome.effects.get(name, 0) for name in STAGE_EFFECTS} == dict.fromkeys(
        STAGE_EFFECTS, 1
    ), outcome.effects
    failures = [k for k in outcome.effects if k.endswith("Failed") or k == "DatasetRejected"]
    assert not failures, outcome.effects
    assert outcome.rows == dict.fromkeys(outcome.rows, 1), outcome.rows
    assert outcome.result.dead_letters == 0
    # The causal chain and the one trace survive the crashes (inference finishes the
    # interrupted engine start after its restart, outside any handler).
    assert outcome.orphans == [], outcome.orphans
    assert len(outcome.run_traces) == 1, outcome.run_traces


async def test_the_canary_engine_killed_under_traffic_is_rolled_back_without_client_errors(
    tmp_path: Path, models_dir: Path
) -> None:
    outcome = await engine_death(tmp_path / "home", models_dir)
    demo = outcome.demo
    story = "\n".join(type(e).__name__ + " " + e.model_dump_json()[:300] for e in demo.events)
    print(outcome.result.row(), outcome.result.notes)
    assert outcome.killed_at is not None, f"the canary never started:\n{story}"
    assert demo.outcome == "rolled back", story
    rollback = demo.last(RolloutChanged)
    assert rollback.action == "rolled_back" and rollback.weight == 0.0, rollback
    # Requests the dead canary would have answered were retried on stable.
    assert demo.request_errors == 0, outcome.result.notes
