"""Route state transitions in the DB. Each returns the ``RolloutChanged`` events it causes,
to be recorded in the same transaction (outbox).

Transitions made by the live controller are conditional on the state they were decided
from (state + step): when two replicas decide the same thing, one update wins and only the
winner emits the event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from sqlalchemy import update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.gateway.models import GatewayDeployment
from shared.db import utcnow
from shared.events import DeploymentRetired, EvaluationCompleted, ModelDeployed, RolloutChanged
from shared.telemetry import current_traceparent

PRODUCER = "gateway"
RolloutAction = Literal["canary_started", "advanced", "promoted", "rolled_back", "refused"]


class UnknownDeployment(LookupError):
    """An event or admin call names a deployment the gateway has not registered."""


class Conflict(ValueError):
    """The requested transition does not apply to the deployment's current state."""


def _event(
    row: GatewayDeployment,
    action: RolloutAction,
    *,
    weight: float,
    reason: str,
    metrics: dict[str, float] | None = None,
) -> RolloutChanged:
    return RolloutChanged(
        run_id=row.run_id,
        producer=PRODUCER,
        causation_id=UUID(row.cause_event_id) if row.cause_event_id else None,
        served_model_name=row.served_model_name,
        deployment_id=row.deployment_id,
        action=action,
        weight=max(0.0, min(1.0, weight)),
        reason=reason[:4000],
        metrics=metrics or {},
    )


async def all_deployments(session: AsyncSession) -> list[GatewayDeployment]:
    result = await session.exec(select(GatewayDeployment))
    return list(result.all())


async def _model_rows(session: AsyncSession, served_model_name: str) -> list[GatewayDeployment]:
    result = await session.exec(
        select(GatewayDeployment).where(
            col(GatewayDeployment.served_model_name) == served_model_name
        )
    )
    return list(result.all())


async def get(session: AsyncSession, deployment_id: str) -> GatewayDeployment:
    row = await session.get(GatewayDeployment, deployment_id)
    if row is None:
        raise UnknownDeployment(f"unknown deployment {deployment_id!r}")
    return row


def _set(row: GatewayDeployment, now: datetime, **values: object) -> None:
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_at = now


def _refuse_retired(row: GatewayDeployment) -> None:
    """No traffic may be sent to a deployment whose engine inference has retired."""
    if row.retired_at is not None:
        raise Conflict(
            f"{row.deployment_id} was retired by inference (its engine is gone): it cannot "
            f"take traffic ({row.reason})"
        )


def _replaced_stable(row: GatewayDeployment, now: datetime, reason: str) -> None:
    """A stable that another deployment replaces is kept as ``previous`` for instant rollback,
    unless its engine is already gone."""
    state = "retired" if row.retired_at is not None else "previous"
    _set(row, now, state=state, weight=0.0, pinned=False, reason=reason)


