"""The evaluator's handlers: plain async functions, dependencies passed in, no broker import.

``on_model_deployed``: remember the deployment; a baseline becomes the stable deployment of
its served model name (until the gateway promotes a candidate) and has its benchmark run
cached; a candidate is benchmarked, compared with the stable deployment on the same
benchmark version, judged by the gate, and the verdict (or why there is none) is recorded
with its event in one transaction. The run row is the idempotency key: a redelivered
ModelDeployed finds it and does nothing.

``on_rollout_changed``: a ``promoted`` candidate becomes the stable deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from services.evaluator import registry
from services.evaluator.benchmark import Benchmark, BenchmarkError, from_validation_split
from services.evaluator.client import ChatClient
from services.evaluator.gate import Verdict, decide
from services.evaluator.models import EvaluatorDeployment, EvaluatorRun, EvaluatorStable
from services.evaluator.report import deployment_report, upload_report
from services.evaluator.runner import RunResult, RunSummary, run_benchmark
from services.evaluator.scoring import Scoring
from services.evaluator.settings import EvaluatorSettings
from shared.db import utcnow
from shared.events import (
    ArtifactRef,
    BaselineComparison,
    EvaluationCompleted,
    EvaluationFailed,
    Event,
    LatencyPercentiles,
    ModelDeployed,
    RolloutChanged,
)
from shared.storage import ArtifactStore

log = logging.getLogger(__name__)

PRODUCER = "evaluator"

Transaction = Callable[[], AbstractAsyncContextManager[AsyncSession]]
Emit = Callable[[AsyncSession, Event], None]
ClientFactory = Callable[[str, str], AbstractAsyncContextManager[ChatClient]]


@dataclass
class EvaluatorPorts:
    """What the handlers use, wired by ``app.py`` (and by tests with fakes)."""

    transaction: Transaction
    emit: Emit
    store: ArtifactStore
    clients: ClientFactory
    scoring: Scoring
    benchmark: Benchmark
    settings: EvaluatorSettings


# ---------------------------------------------------------------- deployments


async def on_model_deployed(event: ModelDeployed, *, ports: EvaluatorPorts) -> Event | None:
    """Returns the event recorded (or None when there was nothing to do)."""
    try:
        async with ports.transaction() as session:
            await registry.remember_deployment(session, event)
    except IntegrityError:  # a concurrent delivery inserted the same rows first: now update
        async with ports.transaction() as session:
            await registry.remember_deployment(session, event)
    bench = await _benchmark_for(event, ports)
    if event.role == "baseline":
        if ports.settings.warm_baseline:
            await _baseline_summary(event.served_model_name, bench, ports, exclude=None)
        return None

    async with ports.transaction() as session:
        previous = await registry.run_for(session, event.deployment_id, bench.version)
        if previous is not None:
            if previous.status != "failed" or previous.cause_event_id == str(event.event_id):
                log.info(
                    "deployment %s already evaluated on %s", event.deployment_id, bench.version
                )
                return None
            # A new announcement of a deployment that could not be reached: try again.
            log.info("re-evaluating %s (last run failed: %s)", event.deployment_id, previous.reason)
            await session.delete(previous)

    started_at = utcnow()
    result = await _run(event.endpoint, event.served_model_name, bench, ports)
    unreachable = result.unreachable()
    if unreachable:
        failed = event.follow(
            EvaluationFailed,
            producer=PRODUCER,
            reason=unreachable[:8000],
            retryable=True,
            failed_event_id=event.event_id,
            deployment_id=event.deployment_id,
        )
        report = await upload_report(
            ports.store,
            deployment_report(event, result, None, None, started_at, failure=unreachable),
        )
        recorded = await _record_run(
            ports,
            event.deployment_id,
            result.summary(),
            kind="candidate",
            verdict=None,
            report=report,
            reason=unreachable,
            event=failed,
            cause=event,
        )
        return failed if recorded else None

    baseline, note = await _baseline_summary(
        event.served_model_name, bench, ports, exclude=event.deployment_id
    )
    summary = result.summary()
    verdict = decide(
        summary, baseline[1] if baseline else None, ports.settings.gate(), baseline_note=note
    )
    report = await upload_report(
        ports.store, deployment_report(event, result, verdict, baseline, started_at, failure=None)
    )
    completed = event.follow(
        EvaluationCompleted,
        producer=PRODUCER,
        deployment_id=event.deployment_id,
        model_id=event.model_id,
        served_model_name=event.served_model_name,
        benchmark=f"{bench.name}@{bench.version[:12]}",
        passed=verdict.passed,
        overall_score=summary.overall_score,
        category_scores=summary.category_scores,
        latency=_percentiles(summary),
        baseline=(
            BaselineComparison(
                deployment_id=baseline[0],
                overall_score=baseline[1].overall_score,
                category_scores=baseline[1].category_scores,
                latency=_percentiles(baseline[1]),
            )
            if baseline
            else None
        ),
        reasons=[r[:1000] for r in verdict.reasons[:100]],
        report=report,
    )
    recorded = await _record_run(
        ports,
        event.deployment_id,
        summary,
        kind="candidate",
        verdict=verdict,
        report=report,
        reason=None,
        event=completed,
        cause=event,
    )
    return completed if recorded else None


async def on_rollout_changed(event: RolloutChanged, *, transaction: Transaction) -> bool:
    """A promotion moves "stable"; anything else leaves it. Returns whether it moved.
    An older promotion delivered late never overrides a newer one."""
    if event.action != "promoted":
        return False
    for attempt in (1, 2):
        try:
            async with transaction() as session:
                return await registry.promote(session, event)
        except IntegrityError:  # a concurrent delivery inserted the row first: now update
            if attempt == 2:
                raise
    return False  # pragma: no cover


# ---------------------------------------------------------------- internals


async def _benchmark_for(event: ModelDeployed, ports: EvaluatorPorts) -> Benchmark:
    bench = ports.benchmark
    s = ports.settings
    if s.use_validation_split and event.validation is not None:
        try:
            data = await ports.store.get_bytes(event.validation)
            bench = from_validation_split(
                data,
                name=f"validation-{event.dataset_id or 'split'}"[:200],
                threshold=s.similarity_threshold,
            )
        except BenchmarkError as exc:
            log.warning("validation split unusable (%s); using %s", exc, bench.name)
    return bench.sample(s.max_items, s.sample_seed)


async def _run(endpoint: str, model: str, bench: Benchmark, ports: EvaluatorPorts) -> RunResult:
    async with ports.clients(endpoint, model) as client:
        return await run_benchmark(
            bench, client, scoring=ports.scoring, options=ports.settings.run_options()
        )


async def _baseline_summary(
    served_model_name: str, bench: Benchmark, ports: EvaluatorPorts, *, exclude: str | None
) -> tuple[tuple[str, RunSummary] | None, str | None]:
    """The stable deployment's summary on this benchmark version (cached, or run now), or
    None and why not."""
    async with ports.transaction() as session:
        stable = await session.get(EvaluatorStable, served_model_name)
        if stable is None or stable.deployment_id == exclude:
            return None, f"no stable deployment for {served_model_name!r}"
        dep_id = stable.deployment_id
        cached = await registry.run_for(session, dep_id, bench.version)
        dep = await session.get(EvaluatorDeployment, dep_id)
    if cached is not None:
        if cached.status == "completed":
            return (dep_id, RunSummary.model_validate_json(cached.summary)), None
        return None, f"stable deployment {dep_id} could not be benchmarked: {cached.reason}"
    if dep is None:
        return None, f"stable deployment {dep_id} is unknown here (no ModelDeployed seen)"
    result = await _run(dep.endpoint, dep.served_model_name, bench, ports)
    unreachable = result.unreachable()
    if unreachable:
        # Not cached: the stable deployment may be back next time.
        return None, f"stable deployment {dep_id}: {unreachable}"
    summary = result.summary()
    await _record_run(
        ports, dep_id, summary, kind="baseline", verdict=None, report=None, reason=None, event=None
    )
    return (dep_id, summary), None


async def _record_run(
    ports: EvaluatorPorts,
    deployment_id: str,
    summary: RunSummary,
    *,
    kind: str,
    verdict: Verdict | None,
    report: ArtifactRef | None,
    reason: str | None,
    event: Event | None,
    cause: Event | None = None,
) -> bool:
    """Insert the run (and record its event) in one transaction; False if another delivery
    recorded the same run first (then nothing is emitted twice)."""
    try:
        async with ports.transaction() as session:
            session.add(
                EvaluatorRun(
                    deployment_id=deployment_id,
                    benchmark=summary.benchmark,
                    benchmark_version=summary.benchmark_version,
                    kind=kind,
                    status="failed" if reason else "completed",
                    passed=verdict.passed if verdict else None,
                    overall_score=summary.overall_score,
                    summary=summary.model_dump_json(),
                    reason=reason,
                    report_uri=report.uri if report else None,
                    report_sha256=report.sha256 if report else None,
                    report_size=report.size_bytes if report else None,
                    event_id=str(event.event_id) if event else None,
                    cause_event_id=str(cause.event_id) if cause else None,
                    created_at=utcnow(),
                )
            )
            await session.flush()
            if event is not None:
                ports.emit(session, event)
    except IntegrityError:
        log.info("run of %s on %s was recorded by another delivery", deployment_id, kind)
        return False
    return True


def _percentiles(summary: RunSummary) -> LatencyPercentiles:
    return LatencyPercentiles(
        p50_ms=summary.latency.p50_ms, p95_ms=summary.latency.p95_ms, p99_ms=summary.latency.p99_ms
    )
