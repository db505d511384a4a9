"""What the dashboard shows, reconstructed from the pipeline's event stream (read-only).

:class:`EventLog` keeps the stream's events in memory and reads only what is new on each
refresh (by stream sequence), so a page view costs one ``stream_info`` when nothing moved.
:func:`run_view` folds one run's events into the facts the run page draws.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.events import (
    AdapterQuantized,
    ArtifactRef,
    DatasetReady,
    DatasetSubmitted,
    EvaluationCompleted,
    Event,
    ModelDeployed,
    RolloutChanged,
    StageFailed,
    TrainingDone,
)
from shared.runs import STAGE_ORDER, load_spans, parse_stream_message, summarise_runs
from shared.storage import ArtifactStore
from shared.subjects import Namespace

log = logging.getLogger(__name__)

MAX_EVENTS = 50_000  # the oldest are forgotten beyond this (the page says how many it holds)
MAX_CURVE_BYTES = 5_000_000
MAX_REPORT_BYTES = 20_000_000
MAX_SPAN_FILE_BYTES = 50_000_000
MAX_TRACE_ROWS = 500
READ_TIMEOUT_S = 5.0
LOSS_CURVE_FILE = "loss_curve.json"


class EventLog:
    """The pipeline stream's events, read incrementally through one NATS connection."""

    def __init__(self, nats_url: str, prefix: str, *, min_interval_s: float = 1.0) -> None:
        self.nats_url = nats_url
        self.prefix = prefix
        self.ns = Namespace(prefix)
        self.min_interval_s = min_interval_s
        self.events: list[Event] = []
        self.last_seq = 0
        self._nc: Any = None
        self._lock = asyncio.Lock()
        self._checked = 0.0
        self.error = ""

    async def refresh(self, *, force: bool = False) -> list[Event]:
        async with self._lock:
            if force or time.monotonic() - self._checked >= self.min_interval_s:
                self._checked = time.monotonic()
                try:
                    # Bounded: a page never waits long on an unreachable or slow stream.
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        await self._read_new()
                    self.error = ""
                except Exception as exc:  # NATS away: show what we have, say it is stale
                    log.warning("dashboard: cannot read the event stream: %s", exc)
                    self.error = f"the event stream could not be read ({type(exc).__name__})"
            return self.events

    async def _read_new(self) -> None:
        import nats
        from nats.js.api import ConsumerConfig, DeliverPolicy

        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                self.nats_url, connect_timeout=2, max_reconnect_attempts=1
            )
        js = self._nc.jetstream()
        info = await js.stream_info(self.ns.stream)
        last = info.state.last_seq
        if last <= self.last_seq:
            return
        start = max(self.last_seq + 1, info.state.first_seq)
        sub = await js.pull_subscribe(
            self.ns.all_subjects,
            stream=self.ns.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                inactive_threshold=30,
            ),
        )
        try:
            while self.last_seq < last:
                try:
                    batch = await sub.fetch(256, timeout=2)
                except nats.errors.TimeoutError:
                    break  # messages deleted under us (limits): what we have is current
                for msg in batch:
                    seq = msg.metadata.sequence.stream
                    self.last_seq = max(self.last_seq, seq)
                    event = parse_stream_message(msg.subject, msg.data, self.prefix)
                    if event is not None:
                        self.events.append(event)
                    await msg.ack()
        finally:
            await sub.unsubscribe()
        if len(self.events) > MAX_EVENTS:
            del self.events[: len(self.events) - MAX_EVENTS]

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


