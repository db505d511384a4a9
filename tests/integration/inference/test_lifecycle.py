"""The inference service's lifecycle with real engines that start in seconds (llama.cpp serving
a real GGUF), real nats-server, SQLite and PostgreSQL: rollout, idempotent redelivery,
re-adoption after a crash, restart after a clean stop, promotion/retirement, the engine
budget, failures and hostile input."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest

from services.inference.app import InferenceRuntime
from shared.bus import EventBus
from shared.events import DeploymentFailed, DeploymentRetired, ModelDeployed, RolloutChanged
from shared.subjects import Namespace
from tests.integration.inference.conftest import (
    events_of,
    inference_settings,
    outcome,
    pid_alive,
    quantized,
    service_settings,
    upload,
)
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration


@pytest.fixture
def common(nats_server, prefix, database_url, tmp_path, span_file):
    return service_settings(
        nats_url=nats_server.url,
        prefix=prefix,
        database_url=database_url,
        home=tmp_path / "home",
        store_url=(tmp_path / "store").as_uri(),
    )


@pytest.fixture
def sqlite_common(nats_server, prefix, tmp_path, span_file):
    """For tests whose subject is not the database (the CLI): SQLite only."""
    return service_settings(
        nats_url=nats_server.url,
        prefix=prefix,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        home=tmp_path / "home",
        store_url=(tmp_path / "store").as_uri(),
    )


async def completion(endpoint: str, model: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{endpoint}/completions",
            json={
                "model": model,
                "prompt": "The capital of France is",
                "max_tokens": 8,
                "temperature": 0,
            },
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return str(body["choices"][0]["text"])


async def publish(common, event) -> None:
    async with EventBus(common.bus_settings(), service="test") as bus:
        await bus.publish(event)


async def test_gguf_rollout_is_idempotent_readopted_after_crash_and_restarted_after_stop(
    common, make_runtime, gguf_model_dir, nats_server, prefix
):
    settings = inference_settings()
    runtime = await make_runtime(common, settings)
    artifact = await upload(runtime.store, gguf_model_dir)
    event = quantized(artifact, format="gguf-q4_k_m", model_id="m-gguf")
    await publish(common, event)

    deployed = await outcome(nats_server.url, prefix, "m-gguf", timeout_s=120)
    assert isinstance(deployed, ModelDeployed), deployed
    assert deployed.causation_id == event.event_id and deployed.run_id == event.run_id
    assert deployed.engine == "llama-cpp" and deployed.format == "gguf-q4_k_m"
    assert deployed.served_model_name == "tuneloop"
    assert (await completion(deployed.endpoint, "tuneloop")).strip()
    [row] = await runtime.rollout.deployments()
    assert row.engine == "llama-cpp" and row.status == "ready" and pid_alive(row.pid)
    assert row.fetch_s is not None and row.start_s is not None and row.ready_s is not None

    # A redelivery (same payload, new message id: past the broker's dedupe) starts nothing.
    ns = Namespace(prefix)
    async with EventBus(common.bus_settings(), service="test") as bus:
        await bus.publish_raw(
            ns.subject(event.subject), event.model_dump_json().encode(), msg_id=str(uuid.uuid4())
        )
    consumer_seen = await eventually(
        lambda: _acked_all(nats_server.url, ns.stream), timeout_s=30, what="redelivery handled"
    )
    assert consumer_seen
    rows = await runtime.rollout.deployments()
    assert [(r.id, r.pid) for r in rows] == [(row.id, row.pid)]
    assert len(await events_of(nats_server.url, prefix, ModelDeployed)) == 1

    # HTTP side (in this event loop: the DB engine belongs to it): listing, hostile ids.
    import httpx

    transport = httpx.ASGITransport(app=runtime.http)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        assert [d["id"] for d in (await http.get("/deployments")).json()] == [row.id]
        assert (await http.get(f"/deployments/{row.id}")).json()["status"] == "ready"
        assert (await http.get("/deployments?live=true")).json()[0]["id"] == row.id
        assert (await http.get("/deployments/" + "x" * 5000)).status_code == 404
        assert (await http.get("/deployments/..%2F..%2Fetc%2Fpasswd")).status_code == 404
        assert (await http.get("/deployments/' OR 1=1 --")).status_code == 404
        assert (await http.get("/deployments?live=maybe")).status_code == 422

    # A crash of the service (engines survive) → the next start re-adopts, starts nothing.
    await runtime.abandon()
    again = await make_runtime(common, settings)
    [adopted] = await again.rollout.deployments()
    assert adopted.pid == row.pid and adopted.status == "ready" and pid_alive(row.pid)
    assert len(await events_of(nats_server.url, prefix, ModelDeployed)) == 1

    # A clean stop stops the engine; the next start brings it back on the same endpoint.
    await again.stop()
    await eventually(lambda: not pid_alive(row.pid), timeout_s=30, what="engine stopped")
    [stopped] = await again.rollout.deployments()
    assert stopped.status == "stopped"
    third = await make_runtime(common, inference_settings(watch_interval_s=0.5))
    [restarted] = await third.rollout.deployments()
    assert restarted.status == "ready" and restarted.pid != row.pid
    assert restarted.endpoint == row.endpoint
    assert (await completion(restarted.endpoint or "", "tuneloop")).strip()
    # Same endpoint: the gateway's route still holds, nothing new to announce.
    assert len(await events_of(nats_server.url, prefix, ModelDeployed)) == 1

    # An engine that dies while serving is restarted, on the same endpoint.
    assert restarted.pid is not None
    os.killpg(restarted.pid, signal.SIGKILL)

    async def healed() -> bool:
        now = await third.rollout.get(row.id)
        return bool(
            now and now.status == "ready" and now.pid != restarted.pid and pid_alive(now.pid)
        )

    await eventually(healed, timeout_s=120, what="engine restarted by the watch")
    assert (await completion(restarted.endpoint or "", "tuneloop")).strip()
    assert len(await events_of(nats_server.url, prefix, ModelDeployed)) == 1
    last = await third.rollout.get(row.id)
    await third.stop()
    assert last is not None and not pid_alive(last.pid)


async def _retirements(nats_url: str, prefix: str, n: int) -> list[DeploymentRetired] | None:
    found = await events_of(nats_url, prefix, DeploymentRetired)
    return found if len(found) >= n else None


async def _outbox_empty(runtime: InferenceRuntime) -> bool:
    from sqlmodel import select

    from shared.outbox import OutboxMessage

    async with runtime.db.session() as s:
        rows = (await s.exec(select(OutboxMessage))).all()
    return all(r.published_at is not None for r in rows)


async def _acked_all(nats_url: str, stream: str) -> bool:
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for info in await js.consumers_info(stream):
            if info.num_pending or info.num_ack_pending:
                return False
        return True
    finally:
        await nc.close()


async def test_promotion_keeps_stable_and_previous_warm_retires_older_and_bounds_engines(
    common, make_runtime, gguf_model_dir, nats_server, prefix
):
    runtime = await make_runtime(common, inference_settings(max_engines=3))
    artifact = await upload(runtime.store, gguf_model_dir)
    ids = {}
    for n in (1, 2, 3):
        await publish(common, quantized(artifact, format="gguf-q4_k_m", model_id=f"m{n}"))
        deployed = await outcome(nats_server.url, prefix, f"m{n}", timeout_s=120)
        assert isinstance(deployed, ModelDeployed), deployed
        ids[n] = deployed.deployment_id

    promotions = {
        n: RolloutChanged(
            run_id="run-x",
            producer="gateway",
            served_model_name="tuneloop",
            deployment_id=ids[n],
            action="promoted",
            weight=1.0,
        )
        for n in (1, 2, 3)
    }
    for n in (1, 2, 3):
        await publish(common, promotions[n])

    async def ranks() -> dict[int, tuple[str, int | None]]:
        rows = {r.id: r for r in await runtime.rollout.deployments()}
        return {n: (rows[ids[n]].status, rows[ids[n]].stable_rank) for n in ids}

    want = {1: ("retired", None), 2: ("ready", 1), 3: ("ready", 0)}
    await eventually(lambda: _eq(ranks(), want), timeout_s=60, what="promotions applied")
    rows = {r.id: r for r in await runtime.rollout.deployments()}
    assert rows[ids[1]].pid is None
    # The retirement is announced, in m1's run, caused by the promotion that retired it.
    [retired] = await eventually(
        lambda: _retirements(nats_server.url, prefix, 1), timeout_s=30, what="m1 retired"
    )
    assert (retired.deployment_id, retired.model_id) == (ids[1], "m1")
    assert retired.served_model_name == "tuneloop" and f"{ids[3]} promoted" in retired.reason
    assert retired.causation_id == promotions[3].event_id
    assert retired.run_id == "run-inference-test"

    # Budget 3: m2 (previous stable) + m3 (stable) + m4 fit; m5 evicts m4, never m2/m3.
    for n in (4, 5):
        await publish(common, quantized(artifact, format="gguf-q4_k_m", model_id=f"m{n}"))
        deployed = await outcome(nats_server.url, prefix, f"m{n}", timeout_s=120)
        assert isinstance(deployed, ModelDeployed), deployed
        ids[n] = deployed.deployment_id
    rows = {r.id: r for r in await runtime.rollout.deployments()}
    assert rows[ids[4]].status == "retired" and "evicted" in (rows[ids[4]].reason or "")
    assert {rows[ids[n]].status for n in (2, 3, 5)} == {"ready"}
    live = [r for r in rows.values() if r.status == "ready"]
    assert len(live) == 3 and all(pid_alive(r.pid) for r in live)

    # The gateway rolls m5 back; the event is delivered twice (a new message id each, so the
    # broker's dedupe does not hide the second), and the promotion of m3 is replayed: m5 is
    # retired and announced once, nothing else is announced again.
    rolled_back = RolloutChanged(
        run_id="run-inference-test",
        producer="gateway",
        served_model_name="tuneloop",
        deployment_id=ids[5],
        action="rolled_back",
        weight=0.0,
        reason="canary breached its SLO",
    )
    ns = Namespace(prefix)
    async with EventBus(common.bus_settings(), service="test") as bus:
        for event in (rolled_back, rolled_back, promotions[3]):
            await bus.publish_raw(
                ns.subject(event.subject),
                event.model_dump_json().encode(),
                msg_id=str(uuid.uuid4()),
            )
    await eventually(
        lambda: _acked_all(nats_server.url, ns.stream), timeout_s=60, what="all handled"
    )
    retirements = await eventually(
        lambda: _retirements(nats_server.url, prefix, 3), timeout_s=30, what="retirements"
    )
    # Nothing more comes: the relay has published everything the service recorded.
    await eventually(lambda: _outbox_empty(runtime), timeout_s=30, what="outbox drained")
    retirements = await events_of(nats_server.url, prefix, DeploymentRetired)
    assert sorted(e.deployment_id for e in retirements) == sorted([ids[1], ids[4], ids[5]])
    by_id = {e.deployment_id: e for e in retirements}
    assert "evicted" in by_id[ids[4]].reason and by_id[ids[4]].model_id == "m4"
    # Same run as its cause: it follows it (lineage and trace).
    assert by_id[ids[5]].causation_id == rolled_back.event_id
    assert "rolled_back" in by_id[ids[5]].reason
    m5 = await runtime.rollout.get(ids[5])
    assert m5 is not None and m5.status == "retired" and not pid_alive(rows[ids[5]].pid)


async def test_a_missing_engine_environment_is_a_clear_failure_not_a_retry_loop(
    common, make_runtime, tiny_model, nats_server, prefix, tmp_path
):
    runtime = await make_runtime(
        common, inference_settings(vllm_python=tmp_path / "no-venv" / "python")
    )
    artifact = await upload(runtime.store, tiny_model)
    await publish(common, quantized(artifact, model_id="m-novenv"))
    failed = await outcome(nats_server.url, prefix, "m-novenv", 60)
    assert isinstance(failed, DeploymentFailed) and "setup.sh --vllm" in failed.reason
    [row] = await runtime.rollout.deployments()
    assert row.status == "failed" and row.pid is None


async def test_cli_deploys_by_hand_and_lists_deployments(
    sqlite_common, make_runtime, gguf_model_dir, nats_server, prefix
):
    import asyncio
    import sys

    await make_runtime(sqlite_common, inference_settings())
    env = {
        **os.environ,
        "TUNELOOP_HOME": str(sqlite_common.home),
        "TUNELOOP_NATS_URL": sqlite_common.nats_url,
        "TUNELOOP_SUBJECT_PREFIX": sqlite_common.subject_prefix,
        "DATABASE_URL": sqlite_common.database_url,
        "TUNELOOP_ARTIFACT_STORE_URL": sqlite_common.artifact_store_url,
        "COLUMNS": "250",
    }
    tuneloop = str(Path(sys.executable).parent / "tuneloop")

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            tuneloop,
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await run(
        "deploy",
        str(gguf_model_dir),
        "--format",
        "gguf-q4_k_m",
        "--model-id",
        "m-cli",
        "--wait",
        "120",
    )
    assert code == 0, out
    deployed = await outcome(nats_server.url, prefix, "m-cli", 10)
    assert isinstance(deployed, ModelDeployed) and deployed.endpoint in out
    code, out = await run("deployments", "--live")
    assert code == 0 and deployed.deployment_id in out and "ready" in out
    code, out = await run("deploy", "/definitely/not/here")
    assert code != 0 and "not a directory" in out
    code, out = await run("deploy", str(gguf_model_dir), "--format", "pickle")
    assert code != 0


async def _rank_of(runtime: InferenceRuntime, deployment_id: str) -> int | None:
    row = await runtime.rollout.get(deployment_id)
    return row.stable_rank if row else None


async def _eq(value, want) -> bool:
    return (await value) == want


async def test_corrupt_missing_and_hostile_artifacts_fail_cleanly_and_the_service_goes_on(
    common, make_runtime, gguf_model_dir, nats_server, prefix, tmp_path
):
    runtime = await make_runtime(common, inference_settings())
    artifact = await upload(runtime.store, gguf_model_dir)

    # Corrupt: the stored GGUF's bytes changed after upload (sha256 no longer matches).
    manifest = await runtime.store.get_bytes(artifact)
    import json

    entry = json.loads(manifest)["files"][0]
    stored = Path(entry["uri"].removeprefix("file://"))
    os.chmod(stored, 0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    await publish(common, quantized(artifact, format="gguf-q4_k_m", model_id="m-corrupt"))
    failed = await outcome(nats_server.url, prefix, "m-corrupt", 60)
    assert isinstance(failed, DeploymentFailed) and not failed.retryable
    assert "sha256" in failed.reason

    # Hostile: two GGUFs in one artifact; a checkpoint without config.json.
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF" + os.urandom(64))
    (two / "b.gguf").write_bytes(b"GGUF" + os.urandom(64))
    ref = await upload(runtime.store, two)
    await publish(common, quantized(ref, format="gguf-q4_k_m", model_id="m-two"))
    failed = await outcome(nats_server.url, prefix, "m-two", 60)
    assert isinstance(failed, DeploymentFailed) and ".gguf files" in failed.reason
    empty = tmp_path / "noconfig"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(os.urandom(128))
    ref = await upload(runtime.store, empty)
    await publish(common, quantized(ref, model_id="m-noconfig"))
    failed = await outcome(nats_server.url, prefix, "m-noconfig", 60)
    assert isinstance(failed, DeploymentFailed) and "config.json" in failed.reason

    # GPU-only format on this CPU machine: refused with the reason, never retried.
    await publish(common, quantized(artifact, format="awq-w4a16", model_id="m-awq"))
    failed = await outcome(nats_server.url, prefix, "m-awq", 60)
    assert isinstance(failed, DeploymentFailed) and not failed.retryable
    assert "GPU" in failed.reason

    # A GGUF that is not one (right hash, garbage bytes): the engine fails to load it;
    # torn down, log tail kept in the store, the reason says so.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    ref = await upload(runtime.store, bad)
    await publish(common, quantized(ref, format="gguf-q4_k_m", model_id="m-bad"))
    failed = await outcome(nats_server.url, prefix, "m-bad", 120)
    assert isinstance(failed, DeploymentFailed), failed
    assert "engine not ready" in failed.reason and "engine log (tail)" in failed.reason
    rows = {r.model_id: r for r in await runtime.rollout.deployments()}
    assert rows["m-bad"].status == "failed" and rows["m-bad"].log_uri
    assert Path(rows["m-bad"].log_uri.removeprefix("file://")).stat().st_size > 0
    assert all(not pid_alive(r.pid) for r in rows.values())

    # Malformed payload on the subject: dead-lettered by the bus, the service goes on.
    ns = Namespace(prefix)
    async with EventBus(common.bus_settings(), service="test") as bus:
        await bus.publish_raw(
            ns.subject("adapter.quantized"), b'{"not": "an event"' * 1000, msg_id="junk-1"
        )
    await eventually(
        lambda: read_stream(nats_server.url, ns.dead_letter_stream), timeout_s=30, what="DLQ"
    )
    await publish(common, quantized(artifact, format="gguf-q4_k_m", model_id="m-after"))
    assert isinstance(await outcome(nats_server.url, prefix, "m-after", 60), DeploymentFailed)
    # (still the corrupted artifact: the point is that the service answered)
