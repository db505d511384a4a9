"""Scenarios 4 and 5 in the whole loop: what the chaos tests assert on and what
``bench/chaos.py --loop`` prints. Tiny model, real NATS, SQLite, vLLM CPU, the six services
under the supervisor (``shared.supervisor.Embedded``) driven by ``shared.demo.run_demo``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import text

from shared import failpoints
from shared.db import Database
from shared.demo import DemoResult, demo_env, run_demo
from shared.events import DatasetReady, DatasetSubmitted, Event, ModelDeployed, RolloutChanged
from shared.subjects import Namespace
from shared.supervisor import Embedded
from tests.chaos.ledger import Result
from tests.e2e.harness import (
    FAST_REDELIVERY,
    LOOP_TEST_ENV,
    all_events,
    effects,
    publish_with_plain_nats,
    run_trace_ids,
    wait_for_caused,
)

# One crash per service, each where it hurts: mid-work, or between the work's commit and the
# acknowledgement (redelivered: must not be done twice), or between a publish and the outbox
# mark (published again: the broker's dedupe must drop it).
CRASHES = (
    "ingest.DatasetSubmitted.handled",
    "ingest.outbox.published",
    "trainer.DatasetReady.working@2",
    "quantizer.TrainingDone.working",
    "inference.AdapterQuantized.working",
    # The tiny model's benchmark takes about a second: crash after it is recorded, unacked.
    "evaluator.ModelDeployed.handled",
    "gateway.EvaluationCompleted.handled",
    # The gateway's first publish is the baseline's promotion at start-up; the second is this
    # run's canary_started.
    "gateway.outbox.published@2",
)
# The effects a promoted run has, each exactly once.
STAGE_EFFECTS = (
    "DatasetReady",
    "TrainingDone",
    "AdapterQuantized",
    "ModelDeployed(candidate)",
    "EvaluationCompleted",
    "RolloutChanged(canary_started)",
    "RolloutChanged(promoted)",
)
TABLES = (
    "ingest_dataset_versions",
    "trainer_jobs",
    "quantizer_models",
    "inference_deployments",
    "gateway_deployments",
)


@dataclass
class LoopOutcome:
    demo: DemoResult
    home: Path
    effects: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    killed_at: float | None = None
    recovered_s: float | None = None
    # Trace ids that carry the run's id (one trace per run, crashes or not).
    run_traces: set[str] = field(default_factory=set)
    # Events of the run whose causation id is not another event of the run.
    orphans: list[str] = field(default_factory=list)
    result: Result = field(default_factory=lambda: Result("?"))


async def count_rows(database_url: str, run_id: str) -> dict[str, int]:
    db = Database(database_url)
    try:
        async with db.session() as session:
            return {
                t: int(
                    (
                        await session.execute(
                            text(f"SELECT count(*) FROM {t} WHERE run_id = :r"),  # noqa: S608
                            {"r": run_id},
                        )
                    ).scalar_one()
                )
                for t in TABLES
            }
    finally:
        await db.dispose()


def _ledger_row(scenario: str, outcome: LoopOutcome, faults: list[str], dlq: int) -> Result:
    """The run as a row of the chaos table: each expected effect is one 'event'."""
    result = Result(scenario, faults=faults)
    result.published = len(STAGE_EFFECTS)
    result.acknowledged = set(range(len(STAGE_EFFECTS)))
    result.handled = {i for i, name in enumerate(STAGE_EFFECTS) if outcome.effects.get(name)}
    result.duplicate_effects = sum(max(0, outcome.effects.get(n, 0) - 1) for n in STAGE_EFFECTS)
    result.duplicated = result.duplicate_effects
    result.dead_letters = dlq
    result.recover_s = outcome.recovered_s or 0.0
    result.notes.append(
        f"outcome {outcome.demo.outcome}; {outcome.demo.requests_sent} client requests, "
        f"{outcome.demo.request_errors} failed; rows per run {outcome.rows}"
    )
    return result


async def _dead_letters(nats_url: str) -> int:
    import nats

    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(Namespace().dead_letter_stream)
        return int(info.state.messages)
    except Exception:
        return 0
    finally:
        await nc.close()


async def service_crashes(home: Path, models_dir: Path) -> LoopOutcome:
    """Scenario 4: a run started by a DatasetSubmitted command while every service is
    SIGKILLed once inside its work (the failpoints in CRASHES)."""
    env = {
        **demo_env("tiny"),
        **LOOP_TEST_ENV,
        **FAST_REDELIVERY,
        "TUNELOOP_MODELS_DIR": str(models_dir),
        "TUNELOOP_FAILPOINTS": ",".join(CRASHES),
        "TRAINER_CHECKPOINT_EVERY_STEPS": "25",
    }
    embedded = Embedded(home=home, extra_env=env)
    state = await asyncio.to_thread(embedded.start)

    async def submit(corpus: Path) -> str:
        # The corpus is already in the artifact store; a DatasetSubmitted command ingests it.
        store_root = Path(state["artifact_store_url"].removeprefix("file://"))
        dest = store_root / "imports" / corpus.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus, dest)
        command = DatasetSubmitted(
            run_id="run-chaos-submit",
            producer="chaos",
            dataset_name="chaos",
            files=[dest.resolve().as_uri()],
            format="openai",
        )
        await publish_with_plain_nats(
            state["nats_url"], Namespace().subject(command.subject), command.model_dump(mode="json")
        )
        ready = await wait_for_caused(state["nats_url"], str(command.event_id), DatasetReady)
        return ready.run_id

    try:
        demo = await run_demo(state, embedded, train_records=600, timeout_s=1500, start=submit)
        events = [e for e in await all_events(state["nats_url"]) if e.run_id == demo.run_id]
        outcome = LoopOutcome(demo=demo, home=home)
        outcome.effects = dict(effects(events))
        ids = {e.event_id for e in events}
        outcome.orphans = [
            type(e).__name__
            for e in events
            if not isinstance(e, DatasetReady) and e.causation_id not in ids
        ]
        outcome.rows = await count_rows(state["database_url"], demo.run_id)
        outcome.fired = failpoints.fired(home)
        marks = (
            [
                float(p.read_text().split("at=")[1].split()[0])
                for p in (home / "failpoints").iterdir()
            ]
            if (home / "failpoints").is_dir()
            else []
        )
        promoted = [e for e in events if isinstance(e, RolloutChanged) and e.action == "promoted"]
        if marks and promoted:
            outcome.recovered_s = promoted[-1].occurred_at.timestamp() - max(marks)
        faults = [f"sigkill {name.split('.')[0]}" for name in outcome.fired]
        outcome.result = _ledger_row(
            "4 service crashes (loop)", outcome, faults, await _dead_letters(state["nats_url"])
        )
    finally:
        await asyncio.to_thread(embedded.stop)  # flushes the surviving processes' spans
    outcome.run_traces = run_trace_ids(Path(state["span_file"]), demo.run_id)
    return outcome


def engine_pid(endpoint: str) -> int:
    """The process listening on the deployment's endpoint: its vLLM API server."""
    port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        if listening and conn.pid:
            return conn.pid
    raise LookupError(f"nothing listens on port {port}")


