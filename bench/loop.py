"""The whole loop on the tiny model, timed stage by stage, with the orchestration overhead.

    .venv/bin/python bench/loop.py [--train-records 600] [--home DIR] [--postgres]

Starts everything as ``tuneloop demo`` does (nats-server, SQLite or PostgreSQL, the artifact
store, the six services, vLLM CPU), uploads the generated corpus, and follows the run to
its promotion. Then, from the run's events (``occurred_at``) and the services' spans:

- per stage: wall time from the event that caused it to the event it produced;
- the work inside each stage: from the start of the consumer span of the delivery that
  produced the effect (training, merging and the perplexity gate, engine start, benchmark)
  to the effect's ``occurred_at``;
- the hop before each stage: from the cause's ``occurred_at`` to that consumer span's start,
  i.e. what the event plumbing costs: the producer's commit, the outbox relay, NATS, the
  next consumer's fetch;
- orchestration overhead = total - the work of every stage = the sum of the hops;
- the canary stage is driven by live traffic and the configured steps (minimum requests and
  seconds per step), so it is shown apart from the pipeline's total.

Targets (issue 9): full tiny-model run <= 3 minutes (upload to evaluated candidate), and
orchestration overhead <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.demo import demo_env, run_demo, upload_corpus
from shared.events import (
    AdapterQuantized,
    DatasetReady,
    EvaluationCompleted,
    ModelDeployed,
    RolloutChanged,
    TrainingDone,
)
from shared.runs import load_spans
from shared.supervisor import Embedded

# (stage, the event that starts it, the consumer span of its work, the event it ends with)
STAGES = (
    ("trainer", DatasetReady, "consume dataset.ready", TrainingDone),
    ("quantizer", TrainingDone, "consume adapter.trained", AdapterQuantized),
    ("inference", AdapterQuantized, "consume adapter.quantized", ModelDeployed),
    ("evaluator", ModelDeployed, "consume model.deployed", EvaluationCompleted),
)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def report(result: Any, spans: list[dict[str, Any]], upload_at: float, upload_s: float) -> str:
    run = [s for s in spans if s.get("attributes", {}).get("tuneloop.run_id") == result.run_id]
    first = {type(e): e for e in reversed(result.events)}
    candidate = next(
        e for e in result.events if isinstance(e, ModelDeployed) and e.role == "candidate"
    )
    first[ModelDeployed] = candidate
    rows: list[tuple[str, float, float]] = []
    ready = first[DatasetReady].occurred_at.timestamp()
    rows.append(("ingest (upload → DatasetReady)", ready - upload_at, upload_s))
    work_total = upload_s
    for stage, cause, span_name, effect in STAGES:
        wall = first[effect].occurred_at.timestamp() - first[cause].occurred_at.timestamp()
        consumed = [
            s
            for s in run
            if s["service"] == stage
            and s["name"] == span_name
            and s.get("attributes", {}).get("tuneloop.event_id") == str(first[cause].event_id)
        ] or [s for s in run if s["service"] == stage and s["name"] == span_name]
        # The delivery that produced the effect is the last one to start before it; the work
        # is from its start to the effect, the hop from the cause to its start (the producer's
        # commit, outbox relay, NATS, the consumer's fetch).
        effect_at = first[effect].occurred_at.timestamp()
        starts = [_ts(s["start"]) for s in consumed if _ts(s["start"]) <= effect_at]
        work = effect_at - max(starts) if starts else wall
        work_total += work
        rows.append((f"{stage} ({cause.__name__} → {effect.__name__})", wall, work))
    evaluated = first[EvaluationCompleted].occurred_at.timestamp()
    total = evaluated - upload_at
    promoted = next(
        e
        for e in reversed(result.events)
        if isinstance(e, RolloutChanged) and e.action == "promoted"
    )
    canary = promoted.occurred_at.timestamp() - evaluated
    overhead = total - work_total
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'stage':<{width}}{'wall s':>10}{'work s':>10}{'hop s':>10}"]
    for name, wall, work in rows:
        lines.append(f"{name:<{width}}{wall:>10.2f}{work:>10.2f}{wall - work:>10.2f}")
    lines.append(f"{'total (upload → evaluated)':<{width}}{total:>10.2f}{work_total:>10.2f}")
    lines.append(f"{'orchestration overhead':<{width}}{overhead:>10.2f}")
    lines.append(f"{'canary (evaluated → promoted)':<{width}}{canary:>10.2f}")
    lines.append("")
    lines.append(
        f"targets: total <= 180 s ({'met' if total <= 180 else 'MISSED'}), "
        f"overhead <= 2 s ({'met' if overhead <= 2 else 'MISSED'})"
    )
    lines.append(
        f"traffic: {result.requests_sent} requests, {result.request_errors} errors, "
        f"answered by {result.answered_by}"
    )
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-records", type=int, default=600)
    parser.add_argument("--home", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("--postgres", action="store_true", help="the embedded PostgreSQL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneloop-bench-loop-") as tmp:
        home = args.home or Path(tmp) / "home"
        embedded = Embedded(home=home, postgres=args.postgres, extra_env=demo_env("tiny"))
        state = await asyncio.to_thread(embedded.start)
        upload: dict[str, float] = {}

        async def start(corpus: Path) -> str:
            ingest_url = f"http://127.0.0.1:{state['services']['ingest']['http_port']}"
            upload["at"] = time.time()
            t0 = time.perf_counter()
            body = await upload_corpus(ingest_url, corpus, "bench")
            upload["s"] = time.perf_counter() - t0
            return str(body["run_id"])

        try:
            result = await run_demo(
                state,
                embedded,
                train_records=args.train_records,
                start=start,
                say=lambda line: print(line, flush=True),
            )
        finally:
            await asyncio.to_thread(embedded.stop)  # flushes every service's spans
        if result.outcome != "promoted":
            print(f"the run did not reach promotion: {result.outcome}")
            return 1
        spans = load_spans(Path(state["span_file"]))
        print()
        print(report(result, spans, upload["at"], upload["s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
