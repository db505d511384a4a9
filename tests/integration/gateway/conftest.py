"""Gateway fixtures: a scripted upstream per deployment, gateways on a real NATS and a real
database (SQLite or PostgreSQL), and helpers that publish the pipeline's events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from services.gateway.app import GatewayService
from services.gateway.settings import GatewaySettings
from shared.bus import BusSettings, EventBus
from shared.events import (
    DeploymentRetired,
    EvaluationCompleted,
    LatencyPercentiles,
    ModelDeployed,
)
from shared.settings import CommonSettings
from tests.integration.gateway.fake_upstream import FakeUpstream

ADMIN_KEY = "test-admin-key-not-default"
MODEL = "tuneloop"

# Fast rollout for tests: tiny steps, no minimum time, judged after 5 outcomes.
FAST = {
    "canary_steps": [0.2, 0.5, 1.0],
    "step_min_requests": 6,
    "step_min_seconds": 0.0,
    "slo_min_samples": 5,
    # A loaded CI machine makes latency noisy: only a gross p95 regression counts here.
    "slo_p95_slack_ms": 400.0,
    "control_interval_s": 0.05,
    "sync_interval_s": 0.1,
    "capture_flush_s": 0.05,
    "upstream_timeout_s": 5.0,
    "stream_idle_timeout_s": 5.0,
    "breaker_cooldown_s": 30.0,
}


@pytest_asyncio.fixture
async def upstreams() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeUpstream] = []

    async def make(tag: str, **kwargs: Any) -> FakeUpstream:
        up = await FakeUpstream(MODEL, tag=tag, **kwargs).start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


class Pipeline:
    """Publishes what inference and the evaluator would."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def deployed(
        self, deployment_id: str, up: FakeUpstream | str, role: str
    ) -> ModelDeployed:
        endpoint = up if isinstance(up, str) else up.url
        event = ModelDeployed(
            run_id=f"run-{deployment_id}",
            producer="inference",
            deployment_id=deployment_id,
            model_id=f"model-{deployment_id}",
            engine="vllm-cpu",
            endpoint=endpoint,
            served_model_name=MODEL,
            role=role,  # type: ignore[arg-type]
        )
        await self.bus.publish(event)
        return event

    async def evaluated(self, deployed: ModelDeployed, passed: bool) -> EvaluationCompleted:
        event = deployed.follow(
            EvaluationCompleted,
            producer="evaluator",
            deployment_id=deployed.deployment_id,
            model_id=deployed.model_id,
            served_model_name=MODEL,
            benchmark="demo",
            passed=passed,
            overall_score=0.9 if passed else 0.1,
            latency=LatencyPercentiles(p50_ms=10, p95_ms=20, p99_ms=30),
            reasons=[] if passed else ["score below baseline"],
        )
        await self.bus.publish(event)
        return event

    async def retired(self, deployment_id: str, reason: str = "evicted") -> DeploymentRetired:
        event = DeploymentRetired(
            run_id=f"run-{deployment_id}",
            producer="inference",
            deployment_id=deployment_id,
            model_id=f"model-{deployment_id}",
            served_model_name=MODEL,
            reason=reason,
        )
        await self.bus.publish(event)
        return event


@pytest_asyncio.fixture
async def pipeline(bus_settings: BusSettings) -> AsyncIterator[Pipeline]:
    bus = EventBus(bus_settings, service="pipeline-test")
    async with bus:
        yield Pipeline(bus)


def common_settings(bus_settings: BusSettings, database_url: str, home: Path) -> CommonSettings:
    return CommonSettings(
        nats_url=bus_settings.nats_url,
        subject_prefix=bus_settings.prefix,
        home=home,
        admin_key=ADMIN_KEY,  # type: ignore[arg-type]
        dev_mode=True,
        ack_wait_s=bus_settings.ack_wait_s,
        max_deliver=bus_settings.max_deliver,
        **{"DATABASE_URL": database_url},
    )


@pytest.fixture
def gateways(
    bus_settings: BusSettings, tmp_path: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[GatewayService]]:
    """``async with gateways(database_url, **settings) as gw`` — a running gateway."""

    @contextlib.asynccontextmanager
    async def run(database_url: str, **overrides: Any) -> AsyncIterator[GatewayService]:
        settings = GatewaySettings(**{**FAST, "dev_client_key": False, "http_port": 0, **overrides})
        service = GatewayService(settings, common_settings(bus_settings, database_url, tmp_path))
        async with service.serving(host="127.0.0.1"):
            yield service

    return run


def base_url(gw: GatewayService) -> str:
    return f"http://127.0.0.1:{gw.port}"


async def admin_post(gw: GatewayService, path: str, json: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url(gw), timeout=10) as client:
        return await client.post(path, json=json, headers={"Authorization": f"Bearer {ADMIN_KEY}"})


async def admin_get(gw: GatewayService, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url(gw), timeout=10) as client:
        return await client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})


async def new_key(gw: GatewayService, **body: Any) -> str:
    resp = await admin_post(gw, "/admin/keys", body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])