def runs_table(events: list[Event]) -> list[dict[str, Any]]:
    """One row per run: origin, each stage reached with the time it took, status, reason."""
    origins = {e.run_id: e.origin for e in events if isinstance(e, DatasetReady)}
    rows = []
    for run in summarise_runs(events):
        previous = run.started_at
        stages = []
        for stage in STAGE_ORDER:
            status = run.stages.get(stage)
            if status is None:
                stages.append({"stage": stage, "reached": False})
                continue
            took = max(0.0, (status.at - previous).total_seconds())
            previous = max(previous, status.at)
            stages.append(
                {
                    "stage": stage,
                    "reached": True,
                    "ok": status.ok,
                    "event": status.event,
                    "seconds": round(took, 1),
                    "detail": status.detail,
                }
            )
        failed = run.failed
        done = "gateway" in run.stages and run.stages["gateway"].ok
        rows.append(
            {
                "run_id": run.run_id,
                "origin": origins.get(run.run_id, "-"),
                "started_at": run.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": round((run.last_at - run.started_at).total_seconds(), 1),
                "status": "failed" if failed else ("done" if done else "running"),
                "failure": f"{failed.stage}: {failed.detail}" if failed else "",
                "stages": stages,
            }
        )
    return rows


def run_view(events: list[Event], run_id: str) -> dict[str, Any] | None:
    """Everything the run page shows, from the run's own events (None: unknown run)."""
    mine = sorted((e for e in events if e.run_id == run_id), key=lambda e: e.occurred_at)
    if not mine:
        return None
    view: dict[str, Any] = {
        "run_id": run_id,
        "dataset": None,
        "training": None,
        "quantized": [],
        "deployments": [],
        "evaluations": [],
        "rollouts": [],
        "failures": [],
        "events": [
            {
                "at": e.occurred_at.isoformat(timespec="milliseconds"),
                "type": type(e).__name__,
                "producer": e.producer,
            }
            for e in mine
        ],
    }
    for e in mine:
        if isinstance(e, DatasetReady):
            view["dataset"] = {
                "dataset_id": e.dataset_id,
                "name": e.dataset_name,
                "origin": e.origin,
                "train": e.counts.train,
                "validation": e.counts.validation,
                "by_category": dict(sorted(e.counts_by_category.items())),
                "by_source": dict(sorted(e.counts_by_source.items())),
                "curriculum": sorted(e.curriculum),
                "report": e.report,
            }
        elif isinstance(e, TrainingDone):
            view["training"] = {
                "adapter_id": e.adapter_id,
                "base_model": e.base_model,
                "method": e.method,
                "tokens_per_second": e.tokens_per_second,
                "phases": [p.model_dump() for p in e.phases],
                "adapter": e.adapter,
            }
        elif isinstance(e, AdapterQuantized):
            before, after = e.perplexity_before, e.perplexity_after
            view["quantized"].append(
                {
                    "model_id": e.model_id,
                    "format": e.format,
                    "size_mb": round(e.artifact.size_bytes / 1e6, 3),
                    "perplexity_before": before,
                    "perplexity_after": after,
                    "delta": round(after - before, 4)
                    if before is not None and after is not None
                    else None,
                }
            )
        elif isinstance(e, ModelDeployed):
            view["deployments"].append(
                {
                    "deployment_id": e.deployment_id,
                    "model_id": e.model_id,
                    "engine": e.engine,
                    "served_model_name": e.served_model_name,
                    "role": e.role,
                    "format": e.format,
                    "at": e.occurred_at.isoformat(timespec="seconds"),
                }
            )
        elif isinstance(e, EvaluationCompleted):
            base = e.baseline
            cats = sorted(set(e.category_scores) | set(base.category_scores if base else {}))
            view["evaluations"].append(
                {
                    "deployment_id": e.deployment_id,
                    "benchmark": e.benchmark,
                    "passed": e.passed,
                    "overall": e.overall_score,
                    "baseline_overall": base.overall_score if base else None,
                    "categories": cats,
                    "tuned": [e.category_scores.get(c) for c in cats],
                    "base": [base.category_scores.get(c) for c in cats] if base else [],
                    "latency": e.latency.model_dump(),
                    "baseline_latency": base.latency.model_dump()
                    if base and base.latency
                    else None,
                    "reasons": e.reasons,
                }
            )
        elif isinstance(e, RolloutChanged):
            view["rollouts"].append(
                {
                    "at": e.occurred_at.isoformat(timespec="seconds"),
                    "action": e.action,
                    "deployment_id": e.deployment_id,
                    "weight": e.weight,
                    "reason": e.reason,
                    "metrics": e.metrics,
                }
            )
        if isinstance(e, StageFailed):
            view["failures"].append({"stage": e.stage, "reason": e.reason})
    return view


