"""What the evaluator knows about deployments: which it has seen, which is stable per served
model name, and which runs it has recorded (the idempotency key and the baseline cache)."""

from __future__ import annotations

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.evaluator.models import EvaluatorDeployment, EvaluatorRun, EvaluatorStable
from shared.events import ModelDeployed, RolloutChanged


async def remember_deployment(session: AsyncSession, event: ModelDeployed) -> None:
    """Record the deployment; a baseline becomes stable unless a promoted model is."""
    if await session.get(EvaluatorDeployment, event.deployment_id) is None:
        session.add(
            EvaluatorDeployment(
                deployment_id=event.deployment_id,
                model_id=event.model_id,
                served_model_name=event.served_model_name,
                endpoint=event.endpoint,
                role=event.role,
                engine=event.engine,
                deployed_at=event.occurred_at,
            )
        )
    if event.role != "baseline":
        return
    stable = await session.get(EvaluatorStable, event.served_model_name)
    # A baseline is production only until a candidate is promoted; a redeployed baseline
    # (inference restarted) replaces an older baseline, never a promoted model.
    if stable is None:
        session.add(
            EvaluatorStable(
                served_model_name=event.served_model_name,
                deployment_id=event.deployment_id,
                source="baseline",
                since=event.occurred_at,
            )
        )
    elif stable.source == "baseline" and stable.since <= event.occurred_at:
        stable.deployment_id = event.deployment_id
        stable.since = event.occurred_at
        session.add(stable)


async def promote(session: AsyncSession, event: RolloutChanged) -> bool:
    """A promotion moves "stable"; an older one delivered late never overrides a newer."""
    row = await session.get(EvaluatorStable, event.served_model_name)
    if row is not None and row.since > event.occurred_at:
        return False
    if row is None:
        session.add(
            EvaluatorStable(
                served_model_name=event.served_model_name,
                deployment_id=event.deployment_id,
                source="promoted",
                since=event.occurred_at,
            )
        )
    else:
        row.deployment_id = event.deployment_id
        row.source = "promoted"
        row.since = event.occurred_at
        session.add(row)
    return True


async def run_for(session: AsyncSession, deployment_id: str, version: str) -> EvaluatorRun | None:
    result = await session.exec(
        select(EvaluatorRun).where(
            col(EvaluatorRun.deployment_id) == deployment_id,
            col(EvaluatorRun.benchmark_version) == version,
        )
    )
    return result.first()
