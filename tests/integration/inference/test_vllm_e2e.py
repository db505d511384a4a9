"""The inference service on real vLLM (CPU build, tiny model), one service and one base engine
shared by the module (engine start-ups are the cost): baseline at start-up, LoRA hot-load with
no restart, DoRA refused before vLLM, a candidate deployed once despite redelivery,
re-adoption after a crash, engines stopped with the service. (An engine that fails to start is
torn down with its log kept: test_lifecycle.py covers that with a real llama.cpp engine, which
fails in a second where vLLM takes a minute.)
"""

from __future__ import annotations

import uuid
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from services.inference.app import InferenceRuntime
from shared.bus import EventBus
from shared.events import DeploymentFailed, ModelDeployed
from shared.subjects import Namespace
from tests.integration.inference.conftest import (
    VLLM_PYTHON,
    events_of,
    inference_settings,
    outcome,
    pid_alive,
    quantized,
    service_settings,
    upload,
    wait_event,
)
from tests.integration.streams import eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venvs/vllm: scripts/setup.sh --vllm"),
]


@pytest.fixture(scope="module")
def e2e_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def e2e_common(nats_server, e2e_prefix, tmp_path_factory, span_file, models_dir):
    root = tmp_path_factory.mktemp("inference-e2e")
    return service_settings(
        nats_url=nats_server.url,
        prefix=e2e_prefix,
        database_url=f"sqlite+aiosqlite:///{root / 'test.db'}",
        home=root / "home",
        store_url=(root / "store").as_uri(),
    )


@pytest.fixture(scope="module")
def e2e_settings():
    return inference_settings(baseline_model="tiny", max_engines=3)


@pytest_asyncio.fixture(scope="module")
async def service(e2e_common, e2e_settings, tiny_model):
    holder = {"runtime": InferenceRuntime(e2e_settings, e2e_common)}
    await holder["runtime"].start()
    yield holder
    if holder["runtime"] is not None:
        await holder["runtime"].stop()


async def complete(endpoint: str, model: str, prompt: str = "Hello") -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{endpoint}/completions",
            json={
                "model": model,
                "prompt": prompt,
                "max_tokens": 12,
                "temperature": 0,
                "min_tokens": 12,
            },
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["choices"][0]["text"])