async def register_deployment(
    session: AsyncSession,
    event: ModelDeployed,
    *,
    upstream_model: str | None,
    max_context_tokens: int | None,
) -> list[RolloutChanged]:
    """Record a deployment. A baseline becomes stable when the model has none, or replaces a
    stable that is itself a baseline (a restarted base model); a candidate waits for its
    evaluation. Idempotent: a known deployment id only has its endpoint facts refreshed."""
    now = utcnow()
    existing = await session.get(GatewayDeployment, event.deployment_id)
    if existing is not None:
        _set(existing, now, endpoint=event.endpoint)
        if upstream_model:
            existing.upstream_model = upstream_model
        if max_context_tokens:
            existing.max_context_tokens = max_context_tokens
        return []
    row = GatewayDeployment(
        deployment_id=event.deployment_id,
        served_model_name=event.served_model_name,
        model_id=event.model_id,
        endpoint=event.endpoint,
        engine=event.engine,
        role=event.role,
        run_id=event.run_id,
        cause_event_id=str(event.event_id),
        trace_parent=current_traceparent(),
        upstream_model=upstream_model,
        max_context_tokens=max_context_tokens,
        state="pending",
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    events: list[RolloutChanged] = []
    if event.role == "baseline":
        rows = await _model_rows(session, event.served_model_name)
        stable = next((r for r in rows if r.state == "stable"), None)
        if stable is None or stable.role == "baseline":
            if stable is not None:
                _replaced_stable(stable, now, f"replaced by baseline {row.deployment_id}")
            _set(row, now, state="stable", weight=1.0, reason="baseline deployment")
            events.append(_event(row, "promoted", weight=1.0, reason="baseline deployment"))
        else:
            _set(row, now, state="previous", reason="baseline kept as standby")
    await session.flush()
    return events


async def apply_evaluation(
    session: AsyncSession, event: EvaluationCompleted, *, first_weight: float
) -> list[RolloutChanged]:
    """Passed: the deployment becomes the canary at the first step (replacing an older canary
    of the same model). Failed: refused, never routed to."""
    row = await get(session, event.deployment_id)
    now = utcnow()
    row.cause_event_id = str(event.event_id)
    row.trace_parent = current_traceparent()
    metrics = {"overall_score": event.overall_score, "p95_ms": event.latency.p95_ms}
    if row.state not in ("pending",):
        return []  # evaluated again after it already moved on: nothing to change
    if not event.passed:
        reason = "evaluation failed: " + ("; ".join(event.reasons) or event.benchmark)
        _set(row, now, state="refused", weight=0.0, reason=reason)
        return [_event(row, "refused", weight=0.0, reason=reason, metrics=metrics)]
    events: list[RolloutChanged] = []
    rows = await _model_rows(session, row.served_model_name)
    stable = next((r for r in rows if r.state == "stable"), None)
    if stable is None:  # nothing to compare with: it serves everything
        _set(row, now, state="stable", weight=1.0, reason="evaluation passed; no stable")
        return [_event(row, "promoted", weight=1.0, reason=row.reason, metrics=metrics)]
    for old in rows:
        if old.state == "canary":
            _set(old, now, state="rolled_back", weight=0.0, pinned=False, reason="superseded")
            events.append(
                _event(old, "rolled_back", weight=0.0, reason=f"superseded by {row.deployment_id}")
            )
    reason = f"evaluation passed ({event.benchmark}: {event.overall_score:.3f})"
    _set(row, now, state="canary", weight=first_weight, step=0, step_started_at=now, reason=reason)
    events.append(
        _event(row, "canary_started", weight=first_weight, reason=reason, metrics=metrics)
    )
    await session.flush()
    return events


async def _conditional(
    session: AsyncSession, deployment_id: str, expected_step: int, **values: object
) -> bool:
    result = await session.exec(
        update(GatewayDeployment)
        .where(
            col(GatewayDeployment.deployment_id) == deployment_id,
            col(GatewayDeployment.state) == "canary",
            col(GatewayDeployment.step) == expected_step,
        )
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def advance(
    session: AsyncSession,
    deployment_id: str,
    *,
    expected_step: int,
    new_step: int,
    weight: float,
    reason: str,
    metrics: dict[str, float],
) -> list[RolloutChanged]:
    if not await _conditional(
        session,
        deployment_id,
        expected_step,
        step=new_step,
        weight=weight,
        step_started_at=utcnow(),
        reason=reason,
    ):
        return []
    row = await get(session, deployment_id)
    await session.refresh(row)
    return [_event(row, "advanced", weight=weight, reason=reason, metrics=metrics)]


async def rollback(
    session: AsyncSession,
    deployment_id: str,
    *,
    expected_step: int | None,
    reason: str,
    metrics: dict[str, float],
) -> list[RolloutChanged]:
    """Canary → 0% at once. ``expected_step`` None: an admin's unconditional rollback."""
    if expected_step is None:
        row = await get(session, deployment_id)
        if row.state != "canary":
            raise Conflict(f"{deployment_id} is {row.state}, not a canary")
        _set(row, utcnow(), state="rolled_back", weight=0.0, pinned=False, reason=reason)
    else:
        if not await _conditional(
            session,
            deployment_id,
            expected_step,
            state="rolled_back",
            weight=0.0,
            pinned=False,
            reason=reason,
        ):
            return []
        row = await get(session, deployment_id)
        await session.refresh(row)
    return [_event(row, "rolled_back", weight=0.0, reason=reason, metrics=metrics)]


async def promote(
    session: AsyncSession,
    deployment_id: str,
    *,
    expected_step: int | None,
    reason: str,
    metrics: dict[str, float],
) -> list[RolloutChanged]:
    """The deployment becomes stable (100%); the old stable is kept as ``previous``."""
    row = await get(session, deployment_id)
    if expected_step is not None:
        if not await _conditional(
            session,
            deployment_id,
            expected_step,
            state="stable",
            weight=1.0,
            pinned=False,
            reason=reason,
        ):
            return []
        await session.refresh(row)
    else:
        if row.state in ("stable",):
            raise Conflict(f"{deployment_id} is already stable")
        _refuse_retired(row)
        _set(row, utcnow(), state="stable", weight=1.0, pinned=False, reason=reason)
    now = utcnow()
    for other in await _model_rows(session, row.served_model_name):
        if other.deployment_id == deployment_id:
            continue
        if other.state == "stable":
            _replaced_stable(other, now, f"replaced by {deployment_id}")
        elif other.state == "canary":
            _set(
                other,
                now,
                state="rolled_back",
                weight=0.0,
                pinned=False,
                reason=f"superseded by {deployment_id}",
            )
        elif other.pinned:
            _set(other, now, pinned=False)
    await session.flush()
    return [_event(row, "promoted", weight=1.0, reason=reason, metrics=metrics)]


async def set_weight(
    session: AsyncSession, deployment_id: str, *, weight: float, reason: str
) -> list[RolloutChanged]:
    """An admin sets a canary's share by hand; automatic advancing stops (rollback stays)."""
    row = await get(session, deployment_id)
    _refuse_retired(row)
    if row.state == "stable" or weight >= 1.0:
        return await promote(session, deployment_id, expected_step=None, reason=reason, metrics={})
    if weight <= 0.0:  # 0% is a rollback (inference may then retire the deployment)
        return await rollback(session, deployment_id, expected_step=None, reason=reason, metrics={})
    if row.state not in ("canary", "pending", "rolled_back", "previous"):
        raise Conflict(f"{deployment_id} is {row.state}: it cannot take traffic")
    now = utcnow()
    if row.state != "canary":
        for other in await _model_rows(session, row.served_model_name):
            if other.state == "canary" and other.deployment_id != deployment_id:
                _set(
                    other,
                    now,
                    state="rolled_back",
                    weight=0.0,
                    pinned=False,
                    reason=f"superseded by {deployment_id}",
                )
    _set(row, now, state="canary", weight=weight, auto=False, step_started_at=now, reason=reason)
    return [_event(row, "advanced", weight=weight, reason=reason)]


async def pin(
    session: AsyncSession, served_model_name: str, deployment_id: str | None, *, reason: str
) -> list[RolloutChanged]:
    """All of a model's traffic to one deployment (None: unpin). Freezes automatic advancing
    while pinned; the pinned deployment must be stable, canary or previous."""
    rows = await _model_rows(session, served_model_name)
    if not rows:
        raise UnknownDeployment(f"unknown model {served_model_name!r}")
    now = utcnow()
    target = None
    if deployment_id is not None:
        target = next((r for r in rows if r.deployment_id == deployment_id), None)
        if target is None:
            raise UnknownDeployment(f"{deployment_id!r} does not serve {served_model_name!r}")
        _refuse_retired(target)
        if target.state not in ("stable", "canary", "previous"):
            raise Conflict(f"{deployment_id} is {target.state}: it cannot take traffic")
    for r in rows:
        if r.pinned and r is not target:
            _set(r, now, pinned=False)
    if target is None:
        return []
    _set(target, now, pinned=True, reason=reason)
    return [_event(target, "advanced", weight=1.0, reason=f"pinned: {reason}")]


async def retire(session: AsyncSession, event: DeploymentRetired) -> list[RolloutChanged]:
    """Inference released the deployment's engine. Not routed (pending, previous, rolled back,
    refused): it becomes ``retired`` and is never routed to or restored again. An active canary
    (or a pinned deployment) goes to 0% at once with a ``rolled_back`` event. The stable keeps
    its state, marked: dropping it would leave the model with no route at all, so it is left
    for an operator to promote or roll back (the service logs it and sets
    ``gateway_stable_engine_retired``). A deployment never registered is recorded as retired,
    so a late ``ModelDeployed`` cannot route to it. Idempotent."""
    now = utcnow()
    reason = f"engine retired by inference: {event.reason or 'no reason given'}"[:4000]
    row = await session.get(GatewayDeployment, event.deployment_id)
    if row is None:
        session.add(
            GatewayDeployment(
                deployment_id=event.deployment_id,
                served_model_name=event.served_model_name,
                model_id=event.model_id,
                endpoint="",
                engine="",
                role="candidate",
                run_id=event.run_id,
                cause_event_id=str(event.event_id),
                state="retired",
                reason=reason,
                retired_at=now,
                created_at=now,
                updated_at=now,
            )
        )
        await session.flush()
        return []
    if row.retired_at is not None:
        return []
    row.cause_event_id = str(event.event_id)
    row.trace_parent = current_traceparent()
    if row.state == "stable":
        _set(
            row,
            now,
            retired_at=now,
            reason=f"{reason}; still the stable (nothing to fall back to): promote another "
            "deployment or roll back",
        )
        return []
    routed = row.state == "canary" or row.pinned
    _set(row, now, state="retired", retired_at=now, weight=0.0, pinned=False, reason=reason)
    if routed:
        return [_event(row, "rolled_back", weight=0.0, reason=reason)]
    return []
