"""A running gateway (real NATS, real database) with a finished run in its event stream.

The run is seeded by publishing the events each service would publish, through the real bus,
with the adapter (and its ``loss_curve.json``) stored through the real artifact store; the
gateway's own handlers turn the deployments and the evaluation into routes and a canary.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import pytest_asyncio

from services.gateway.app import GatewayService
from services.gateway.settings import GatewaySettings
from shared.bus import BusSettings, EventBus
from shared.events import (
    AdapterQuantized,
    BaselineComparison,
    DatasetReady,
    EvaluationCompleted,
    LatencyPercentiles,
    ModelDeployed,
    PhaseMetrics,
    SplitCounts,
    TrainingDone,
    TrainingFailed,
)
from shared.settings import CommonSettings
from tests.integration.gateway.fake_upstream import FakeUpstream
from tests.integration.streams import eventually

ADMIN_KEY = "dashboard-admin-key-not-default"
MODEL = "tuneloop"
RUN = "run-demo-0001"
FAILED_RUN = "run-broken-0002"
HOSTILE = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"
CATEGORIES = {"format": (0.05, 0.9), "intent": (0.2, 0.75), "when": (0.1, 0.6)}
CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Seeded:
    gw: GatewayService
    url: str
    base_deployment: str
    candidate: str
    steps: int
    tmp: Path


def loss_points() -> list[dict[str, Any]]:
    points = []
    for phase, start in (("A", 3.2), ("B", 1.6)):
        for step in range(1, 11):
            points.append(
                {"phase": phase, "step": step, "loss": round(start / (1 + 0.2 * step), 4)}
            )
    return points


async def seed(gw: GatewayService, bus: EventBus, tmp: Path, base_up: str, cand_up: str) -> int:
    store = gw.runtime.store
    split = tmp / "train.jsonl"
    split.write_text(
        json.dumps(
            {
                "id": "r1",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "{}"},
                ],
                "category": "intent",
                "source": "upload",
            }
        )
        + "\n"
    )
    train = await store.put_file(split, kind="dataset")
    report_body = {
        "records": {"read": 140, "kept": 132},
        "rejected_by_reason": {"duplicate": 5, "empty_answer": 3},
        "pii_scrubbed": {"email": 4, "phone": 1},
    }
    report = await store.put_bytes(
        json.dumps(report_body).encode(), kind="dataset", name="report.json"
    )
    adapter_dir = tmp / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    points = loss_points()
    (adapter_dir / "loss_curve.json").write_text(json.dumps(points))
    adapter = await store.put_dir(adapter_dir, kind="adapter")
    shutil.rmtree(adapter_dir)

    baseline = ModelDeployed(
        run_id="run-baseline",
        producer="inference",
        deployment_id="dep-base",
        model_id="tiny-base",
        engine="vllm-cpu",
        endpoint=base_up,
        served_model_name=MODEL,
        role="baseline",
    )
    await bus.publish(baseline)
    ready = DatasetReady(
        run_id=RUN,
        producer="ingest",
        dataset_id="ds-0001",
        dataset_name="demo",
        origin="upload",
        train=train,
        validation=train,
        report=report,
        curriculum={"A": train, "B": train},
        counts=SplitCounts(train=120, validation=12),
        counts_by_category={"format": 40, "intent": 50, "when": 30},
        counts_by_source={"upload": 120},
    )
    done = ready.follow(
        TrainingDone,
        producer="trainer",
        adapter_id="ad-0001",
        dataset_id="ds-0001",
        base_model="tiny",
        method="dora",
        hyperparameters_hash="0123456789abcdef",
        adapter=adapter,
        phases=[
            PhaseMetrics(phase="A", steps=10, final_loss=points[9]["loss"], seconds=4.2),
            PhaseMetrics(phase="B", steps=10, final_loss=points[-1]["loss"], seconds=4.0),
        ],
        tokens_per_second=950.0,
    )
    quantized = done.follow(
        AdapterQuantized,
        producer="quantizer",
        model_id="m-0001",
        adapter_id="ad-0001",
        base_model="tiny",
        format="bf16-merged",
        artifact=adapter,
        perplexity_before=5.12,
        perplexity_after=5.19,
    )
    deployed = quantized.follow(
        ModelDeployed,
        producer="inference",
        deployment_id="dep-cand",
        model_id="m-0001",
        engine="vllm-cpu",
        endpoint=cand_up,
        served_model_name=MODEL,
        role="candidate",
    )
    evaluated = deployed.follow(
        EvaluationCompleted,
        producer="evaluator",
        deployment_id="dep-cand",
        model_id="m-0001",
        served_model_name=MODEL,
        benchmark="demo-heldout",
        passed=True,
        overall_score=0.75,
        category_scores={c: tuned for c, (_, tuned) in CATEGORIES.items()},
        latency=LatencyPercentiles(p50_ms=41, p95_ms=88, p99_ms=120),
        baseline=BaselineComparison(
            deployment_id="dep-base",
            overall_score=0.12,
            category_scores={c: base for c, (base, _) in CATEGORIES.items()},
            latency=LatencyPercentiles(p50_ms=39, p95_ms=80, p99_ms=110),
        ),
    )
    broken = ready.model_copy(update={"run_id": FAILED_RUN, "event_id": uuid4()})
    failed = broken.follow(
        TrainingFailed, producer="trainer", reason=f"diverged: {HOSTILE}", dataset_id="ds-0001"
    )
    for event in (ready, done, quantized, deployed, evaluated, broken, failed):
        await bus.publish(event)
    return len(points)


def common(bus_settings: BusSettings, database_url: str, home: Path) -> CommonSettings:
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


@pytest_asyncio.fixture
async def seeded(
    bus_settings: BusSettings, database_url: str, tmp_path: Path, span_file: Path
) -> AsyncIterator[Seeded]:
    base_up = await FakeUpstream(MODEL, tag="base").start()
    cand_up = await FakeUpstream(MODEL, tag="cand").start()
    settings = GatewaySettings(
        dev_client_key=False, http_port=0, sync_interval_s=0.1, control_interval_s=0.1,
        step_min_requests=1_000_000,  # the canary stays where the test puts it
    )  # fmt: skip
    gw = GatewayService(settings, common(bus_settings, database_url, tmp_path / "home"))
    try:
        async with gw.serving(host="127.0.0.1") as port:
            bus = EventBus(bus_settings, service="dashboard-seed")
            async with bus:
                steps = await seed(gw, bus, tmp_path, base_up.url, cand_up.url)
            url = f"http://127.0.0.1:{port}"

            async def canary() -> bool:
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    r = await client.get(
                        "/admin/routes", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                    )
                states = {d["deployment_id"]: d["state"] for d in r.json()["models"].get(MODEL, [])}
                return states.get("dep-cand") == "canary"

            await eventually(canary, timeout_s=20, what="the candidate on canary")
            yield Seeded(gw, url, "dep-base", "dep-cand", steps, tmp_path)
    finally:
        await base_up.stop()
        await cand_up.stop()


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright", reason="playwright (PyPI) is not installed")
    return CHROMIUM
