"""What happened to each run, reconstructed from the event stream and the span file.

Used by ``tuneloop status`` (one line per run: the stage each service reached, with timings
and failures) and ``tuneloop trace RUN_ID`` (the run's spans as a tree with durations).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.events import (
    EVENT_BY_SUBJECT,
    AdapterQuantized,
    DeploymentRetired,
    EvaluationCompleted,
    Event,
    RolloutChanged,
    StageFailed,
)
from shared.subjects import Namespace

STAGE_ORDER = ("ingest", "trainer", "quantizer", "inference", "evaluator", "gateway")


@dataclass
class StageStatus:
    stage: str
    event: str
    at: datetime
    ok: bool
    detail: str = ""


@dataclass
class RunSummary:
    run_id: str
    started_at: datetime
    stages: dict[str, StageStatus] = field(default_factory=dict)

    @property
    def last_at(self) -> datetime:
        return max([s.at for s in self.stages.values()] + [self.started_at])

    @property
    def failed(self) -> StageStatus | None:
        return next((s for s in self.stages.values() if not s.ok), None)


def _detail(event: Event) -> str:
    """The one fact a person wants to see next to each stage."""
    if isinstance(event, StageFailed):
        return event.reason[:120]
    if isinstance(event, EvaluationCompleted):
        verdict = "passed" if event.passed else "refused"
        return f"{verdict} score={event.overall_score:.3f} p95={event.latency.p95_ms:.0f}ms"
    if isinstance(event, RolloutChanged):
        return f"{event.action} {event.deployment_id} weight={event.weight:.2f}"
    if isinstance(event, AdapterQuantized):
        return f"{event.format} {event.model_id}"
    for key in ("deployment_id", "adapter_id", "dataset_id"):
        value = getattr(event, key, None)
        if value:
            return f"{key}={value}"
    return ""


def summarise_runs(events: Iterable[Event]) -> list[RunSummary]:
    """Fold events into one summary per run, newest run first."""
    runs: dict[str, RunSummary] = {}
    for event in sorted(events, key=lambda e: e.occurred_at):
        run = runs.setdefault(event.run_id, RunSummary(event.run_id, event.occurred_at))
        ok = not isinstance(event, StageFailed)
        current = run.stages.get(event.stage)
        if isinstance(event, DeploymentRetired):
            # Later housekeeping, not progress: a note on the stage that deployed it.
            if current is not None:
                current.detail += f" (retired {event.occurred_at:%Y-%m-%d %H:%M})"
            continue
        # A failure is sticky until a later success of the same stage replaces it.
        run.stages[event.stage] = StageStatus(
            stage=event.stage,
            event=type(event).__name__,
            at=event.occurred_at,
            ok=ok,
            detail=_detail(event),
        )
        if current and not current.ok and ok:
            run.stages[event.stage].detail += " (after a failure)"
    return sorted(runs.values(), key=lambda r: r.started_at, reverse=True)


def parse_stream_message(subject: str, data: bytes, prefix: str) -> Event | None:
    suffix = subject.removeprefix(prefix + ".")
    event_type = EVENT_BY_SUBJECT.get(suffix)
    if event_type is None:
        return None
    try:
        return event_type.model_validate_json(data)
    except ValueError:
        return None


def format_status(runs: list[RunSummary]) -> list[str]:
    lines = []
    for run in runs:
        total = (run.last_at - run.started_at).total_seconds()
        failed = run.failed
        state = f"FAILED at {failed.stage}" if failed else "ok"
        lines.append(f"{run.run_id}  started {run.started_at:%Y-%m-%d %H:%M:%S}  "
                     f"{total:7.1f}s  {state}")  # fmt: skip
        previous = run.started_at
        for stage in STAGE_ORDER:
            status = run.stages.get(stage)
            if status is None:
                lines.append(f"    {stage:<10} -")
                continue
            mark = "✓" if status.ok else "✗"
            took = (status.at - previous).total_seconds()
            previous = max(previous, status.at)
            lines.append(
                f"    {stage:<10} {mark} {status.event:<20} +{took:6.1f}s  {status.detail}"
            )
    return lines


def load_spans(path: Path) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    if not path.exists():
        return spans
    for line in path.read_text().splitlines():
        try:
            spans.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return spans


def trace_tree(spans: list[dict[str, Any]], run_id: str) -> list[str]:
    """Render every trace that touches ``run_id`` as an indented tree."""
    trace_ids = {s["trace_id"] for s in spans
                 if s.get("attributes", {}).get("tuneloop.run_id") == run_id}  # fmt: skip
    mine = [s for s in spans if s["trace_id"] in trace_ids]
    by_id = {s["span_id"]: s for s in mine}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in mine:
        parent = span.get("parent_span_id")
        children[parent if parent in by_id else None].append(span)
    for kids in children.values():
        kids.sort(key=lambda s: s["start"])
    lines: list[str] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        status = "" if span.get("status") != "ERROR" else "  [ERROR]"
        lines.append(f"{'  ' * depth}{span['name']}  [{span.get('service')}]  "
                     f"{span['duration_ms']:.1f} ms{status}")  # fmt: skip
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return lines


async def _quiet(exc: Exception) -> None:
    """Connection errors surface as the exception the caller gets, not as log noise."""


async def read_stream(nats_url: str, prefix: str) -> list[tuple[str, bytes]]:
    """Every message of the pipeline stream, oldest first, as (subject, payload)."""
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    ns = Namespace(prefix)
    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=1, error_cb=_quiet)
    out: list[tuple[str, bytes]] = []
    try:
        js = nc.jetstream()
        info = await js.stream_info(ns.stream)
        if info.state.messages == 0:
            return out
        sub = await js.pull_subscribe(
            ns.all_subjects,
            stream=ns.stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
        )
        while len(out) < info.state.messages:
            try:
                batch = await sub.fetch(256, timeout=2)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            for msg in batch:
                out.append((msg.subject, msg.data))
                await msg.ack()
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def read_events(nats_url: str, prefix: str) -> list[Event]:
    """Every pipeline event the stream holds, oldest first (unknown messages skipped)."""
    messages = await read_stream(nats_url, prefix)
    return [e for e in (parse_stream_message(s, d, prefix) for s, d in messages) if e]


@dataclass(frozen=True)
class DeadLetter:
    consumer: str
    run_id: str
    reason: str
    seq: int = 0
    subject: str = ""
    deliveries: str = "?"


async def read_dead_letters(nats_url: str, prefix: str, limit: int = 1000) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, oldest first: where, whose, which run and why."""
    import nats
    from nats.js.errors import NotFoundError

    from shared.bus import DLQ_CONSUMER_HEADER, DLQ_DELIVERIES_HEADER, DLQ_REASON_HEADER

    ns = Namespace(prefix)
    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=1, error_cb=_quiet)
    out: list[DeadLetter] = []
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(ns.dead_letter_stream)
        except NotFoundError:
            return out
        if info.state.messages == 0:
            return out
        first = max(info.state.first_seq, info.state.last_seq - limit + 1)
        for seq in range(first, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(ns.dead_letter_stream, seq)
            except NotFoundError:
                continue
            headers = msg.headers or {}
            try:
                run_id = str(json.loads(msg.data or b"{}").get("run_id") or "?")
            except (ValueError, AttributeError):
                run_id = "?"
            out.append(
                DeadLetter(
                    consumer=headers.get(DLQ_CONSUMER_HEADER, "?"),
                    run_id=run_id,
                    reason=headers.get(DLQ_REASON_HEADER, ""),
                    seq=seq,
                    subject=msg.subject or "",
                    deliveries=headers.get(DLQ_DELIVERIES_HEADER, "?"),
                )
            )
    finally:
        await nc.close()
    return out


def format_dead_letters(letters: list[DeadLetter]) -> list[str]:
    """The dead-letter section of ``tuneloop status``: how many, whose, for which runs."""
    if not letters:
        return ["", "dead letters: none"]
    by_consumer = Counter(letter.consumer for letter in letters)
    lines = [
        "",
        f"dead letters: {len(letters)} (inspect with `tuneloop dead-letters`)",
    ]
    for consumer, count in by_consumer.most_common():
        newest = next(x for x in reversed(letters) if x.consumer == consumer)
        lines.append(
            f"  {consumer:<40} {count:>5}  newest: run {newest.run_id}: {newest.reason[:120]}"
        )
    return lines
