"""The evaluator service: wires the runtime, the scorers and the handlers to the bus.

python -m services.evaluator.app      (HTTP port from EVALUATOR_HTTP_PORT)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import HTTPException, Path
from prometheus_client import Counter, Histogram
from sqlmodel import col, select

from services.evaluator.benchmark import Benchmark, load_benchmark
from services.evaluator.client import ChatClient, OpenAIChatClient
from services.evaluator.handlers import (
    ClientFactory,
    EvaluatorPorts,
    on_model_deployed,
    on_rollout_changed,
)
from services.evaluator.models import EvaluatorRun
from services.evaluator.scoring import Scoring
from services.evaluator.scoring.judge import ChatJudge
from services.evaluator.scoring.similarity import MiniLMEmbedder
from services.evaluator.settings import EvaluatorSettings
from shared.bus import Delivery, PermanentError
from shared.events import (
    EvaluationCompleted,
    EvaluationFailed,
    Event,
    ModelDeployed,
    RolloutChanged,
)
from shared.service import ServiceRuntime, run_service
from shared.telemetry import tracer

log = logging.getLogger(__name__)
SERVICE = "evaluator"
DEPLOYMENT_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"

EVALUATIONS = Counter(
    "tuneloop_evaluator_evaluations_total",
    "ModelDeployed events handled, by outcome",
    ["outcome"],
)
EVALUATION_SECONDS = Histogram(
    "tuneloop_evaluator_evaluation_seconds",
    "Wall time of one candidate evaluation (its run and, if not cached, the baseline's)",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
)


def _outcome(result: Event | None, event: ModelDeployed) -> str:
    if isinstance(result, EvaluationCompleted):
        return "passed" if result.passed else "failed_gate"
    if isinstance(result, EvaluationFailed):
        return "unreachable"
    return "baseline" if event.role == "baseline" else "duplicate"


def client_factory(settings: EvaluatorSettings, *, api_key: str | None = None) -> ClientFactory:
    @asynccontextmanager
    async def clients(endpoint: str, model: str) -> AsyncIterator[ChatClient]:
        client = OpenAIChatClient(
            endpoint,
            model,
            timeout_s=settings.request_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            temperature=settings.temperature,
            seed=settings.seed,
            max_response_bytes=settings.max_response_bytes,
            api_key=api_key,
            pool_size=max(settings.concurrency, 1),
        )
        try:
            yield client
        finally:
            await client.close()

    return clients


def build_scoring(settings: EvaluatorSettings, benchmark: Benchmark) -> Scoring:
    """The embedding model only when similarity may be needed; a judge only if configured."""
    types = {benchmark.scorer_for(i).type for i in benchmark.items}
    embedder = MiniLMEmbedder() if "similarity" in types or settings.use_validation_split else None
    judge = None
    if settings.judge_endpoint and settings.judge_model:
        key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else None
        judge = ChatJudge(
            OpenAIChatClient(
                settings.judge_endpoint,
                settings.judge_model,
                timeout_s=settings.request_timeout_s,
                seed=settings.seed,
                api_key=key,
            )
        )
    return Scoring(embedder=embedder, judge=judge)


def wire(runtime: ServiceRuntime, settings: EvaluatorSettings) -> EvaluatorPorts:
    """Register the evaluator's subscribers on ``runtime.bus`` (before ``runtime.start()``)."""
    benchmark = load_benchmark(settings.benchmark)
    key = settings.endpoint_api_key.get_secret_value() if settings.endpoint_api_key else None
    ports = EvaluatorPorts(
        transaction=runtime.transaction,
        emit=runtime.emit,
        store=runtime.store,
        clients=client_factory(settings, api_key=key),
        scoring=build_scoring(settings, benchmark),
        benchmark=benchmark,
        settings=settings,
    )

    async def deployed(event: ModelDeployed, delivery: Delivery) -> None:
        started = time.perf_counter()
        with tracer("tuneloop.evaluator").start_as_current_span(
            "evaluate deployment",
            attributes={"tuneloop.deployment_id": event.deployment_id, "tuneloop.role": event.role},
        ) as span:
            try:
                result = await on_model_deployed(event, ports=ports)
            except (ValueError, TypeError) as exc:  # bad input: retrying cannot help
                EVALUATIONS.labels("error").inc()
                raise PermanentError(f"cannot evaluate {event.deployment_id}: {exc}") from exc
            outcome = _outcome(result, event)
            span.set_attribute("tuneloop.outcome", outcome)
        EVALUATIONS.labels(outcome).inc()
        if outcome in ("passed", "failed_gate", "unreachable"):
            EVALUATION_SECONDS.observe(time.perf_counter() - started)

    async def rollout(event: RolloutChanged, delivery: Delivery) -> None:
        await on_rollout_changed(event, transaction=runtime.transaction)

    add_routes(runtime)
    runtime.bus.subscribe(ModelDeployed, deployed, ack_wait_s=settings.ack_wait_s, heartbeat=True)
    runtime.bus.subscribe(RolloutChanged, rollout)
    log.info("evaluator: benchmark %s (%d items)", benchmark.name, len(benchmark.items))
    return ports


def add_routes(runtime: ServiceRuntime) -> None:
    """Read-only: what the evaluator has measured for a deployment."""

    @runtime.http.get("/evaluations/{deployment_id}")
    async def evaluations(
        deployment_id: Annotated[str, Path(pattern=DEPLOYMENT_ID, max_length=200)],
    ) -> dict[str, Any]:
        async with runtime.db.session() as session:
            rows = (
                await session.exec(
                    select(EvaluatorRun)
                    .where(col(EvaluatorRun.deployment_id) == deployment_id)
                    .order_by(col(EvaluatorRun.id))
                )
            ).all()
        if not rows:
            raise HTTPException(404, f"no evaluation of deployment {deployment_id!r}")
        return {
            "deployment_id": deployment_id,
            "runs": [
                {
                    "benchmark": r.benchmark,
                    "benchmark_version": r.benchmark_version,
                    "kind": r.kind,
                    "status": r.status,
                    "passed": r.passed,
                    "overall_score": r.overall_score,
                    "reason": r.reason,
                    "report_uri": r.report_uri,
                    "created_at": r.created_at.isoformat(),
                    "summary": json.loads(r.summary),
                }
                for r in rows
            ],
        }


async def serve() -> None:
    settings = EvaluatorSettings()
    runtime = ServiceRuntime(SERVICE)
    wire(runtime, settings)
    await run_service(runtime, host=settings.http_host, port=settings.http_port)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
