"""Scenarios 4 and 5 in the whole loop (tiny model, real NATS, SQLite, vLLM CPU, the six
services under the supervisor):

4. every service is SIGKILLed at a point inside its work (shared/failpoints.py: mid-work at a
   heartbeat, or after committing and before acknowledging, or after publishing and before
   marking the outbox row), restarted by the supervisor, and the run still ends with exactly
   one effect per stage;
5. the canary's vLLM engine is SIGKILLed under live traffic: the gateway stops sending it
   requests, rolls it back, and no client request fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import text

from shared import failpoints
from shared.db import Database
from shared.demo import demo_env, run_demo
from shared.events import DatasetReady, DatasetSubmitted, Event, RolloutChanged
from shared.subjects import Namespace
from shared.supervisor import Embedded
from tests.e2e.harness import (
    FAST_REDELIVERY,
    VLLM_PYTHON,
    effects,
    publish_with_plain_nats,
    run_events,
    wait_for_caused,
)

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.e2e,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM env: scripts/setup.sh --vllm"),
]

# One crash per service, each where it hurts: mid-work, or between the work's commit and the
# acknowledgement (redelivered: must not be done twice), or between a publish and the outbox
# mark (published again: the broker's dedupe must drop it).
CRASHES = (
    "ingest.DatasetSubmitted.handled",
    "ingest.outbox.published",
    "trainer.DatasetReady.working@2",
    "quantizer.TrainingDone.working",
    "inference.AdapterQuantized.working",
    # The tiny model's benchmark takes about a second: crash after it is recorded, unacked.
    "evaluator.ModelDeployed.handled",
    "gateway.EvaluationCompleted.handled",
    # The gateway's first publish is the baseline's promotion at start-up; the second is this
    # run's canary_started.
    "gateway.outbox.published@2",
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


async def count_rows(database_url: str, run_id: str) -> dict[str, int]:
    tables = (
        "ingest_dataset_versions",
        "trainer_jobs",
        "quantizer_models",
        "inference_deployments",
        "gateway_deployments",
    )
    db = Database(database_url)
    try:
        async with db.session() as session:
            return {
                t: int(
                    (
                        await session.execute(
                            text(f"SELECT count(*) FROM {t} WHERE run_id = :r"),  # noqa: S608
                            {"r": run_id},
                        )
                    ).scalar_one()
                )
                for t in tables
            }
    finally:
        await db.dispose()


async def test_every_service_killed_inside_its_work_still_one_effect_per_stage(
    tmp_path: Path, models_dir: Path
) -> None:
    home = tmp_path / "home"
    env = {
        **demo_env("tiny"),
        **FAST_REDELIVERY,
        "TUNELOOP_MODELS_DIR": str(models_dir),
        "TUNELOOP_FAILPOINTS": ",".join(CRASHES),
        "TRAINER_CHECKPOINT_EVERY_STEPS": "25",
    }
    embedded = Embedded(home=home, extra_env=env)
    state = await asyncio.to_thread(embedded.start)

    async def submit(corpus: Path) -> str:
        # The corpus is already in the artifact store; a DatasetSubmitted command ingests it.
        store_root = Path(state["artifact_store_url"].removeprefix("file://"))
        dest = store_root / "imports" / corpus.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus, dest)
        command = DatasetSubmitted(
            run_id="run-chaos-submit",
            producer="chaos-test",
            dataset_name="chaos",
            files=[dest.resolve().as_uri()],
            format="openai",
        )
        await publish_with_plain_nats(
            state["nats_url"],
            Namespace().subject(command.subject),
            command.model_dump(mode="json"),
        )
        ready = await wait_for_caused(state["nats_url"], str(command.event_id), DatasetReady)
        return ready.run_id

    try:
        result = await run_demo(state, embedded, train_records=600, timeout_s=1500, start=submit)
        story = "\n".join(
            [type(e).__name__ + " " + e.model_dump_json()[:200] for e in result.events]
            + result.supervisor_notes
        )
        assert result.outcome == "promoted", story
        assert failpoints.fired(home) == sorted(c.split("@")[0] for c in CRASHES), story
        for service in ("ingest", "trainer", "quantizer", "inference", "evaluator", "gateway"):
            assert any(n.startswith(f"{service} exited") for n in result.supervisor_notes), story

        counts = effects(await run_events(state["nats_url"], result.run_id))
        print("effects:", dict(counts))
        assert counts["DatasetReady"] == 1, counts
        assert counts["TrainingDone"] == 1, counts
        assert counts["AdapterQuantized"] == 1, counts  # one target: bf16-merged
        assert counts["ModelDeployed(candidate)"] == 1, counts
        assert counts["EvaluationCompleted"] == 1, counts
        assert counts["RolloutChanged(canary_started)"] == 1, counts
        assert counts["RolloutChanged(promoted)"] == 1, counts
        failures = [k for k in counts if k.endswith("Failed") or k == "DatasetRejected"]
        assert not failures, counts
        rows = await count_rows(state["database_url"], result.run_id)
        print("rows:", rows)
        assert rows == {t: 1 for t in rows}, rows
        # Requests fail only while the one gateway replica itself is down (restarting).
        print(f"client requests: {result.requests_sent}, failed: {result.request_errors}")
    finally:
        await asyncio.to_thread(embedded.stop)


def engine_pid(endpoint: str) -> int:
    """The process listening on the deployment's endpoint: its vLLM API server."""
    port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        if listening and conn.pid:
            return conn.pid
    raise LookupError(f"nothing listens on port {port}")


async def test_the_canary_engine_killed_under_traffic_is_rolled_back_without_client_errors(
    tmp_path: Path, models_dir: Path
) -> None:
    env = {
        **demo_env("tiny"),
        "TUNELOOP_MODELS_DIR": str(models_dir),
        # A long first step, so the canary is still at 25% when its engine dies.
        "GATEWAY_STEP_MIN_SECONDS": "600",
    }
    embedded = Embedded(home=tmp_path / "home", extra_env=env)
    state = await asyncio.to_thread(embedded.start)
    killed: dict[str, Any] = {}

    async def kill_canary_engine(event: Event) -> None:
        if isinstance(event, RolloutChanged) and event.action == "canary_started":
            candidate = next(
                e
                for e in result_events
                if getattr(e, "deployment_id", None) == event.deployment_id
                and type(e).__name__ == "ModelDeployed"
            )
            await asyncio.sleep(5)  # let some canary traffic flow first
            pid = engine_pid(candidate.endpoint)  # type: ignore[attr-defined]
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            killed["at"] = time.monotonic()
            killed["pid"] = pid

    result_events: list[Event] = []

    async def observe(event: Event) -> None:
        result_events.append(event)
        await kill_canary_engine(event)

    try:
        result = await run_demo(state, embedded, train_records=600, timeout_s=1500, observe=observe)
        story = "\n".join(type(e).__name__ + " " + e.model_dump_json()[:300] for e in result.events)
        assert killed, f"the canary never started:\n{story}"
        assert result.outcome == "rolled back", story
        rollback = result.last(RolloutChanged)
        print(
            f"rolled back {time.monotonic() - killed['at']:.1f}s after the kill "
            f"(at most); reason: {rollback.reason}"
        )
        assert rollback.weight == 0.0
        # Requests that the dead canary would have answered were retried on stable.
        assert result.request_errors == 0, result
    finally:
        await asyncio.to_thread(embedded.stop)
