"""The gateway as its own process: ``python -m services.gateway.app`` refuses a default
secret outside dev mode, prints a generated client key in dev mode, serves, takes keys made
with ``tuneloop gateway-key``, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.embedded import free_port, wait_for_port
from tests.integration.gateway.conftest import MODEL
from tests.integration.streams import eventually

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


def _env(nats_url: str, prefix: str, home: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TUNELOOP_HOME": str(home),
        "TUNELOOP_NATS_URL": nats_url,
        "TUNELOOP_SUBJECT_PREFIX": prefix,
        "DATABASE_URL": f"sqlite+aiosqlite:///{home / 'gw.db'}",
        "GATEWAY_HTTP_PORT": str(port),
        "GATEWAY_SYNC_INTERVAL_S": "0.1",
        "TUNELOOP_LOG_LEVEL": "WARNING",
        **extra,
    }


async def test_process_refuses_default_secret_serves_and_stops(
    bus_settings, pipeline, upstreams, tmp_path: Path
):
    port = free_port()
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.gateway.app"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        env=_env(
            bus_settings.nats_url,
            bus_settings.prefix,
            tmp_path,
            port,
            TUNELOOP_DEV_MODE="false",
            TUNELOOP_ADMIN_KEY="tl-dev-admin-key",
        ),
    )
    assert refused.returncode != 0
    assert b"TUNELOOP_ADMIN_KEY is the development default" in refused.stderr

    env = _env(bus_settings.nats_url, bus_settings.prefix, tmp_path, port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.gateway.app",
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await asyncio.to_thread(wait_for_port, port, timeout_s=120, what="gateway")
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        while line and b"client API key" not in line:
            line = await proc.stdout.readline()
        dev_key = line.decode().rsplit(" ", 1)[1].strip()
        up = await upstreams("base")
        await pipeline.deployed("base-1", up, "baseline")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def ask(key: str) -> int:
                r = await http.post(
                    "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                )
                return r.status_code

            await eventually(lambda: _is(ask(dev_key), 200), what="dev key served")
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert "gateway_requests_total" in metrics

            cli = [sys.executable, "-m", "shared.cli", "gateway-key"]
            made = await asyncio.to_thread(
                subprocess.run,
                [*cli, "create", "--name", "ops", "--rpm", "100"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=120,
                check=True,
            )
            created = json.loads(made.stdout.decode().strip().splitlines()[-1])
            await eventually(lambda: _is(ask(created["key"]), 200), what="CLI key accepted")
            await asyncio.to_thread(
                subprocess.run,
                [*cli, "revoke", created["key_id"]],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=120,
                check=True,
            )
            await eventually(lambda: _is(ask(created["key"]), 401), what="CLI revoke applied")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _is(status: object, expected: int) -> bool:
    return await status == expected  # type: ignore[misc]