async def served(endpoint: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{endpoint}/models") as resp:
        return [m["id"] for m in (await resp.json())["data"]]


async def publish(common, event, *, msg_id: str | None = None) -> None:
    async with EventBus(common.bus_settings(), service="test") as bus:
        if msg_id is None:
            await bus.publish(event)
        else:  # a redelivery past the broker's dedupe window
            ns = Namespace(common.subject_prefix)
            await bus.publish_raw(
                ns.subject(event.subject), event.model_dump_json().encode(), msg_id=msg_id
            )


async def baseline_row(runtime: InferenceRuntime):
    rows = await runtime.rollout.deployments()
    return next(r for r in rows if r.role == "baseline")


async def test_baseline_is_deployed_at_start_up_and_serves(service, e2e_common, nats_server):
    runtime = service["runtime"]
    await runtime.wait_baseline()
    deployed = await wait_event(
        nats_server.url, e2e_common.subject_prefix, ModelDeployed, lambda e: e.role == "baseline"
    )
    assert deployed.engine == "vllm-cpu" and deployed.served_model_name == "tuneloop"
    assert deployed.model_id == "base-tiny"
    assert {"tuneloop", deployed.deployment_id} <= set(await served(deployed.endpoint))
    assert (await complete(deployed.endpoint, "tuneloop")).strip()
    row = await baseline_row(runtime)
    assert row.status == "ready" and pid_alive(row.pid) and row.stable_rank == 0
    assert (await runtime.ready())["baseline"]


async def test_lora_is_hot_loaded_into_the_running_base_engine(
    service, e2e_common, nats_server, adapters
):
    runtime = service["runtime"]
    base = await baseline_row(runtime)
    artifact = await upload(runtime.store, adapters["lora"], kind="adapter")
    await publish(
        e2e_common, quantized(artifact, format="adapter", model_id="m-lora", adapter_id="lora-1")
    )
    deployed = await outcome(nats_server.url, e2e_common.subject_prefix, "m-lora", 120)
    assert isinstance(deployed, ModelDeployed), deployed
    assert deployed.endpoint == base.endpoint and deployed.format == "adapter"
    assert deployed.served_model_name == "tuneloop-lora-1"
    assert "tuneloop-lora-1" in await served(base.endpoint or "")
    # Served by name, with the adapter applied (random LoRA weights change the output) ...
    assert await complete(base.endpoint or "", "tuneloop-lora-1") != await complete(
        base.endpoint or "", "tuneloop"
    )
    # ... and without a restart of the engine.
    assert (await baseline_row(runtime)).pid == base.pid and pid_alive(base.pid)


async def test_dora_adapter_is_refused_before_it_reaches_vllm(
    service, e2e_common, nats_server, adapters
):
    runtime = service["runtime"]
    base = await baseline_row(runtime)
    artifact = await upload(runtime.store, adapters["dora"], kind="adapter")
    await publish(
        e2e_common, quantized(artifact, format="adapter", model_id="m-dora", adapter_id="dora-1")
    )
    failed = await outcome(nats_server.url, e2e_common.subject_prefix, "m-dora", 60)
    assert isinstance(failed, DeploymentFailed) and not failed.retryable
    # Our refusal, not vLLM's error ("vLLM does not yet support DoRA"): it never got there.
    assert failed.reason.startswith("DoRA adapter refused")
    assert "tuneloop-dora-1" not in await served(base.endpoint or "")
    log = Path(base.log_path or "").read_text(errors="replace")
    assert "tuneloop-dora-1" not in log


async def test_candidate_is_deployed_once_even_when_redelivered(
    service, e2e_common, nats_server, tiny_model
):
    runtime = service["runtime"]
    artifact = await upload(runtime.store, tiny_model)
    event = quantized(artifact, model_id="m-cand", run_id="run-cand")
    await publish(e2e_common, event)
    deployed = await outcome(nats_server.url, e2e_common.subject_prefix, "m-cand", 240)
    assert isinstance(deployed, ModelDeployed), deployed
    assert deployed.role == "candidate" and deployed.causation_id == event.event_id
    assert (await complete(deployed.endpoint, "tuneloop")).strip()
    row = await runtime.rollout.get(deployed.deployment_id)
    assert row is not None and pid_alive(row.pid)

    await publish(e2e_common, event, msg_id=str(uuid.uuid4()))

    await eventually(lambda: _settled(e2e_common), timeout_s=60, what="redelivery handled")
    rows = [r for r in await runtime.rollout.deployments() if r.model_id == "m-cand"]
    assert [(r.id, r.pid) for r in rows] == [(row.id, row.pid)]
    announced = [
        e
        for e in await events_of(nats_server.url, e2e_common.subject_prefix, ModelDeployed)
        if e.model_id == "m-cand"
    ]
    assert len(announced) == 1


async def _settled(common) -> bool:
    import nats

    nc = await nats.connect(common.nats_url)
    try:
        js = nc.jetstream()
        infos = await js.consumers_info(Namespace(common.subject_prefix).stream)
        return all(not i.num_pending and not i.num_ack_pending for i in infos)
    finally:
        await nc.close()


async def test_a_restarted_service_re_adopts_running_engines(
    service, e2e_common, e2e_settings, nats_server
):
    runtime = service["runtime"]
    before = {r.id: r.pid for r in await runtime.rollout.deployments() if r.status == "ready"}
    announced = len(await events_of(nats_server.url, e2e_common.subject_prefix, ModelDeployed))
    await runtime.abandon()  # as a crash would: engines keep running

    again = InferenceRuntime(e2e_settings, e2e_common)
    service["runtime"] = again  # the module fixture stops this one
    await again.start()
    await again.wait_baseline()
    after = {r.id: r.pid for r in await again.rollout.deployments() if r.status == "ready"}
    assert after == before
    assert all(pid_alive(p) for p in after.values() if p is not None)
    base = await baseline_row(again)
    assert "tuneloop-lora-1" in await served(base.endpoint or "")
    assert len(await events_of(nats_server.url, e2e_common.subject_prefix, ModelDeployed)) == (
        announced
    )

    await again.stop()
    for pid in filter(None, after.values()):
        await eventually(lambda p=pid: not pid_alive(p), timeout_s=30, what=f"pid {pid} gone")
    service["runtime"] = None
    rows = await again.rollout.deployments()
    await again.db.dispose()
    assert {r.status for r in rows} <= {"stopped", "failed", "ready"}
    assert all(r.status == "stopped" for r in rows if r.has_engine and r.status != "failed")
