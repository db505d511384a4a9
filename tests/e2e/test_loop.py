"""The whole loop on the tiny model: real NATS, real vLLM (CPU), SQLite, the six services as
processes. A dataset goes in; a fine-tuned model comes out serving production traffic."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from shared.db import Database
from shared.demo import demo_env, remote_state, run_demo
from shared.events import EvaluationCompleted, ModelDeployed, RolloutChanged
from shared.runs import load_spans
from shared.subjects import DATASET_READY, Namespace
from shared.supervisor import SERVICES, Embedded, available_services
from tests.e2e.harness import (
    FAST_REDELIVERY,
    LOOP_TEST_ENV,
    VLLM_PYTHON,
    effects,
    publish_with_plain_nats,
    run_events,
    run_trace_ids,
    write_external_dataset,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason="vLLM env missing: run scripts/setup.sh --vllm (make test does)",
)


@needs_vllm
async def test_a_dataset_becomes_a_promoted_model_serving_through_the_gateway(
    tmp_path: Path, models_dir: Path
) -> None:
    from openai import AsyncOpenAI

    assert available_services() == list(SERVICES)
    env = {**demo_env("tiny"), **LOOP_TEST_ENV, "TUNELOOP_MODELS_DIR": str(models_dir)}
    embedded = Embedded(home=tmp_path / "home", extra_env=env)
    state = await asyncio.to_thread(embedded.start)
    try:
        # Driven as `tuneloop demo --gateway URL` drives a system it did not start (compose).
        remote = remote_state(
            gateway_url=f"http://127.0.0.1:{state['services']['gateway']['http_port']}",
            ingest_url=f"http://127.0.0.1:{state['services']['ingest']['http_port']}",
            nats_url=state["nats_url"],
            home=tmp_path / "client",
        )
        result = await run_demo(remote, None, train_records=600, timeout_s=1500)
        story = "\n".join(type(e).__name__ + " " + e.model_dump_json()[:300] for e in result.events)
        assert result.outcome == "promoted", story

        evaluation = result.last(EvaluationCompleted)
        assert evaluation.passed
        assert evaluation.baseline is not None, "the candidate was compared with production"
        # Fine-tuning helped: the base model cannot do the task, the fine-tuned one can.
        assert evaluation.overall_score > evaluation.baseline.overall_score, story
        candidate = next(
            e for e in result.events if isinstance(e, ModelDeployed) and e.role == "candidate"
        )
        promoted = result.last(RolloutChanged)
        assert promoted.action == "promoted"
        assert promoted.deployment_id == candidate.deployment_id

        # Production traffic now reaches the fine-tuned model, through the official client.
        client = AsyncOpenAI(base_url=f"{result.gateway_url}/v1", api_key=result.client_key)
        raw = await client.chat.completions.with_raw_response.create(
            model="tuneloop",
            messages=[{"role": "user", "content": "remind me to water the plants tomorrow"}],
            max_tokens=32,
            temperature=0,
        )
        assert raw.headers["x-tuneloop-deployment"] == candidate.deployment_id
        assert raw.parse().choices[0].message.content
        await client.close()
    finally:
        await asyncio.to_thread(embedded.stop)

    # One run = one trace, across all six services.
    spans = load_spans(Path(state["span_file"]))
    run_traces = run_trace_ids(Path(state["span_file"]), result.run_id)
    assert len(run_traces) == 1, run_traces
    services = {s["service"] for s in spans if s["trace_id"] in run_traces}
    assert set(SERVICES) <= services, services


@needs_vllm
async def test_plain_nats_dataset_ready_on_postgres_survives_a_trainer_kill(
    tmp_path: Path, models_dir: Path
) -> None:
    """A DatasetReady published by a user's own nats-py script (no tuneloop code) starts a run
    on PostgreSQL; the trainer is SIGKILLed mid-training, the supervisor restarts it, and the
    run ends with exactly one adapter and one promoted model."""
    env = {
        **demo_env("tiny"),
        **LOOP_TEST_ENV,
        **FAST_REDELIVERY,
        "TUNELOOP_MODELS_DIR": str(models_dir),
        # SIGKILL right after the second checkpoint (step 50 of phase A) is recorded.
        "TUNELOOP_FAILPOINTS": "trainer.checkpoint.stored@2",
        "TRAINER_CHECKPOINT_EVERY_STEPS": "25",
    }
    embedded = Embedded(home=tmp_path / "home", postgres=True, extra_env=env)
    state = await asyncio.to_thread(embedded.start)
    assert state["database_url"].startswith("postgresql")

    published: dict[str, Any] = {}

    async def publish_ready(corpus: Path) -> str:
        payload = write_external_dataset(state["artifact_store_url"], corpus, "external")
        published.update(payload)
        subject = Namespace().subject(DATASET_READY)
        await publish_with_plain_nats(state["nats_url"], subject, payload)
        return str(payload["run_id"])

    try:
        result = await run_demo(
            state, embedded, train_records=600, timeout_s=1500, start=publish_ready
        )
        story = "\n".join(type(e).__name__ + " " + e.model_dump_json()[:300] for e in result.events)
        assert result.outcome == "promoted", story
        # The trainer really died mid-training and was restarted by the supervisor.
        assert (tmp_path / "home" / "failpoints" / "trainer.checkpoint.stored").exists()
        assert any(n.startswith("trainer exited") for n in result.supervisor_notes), story
        # The restarted trainer resumed from step 50: no step before it was trained twice.
        log = (tmp_path / "home" / "logs" / "trainer.log").read_text()
        assert log.count("checkpoint A step 25 stored") == 1, log[-3000:]
        assert log.count("checkpoint A step 50 stored") == 1, log[-3000:]
        assert log.count("checkpoint A step 75 stored") == 1, log[-3000:]

        counts = effects(await run_events(state["nats_url"], result.run_id))
        assert counts["TrainingDone"] == 1, counts
        assert counts["AdapterQuantized"] == 1, counts
        assert counts["ModelDeployed(candidate)"] == 1, counts
        assert counts["EvaluationCompleted"] == 1, counts
        assert counts["RolloutChanged(promoted)"] == 1, counts
        assert counts["TrainingFailed"] == 0, counts

        db = Database(state["database_url"])
        try:
            async with db.session() as session:
                rows = (
                    await session.execute(
                        text("SELECT status, attempts FROM trainer_jobs WHERE run_id = :r"),
                        {"r": result.run_id},
                    )
                ).all()
        finally:
            await db.dispose()
        assert [r[0] for r in rows] == ["done"], rows  # one adapter, finished once
        assert rows[0][1] >= 2, rows  # ... by a second attempt after the kill
    finally:
        await asyncio.to_thread(embedded.stop)

    # The publisher sent no trace context: the run's trace is named by its event id, and the
    # trainer's delivery after the kill joins it (the killed delivery's span never ended).
    run_traces = run_trace_ids(Path(state["span_file"]), result.run_id)
    assert run_traces == {uuid.UUID(published["event_id"]).hex}, run_traces
