"""What the loop-level tests (e2e and chaos tiers) share: reading a run back from the stream,
and starting a run without the ingest upload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats

from shared.events import Event, ModelDeployed, RolloutChanged
from shared.runs import load_spans, read_events

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venvs" / "vllm" / "bin" / "python"
# The loop tests check the pipeline, not the latency SLO: on 2 shared cores a cold canary's
# p95 swings by seconds, so only errors (and the circuit breaker) judge the canary here.
LOOP_TEST_ENV = {"GATEWAY_SLO_P95_SLACK_MS": "60000"}
# Crashed handlers are redelivered after ack_wait: keep the chaos runs short.
FAST_REDELIVERY = {
    "TUNELOOP_ACK_WAIT_S": "10",
    "TRAINER_ACK_WAIT_S": "15",
    "QUANTIZER_ACK_WAIT_S": "15",
    "INFERENCE_ACK_WAIT_S": "15",
    "EVALUATOR_ACK_WAIT_S": "15",
}


async def run_events(nats_url: str, run_id: str, prefix: str = "tuneloop") -> list[Event]:
    """Every message the stream holds for ``run_id``, in order (one per effect published)."""
    return [e for e in await all_events(nats_url, prefix) if e.run_id == run_id]


def effects(events: list[Event]) -> Counter[str]:
    """How many times each stage's effect was published for a run."""
    counts: Counter[str] = Counter()
    for event in events:
        name = type(event).__name__
        if isinstance(event, ModelDeployed):
            name += f"({event.role})"
        if isinstance(event, RolloutChanged):
            name += f"({event.action})"
        counts[name] += 1
    return counts


def _ref(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "uri": path.resolve().as_uri(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
    }


def write_external_dataset(store_url: str, corpus: Path, name: str) -> dict[str, Any]:
    """A dataset prepared by someone else's tooling, written into the artifact store with
    nothing but the standard library: splits, a report and curriculum manifests. Returns
    the DatasetReady payload (plain JSON) that announces it."""
    root = Path(urlparse(store_url).path) / "external" / name
    root.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    rng = random.Random(1)
    rng.shuffle(records)
    cut = max(1, len(records) // 10)
    validation, train = records[:cut], records[cut:]
    for split, rows in (("train", train), ("validation", validation)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "report.json").write_text(json.dumps({"prepared_by": "an external tool"}))
    ids = [r["id"] for r in train]
    curriculum = {}
    for phase in ("A", "B", "C"):
        order = ids[:]
        random.Random(phase).shuffle(order)
        manifest = {"phase": phase, "description": "external", "seed": 42, "record_ids": order}
        (root / f"curriculum-{phase}.json").write_text(json.dumps(manifest))
        curriculum[phase] = _ref(root / f"curriculum-{phase}.json")
    categories = Counter(r["category"] for r in train)
    return {
        "event_id": str(uuid.uuid4()),
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "run_id": f"run-ext-{uuid.uuid4().hex[:12]}",
        "producer": "external-tool",
        "dataset_id": f"ext-{hashlib.sha256(corpus.read_bytes()).hexdigest()[:16]}",
        "dataset_name": name,
        "origin": "upload",
        "train": _ref(root / "train.jsonl"),
        "validation": _ref(root / "validation.jsonl"),
        "report": _ref(root / "report.json"),
        "curriculum": curriculum,
        "counts": {"train": len(train), "validation": len(validation)},
        "counts_by_category": dict(categories),
    }


async def publish_with_plain_nats(nats_url: str, subject: str, payload: dict[str, Any]) -> None:
    """What a user's own script does: nats-py, JetStream publish, no tuneloop import."""
    nc = await nats.connect(nats_url)
    try:
        ack = await nc.jetstream().publish(
            subject, json.dumps(payload).encode(), headers={"Nats-Msg-Id": payload["event_id"]}
        )
        assert ack.stream, ack
    finally:
        await nc.close()


async def all_events(nats_url: str, prefix: str = "tuneloop") -> list[Event]:
    """Every pipeline event the stream holds, in order."""
    return await read_events(nats_url, prefix)


def run_trace_ids(span_file: Path, run_id: str) -> set[str]:
    """The trace ids of the spans that carry ``run_id`` (one per run, crashes or not)."""
    return {
        s["trace_id"]
        for s in load_spans(span_file)
        if s.get("attributes", {}).get("tuneloop.run_id") == run_id
    }


async def wait_for_caused(
    nats_url: str, cause: str, kind: type[Event], *, timeout_s: float = 300
) -> Event:
    """The first ``kind`` event whose causation id is ``cause`` (e.g. the DatasetReady that a
    DatasetSubmitted command produced, which starts a run of its own)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        for event in await all_events(nats_url):
            if isinstance(event, kind) and str(event.causation_id) == cause:
                return event
        await asyncio.sleep(1)
    raise TimeoutError(f"no {kind.__name__} caused by {cause} within {timeout_s:.0f}s")