async def loss_curve(
    store: ArtifactStore, adapter: ArtifactRef, *, cache: dict[str, Any]
) -> list[dict[str, Any]]:
    """The per-step loss the trainer wrote into the adapter (``loss_curve.json``), fetched by
    itself from the adapter's manifest, not the whole adapter. Empty when it is absent."""
    if adapter.sha256 in cache:
        return list(cache[adapter.sha256])
    if adapter.size_bytes > MAX_CURVE_BYTES:  # the manifest itself: a list of files
        return []
    manifest = json.loads(await store.get_bytes(adapter))
    entry = next((f for f in manifest.get("files", []) if f.get("path") == LOSS_CURVE_FILE), None)
    points: list[dict[str, Any]] = []
    if entry is not None and int(entry.get("size_bytes", 0)) <= MAX_CURVE_BYTES:
        ref = ArtifactRef(uri=entry["uri"], sha256=entry["sha256"], size_bytes=entry["size_bytes"])
        for row in json.loads(await store.get_bytes(ref)):
            if isinstance(row, dict) and _number(row.get("loss")) and _number(row.get("step")):
                points.append(
                    {"phase": str(row.get("phase", "")), "step": row["step"], "loss": row["loss"]}
                )
    cache[adapter.sha256] = points
    return points


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def curve_series(points: list[dict[str, Any]]) -> dict[str, Any]:
    """uPlot's column form: x = cumulative step across phases, one y column per phase."""
    phases: list[str] = []
    for p in points:
        if p["phase"] not in phases:
            phases.append(p["phase"])
    xs: list[float] = []
    ys: dict[str, list[float | None]] = {ph: [] for ph in phases}
    offset = 0.0
    last_phase, last_step = None, 0.0
    for p in points:
        if p["phase"] != last_phase and last_phase is not None:
            offset += last_step
        last_phase, last_step = p["phase"], float(p["step"])
        xs.append(offset + float(p["step"]))
        for ph in phases:
            ys[ph].append(float(p["loss"]) if ph == p["phase"] else None)
    return {"x": xs, "phases": phases, "y": [ys[ph] for ph in phases]}


async def ingest_report(
    store: ArtifactStore, report: ArtifactRef, *, cache: dict[str, Any]
) -> dict[str, dict[str, int]]:
    """Rejected records by reason and PII placeholders by type, from ingest's report."""
    if report.sha256 in cache:
        return dict(cache[report.sha256])
    out: dict[str, dict[str, int]] = {"rejected_by_reason": {}, "pii_scrubbed": {}}
    if report.size_bytes <= MAX_REPORT_BYTES:
        data = json.loads(await store.get_bytes(report))
        for key in out:
            section = data.get(key) if isinstance(data, dict) else None
            if isinstance(section, dict):
                out[key] = {
                    str(k)[:200]: int(v)
                    for k, v in sorted(section.items())
                    if isinstance(v, int) and not isinstance(v, bool)
                }
    cache[report.sha256] = out
    return out


