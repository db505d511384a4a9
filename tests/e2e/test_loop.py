"""The whole loop on the tiny model: real NATS, real vLLM (CPU), SQLite, the six services as
processes. A dataset goes in; a fine-tuned model comes out serving production traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.demo import demo_env, run_demo
from shared.events import EvaluationCompleted, ModelDeployed, RolloutChanged
from shared.runs import load_spans
from shared.supervisor import SERVICES, Embedded, available_services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.mark.skipif(
    not (ROOT / ".venvs" / "vllm" / "bin" / "python").exists(),
    reason="vLLM env missing: run scripts/setup.sh --vllm (make test does)",
)
async def test_a_dataset_becomes_a_promoted_model_serving_through_the_gateway(
    tmp_path: Path, models_dir: Path
) -> None:
    from openai import AsyncOpenAI

    assert available_services() == list(SERVICES)
    env = {**demo_env("tiny"), "TUNELOOP_MODELS_DIR": str(models_dir)}
    embedded = Embedded(home=tmp_path / "home", extra_env=env)
    state = await asyncio.to_thread(embedded.start)
    try:
        result = await run_demo(state, embedded, train_records=600, timeout_s=1500)
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
    run_traces = {
        s["trace_id"]
        for s in spans
        if s.get("attributes", {}).get("tuneloop.run_id") == result.run_id
    }
    assert len(run_traces) == 1, run_traces
    services = {s["service"] for s in spans if s["trace_id"] in run_traces}
    assert set(SERVICES) <= services, services