async def engine_death(home: Path, models_dir: Path) -> LoopOutcome:
    """Scenario 5: the canary's vLLM process group SIGKILLed 5 s into the canary, under the
    demo's traffic. The gateway must roll it back with no client request failing."""
    env = {
        **demo_env("tiny"),
        **LOOP_TEST_ENV,
        "TUNELOOP_MODELS_DIR": str(models_dir),
        # A long first step, so the canary is still at 25% when its engine dies.
        "GATEWAY_STEP_MIN_SECONDS": "600",
    }
    embedded = Embedded(home=home, extra_env=env)
    state = await asyncio.to_thread(embedded.start)
    seen: list[Event] = []
    killed: dict[str, Any] = {}

    async def observe(event: Event) -> None:
        seen.append(event)
        if isinstance(event, RolloutChanged) and event.action == "canary_started":
            candidate = next(
                e
                for e in seen
                if isinstance(e, ModelDeployed) and e.deployment_id == event.deployment_id
            )
            await asyncio.sleep(5)  # let some canary traffic flow first
            pid = engine_pid(candidate.endpoint)
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            killed["at"] = time.time()

    try:
        demo = await run_demo(state, embedded, train_records=600, timeout_s=1500, observe=observe)
        outcome = LoopOutcome(demo=demo, home=home, killed_at=killed.get("at"))
        events = [e for e in await all_events(state["nats_url"]) if e.run_id == demo.run_id]
        outcome.effects = dict(effects(events))
        rollback = demo.last(RolloutChanged)
        if outcome.killed_at and rollback is not None and rollback.action == "rolled_back":
            outcome.recovered_s = rollback.occurred_at.timestamp() - outcome.killed_at
        result = Result("5 canary engine killed", faults=["sigkill vllm"] if killed else [])
        # Here the 'events' are the client requests: each one must be answered.
        result.published = demo.requests_sent
        result.acknowledged = set(range(demo.requests_sent))
        result.handled = set(range(demo.requests_sent - demo.request_errors))
        result.dead_letters = await _dead_letters(state["nats_url"])
        result.recover_s = outcome.recovered_s or 0.0
        result.notes.append(
            f"outcome {demo.outcome}: {rollback.reason if rollback else '-'}; "
            f"answered by {demo.answered_by}"
        )
        outcome.result = result
        return outcome
    finally:
        await asyncio.to_thread(embedded.stop)