def trace_rows(span_file: Path, run_id: str) -> tuple[list[dict[str, Any]], str]:
    """The spans of every trace touching ``run_id`` as timeline rows (depth-first, with the
    offset from the first span), and a note when the file is missing or too large."""
    try:
        size = span_file.stat().st_size
    except OSError:
        return [], f"no span file at {span_file} (OTLP export, or no spans yet)"
    if size > MAX_SPAN_FILE_BYTES:
        return [], f"the span file is larger than {MAX_SPAN_FILE_BYTES // 1_000_000} MB"
    spans = load_spans(span_file)
    traces = {s.get("trace_id") for s in spans
              if s.get("attributes", {}).get("tuneloop.run_id") == run_id}  # fmt: skip
    mine = [s for s in spans if s.get("trace_id") in traces and "start" in s]
    if not mine:
        return [], ""
    by_id = {s["span_id"]: s for s in mine}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in mine:
        parent = span.get("parent_span_id")
        children.setdefault(parent if parent in by_id else None, []).append(span)
    for kids in children.values():
        kids.sort(key=lambda s: s["start"])
    first = min(datetime.fromisoformat(s["start"]) for s in mine)
    rows: list[dict[str, Any]] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            if len(rows) >= MAX_TRACE_ROWS:
                return
            offset = (datetime.fromisoformat(span["start"]) - first).total_seconds() * 1000
            rows.append(
                {
                    "service": span.get("service") or "",
                    "name": span.get("name", ""),
                    "depth": min(depth, 20),
                    "offset_ms": round(offset, 1),
                    "duration_ms": float(span.get("duration_ms", 0.0)),
                    "status": span.get("status", ""),
                }
            )
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    total = max((r["offset_ms"] + r["duration_ms"] for r in rows), default=0.0) or 1.0
    for row in rows:
        row["left_pct"] = round(100 * row["offset_ms"] / total, 2)
        row["width_pct"] = max(0.3, round(100 * row["duration_ms"] / total, 2))
    return rows, ""


def _step(kind: str, ident: str, run_id: str, detail: str = "") -> dict[str, Any]:
    return {"kind": kind, "id": ident, "run_id": run_id, "detail": detail}


def lineage(events: list[Event], deployment_id: str) -> list[dict[str, Any]]:
    """deployment → model → adapter → dataset version → its sources, from the events (each
    step names the run it belongs to). Empty when the deployment is unknown."""
    deployed = next(
        (
            e
            for e in reversed(events)
            if isinstance(e, ModelDeployed) and e.deployment_id == deployment_id
        ),
        None,
    )
    if deployed is None:
        return []
    where = f"{deployed.role} on {deployed.engine}, served as {deployed.served_model_name}"
    steps = [_step("deployment", deployed.deployment_id, deployed.run_id, where)]
    quantized = next(
        (e for e in events if isinstance(e, AdapterQuantized) and e.model_id == deployed.model_id),
        None,
    )
    if quantized is None:
        steps.append(_step("model", deployed.model_id, deployed.run_id, "a base model"))
        return steps
    made = f"{quantized.format} of {quantized.base_model}"
    steps.append(_step("model", deployed.model_id, quantized.run_id, made))
    trained = next(
        (e for e in events if isinstance(e, TrainingDone) and e.adapter_id == quantized.adapter_id),
        None,
    )
    if trained is None:
        steps.append(_step("adapter", quantized.adapter_id, quantized.run_id, "not in the stream"))
        return steps
    how = f"{trained.method} on {trained.base_model}"
    steps.append(_step("adapter", trained.adapter_id, trained.run_id, how))
    ready = next(
        (e for e in events if isinstance(e, DatasetReady) and e.dataset_id == trained.dataset_id),
        None,
    )
    if ready is None:
        steps.append(_step("dataset", trained.dataset_id, trained.run_id, "not in the stream"))
        return steps
    previous = f", follows {ready.previous_dataset_id}" if ready.previous_dataset_id else ""
    counts = f"{ready.counts.train} train / {ready.counts.validation} validation records"
    what = f"{ready.dataset_name} ({ready.origin}), {counts}{previous}"
    steps.append(_step("dataset", ready.dataset_id, ready.run_id, what))
    for sub in events:
        if isinstance(sub, DatasetSubmitted) and sub.run_id == ready.run_id:
            steps.extend(_step("source file", uri, sub.run_id) for uri in sub.files[:50])
    if ready.origin == "harvest":
        harvested = "production answers with positive feedback (gateway_interactions)"
        steps.append(_step("source", "harvested interactions", ready.run_id, harvested))
    return steps
