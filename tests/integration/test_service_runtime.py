"""shared/service.py and `tuneloop up/down`: the pieces every service is made of, for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import pytest

from shared.bus import Delivery
from shared.events import DatasetRejected, DatasetSubmitted
from shared.service import ServiceRuntime
from shared.settings import CommonSettings
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def test_runtime_handles_an_event_and_publishes_its_answer_through_the_outbox(
    nats_server, prefix, tmp_path, span_file
):
    common = CommonSettings(home=tmp_path, nats_url=nats_server.url, subject_prefix=prefix)
    runtime = ServiceRuntime("ingest", common)

    async def on_submitted(event: DatasetSubmitted, delivery: Delivery) -> None:
        async with runtime.transaction() as session:
            runtime.emit(
                session, event.follow(DatasetRejected, producer="ingest", reason="no valid records")
            )

    runtime.bus.subscribe(DatasetSubmitted, on_submitted)
    transport = httpx.ASGITransport(app=runtime.http)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/readyz")).status_code == 503  # not started yet
        await runtime.start()
        try:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"started": True, "broker": True, "database": True}
            submitted = DatasetSubmitted(
                run_id="run-rt", producer="test", dataset_name="d", files=["file:///d"]
            )
            await runtime.bus.publish(submitted)
            ns = runtime.ns
            msgs = await eventually(
                lambda: _subject(
                    read_stream(nats_server.url, ns.stream), ns.subject("dataset.rejected")
                ),
                what="DatasetRejected on the stream",
            )
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
        finally:
            await runtime.stop()
    rejected = DatasetRejected.model_validate_json(msgs[0].data)
    assert rejected.causation_id == submitted.event_id
    assert rejected.run_id == "run-rt"
    # The relay's publish carries the handler's trace context: one trace across the hop.
    spans = [json.loads(line) for line in span_file.read_text().splitlines()]
    consume = next(
        s
        for s in spans
        if s["name"] == "consume dataset.submitted"
        and s["attributes"].get("tuneloop.run_id") == "run-rt"
    )
    traceparent = msgs[0].headers["traceparent"]
    assert traceparent.split("-")[1] == consume["trace_id"]


async def _subject(coro, subject):
    return [m for m in await coro if m.subject == subject]


async def test_tuneloop_up_starts_infrastructure_and_down_stops_it(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "TUNELOOP_HOME": str(home)}
    env.pop("TUNELOOP_NATS_URL", None)
    env.pop("DATABASE_URL", None)
    up = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--services", ""],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        state_file = home / "up.json"
        await eventually(state_file.exists, timeout_s=60, what="up.json")
        state = json.loads(state_file.read_text())
        nc = await nats.connect(state["nats_url"])
        assert nc.is_connected
        await nc.close()
        assert Path(state["database_url"].split(":///")[1]).exists()  # migrated SQLite
        down = subprocess.run(
            [sys.executable, "-m", "shared.cli", "down"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert down.returncode == 0, down.stderr.decode()
        up.wait(30)
        assert not state_file.exists()
        assert up.returncode == 0
        for pid in state["infra_pids"]:  # nats-server is gone too
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGKILL)
    _, err = up.communicate()
    assert "tuneloop is up" in err.decode()


@pytest.mark.timeout(120)
async def test_stop_right_after_a_commit_always_returns(nats_server, prefix, tmp_path):
    """Regression: the outbox relay's stop() hung about once in 20-80 stops that came right
    after a commit (a cancellation swallowed under the relay's loop; CI hung 15 min on it)."""
    common = CommonSettings(home=tmp_path, nats_url=nats_server.url, subject_prefix=prefix)
    for i in range(40):
        runtime = ServiceRuntime("ingest", common)
        await runtime.start()
        async with runtime.transaction() as session:
            runtime.emit(
                session,
                DatasetRejected(run_id=f"run-{i}", producer="test", reason="r", dataset_name="d"),
            )
        async with asyncio.timeout(30):
            await runtime.stop()
