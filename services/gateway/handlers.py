"""Event handlers: plain async functions; ``app.py`` adapts them to the bus.

Each records its effect, its ``RolloutChanged`` events and the inbox mark in one transaction,
so a redelivered event changes nothing.
"""

from __future__ import annotations

import logging

import aiohttp

from services.gateway.control import GatewayState, Probe
from services.gateway.models import GatewayDeployment
from services.gateway.routing import state as route_state
from shared.bus import PermanentError
from shared.events import DeploymentRetired, EvaluationCompleted, ModelDeployed
from shared.outbox import AlreadyProcessed, Inbox

log = logging.getLogger(__name__)

INBOX = Inbox("gateway")


async def probe_upstream(endpoint: str, served_model_name: str) -> tuple[str | None, int | None]:
    """Ask an OpenAI-compatible endpoint which model it serves and its context length (vLLM's
    ``max_model_len``). Returns (the name to send upstream if it differs, context) or Nones."""
    base = endpoint.rstrip("/")
    url = base + ("/models" if base.endswith("/v1") else "/v1/models")
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return None, None
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        log.warning("could not probe %s: %r", url, exc)
        return None, None
    models = [m for m in (doc.get("data") or []) if isinstance(m, dict)]
    match = next((m for m in models if m.get("id") == served_model_name), None)
    chosen = match or (models[0] if models else None)
    if chosen is None:
        return None, None
    ctx = chosen.get("max_model_len")
    upstream_model = None if match is not None else str(chosen.get("id"))
    return upstream_model, int(ctx) if isinstance(ctx, int) and ctx > 0 else None


async def on_model_deployed(
    event: ModelDeployed, *, state: GatewayState, probe: Probe = probe_upstream
) -> None:
    upstream_model, max_context = await probe(event.endpoint, event.served_model_name)
    try:
        async with state.changing() as session:
            if await INBOX.seen(session, str(event.event_id)):
                return
            events = await route_state.register_deployment(
                session, event, upstream_model=upstream_model, max_context_tokens=max_context
            )
            await state.emit_all(session, events)
            await INBOX.mark(session, str(event.event_id), event_id=str(event.event_id))
    except AlreadyProcessed:
        return


async def on_evaluation_completed(event: EvaluationCompleted, *, state: GatewayState) -> None:
    """Raises ``UnknownDeployment`` (retried by the bus) when the deployment's
    ``ModelDeployed`` has not been handled yet."""
    try:
        async with state.changing() as session:
            if await INBOX.seen(session, str(event.event_id)):
                return
            row = await route_state.get(session, event.deployment_id)
            if row.served_model_name != event.served_model_name:
                raise PermanentError(
                    f"{event.deployment_id} serves {row.served_model_name!r}, "
                    f"not {event.served_model_name!r}"
                )
            events = await route_state.apply_evaluation(
                session, event, first_weight=state.settings.canary_steps[0]
            )
            await state.emit_all(session, events)
            await INBOX.mark(session, str(event.event_id), event_id=str(event.event_id))
    except AlreadyProcessed:
        return


async def on_deployment_retired(event: DeploymentRetired, *, state: GatewayState) -> None:
    """Inference released a deployment's engine: see :func:`route_state.retire`."""
    try:
        async with state.changing() as session:
            if await INBOX.seen(session, str(event.event_id)):
                return
            row = await session.get(GatewayDeployment, event.deployment_id)
            if row is not None and row.served_model_name != event.served_model_name:
                raise PermanentError(
                    f"{event.deployment_id} serves {row.served_model_name!r}, "
                    f"not {event.served_model_name!r}"
                )
            stable = row is not None and row.state == "stable" and row.retired_at is None
            events = await route_state.retire(session, event)
            await state.emit_all(session, events)
            await INBOX.mark(session, str(event.event_id), event_id=str(event.event_id))
    except AlreadyProcessed:
        return
    if stable:
        log.error(
            "the engine of %s, the stable deployment of %r, was retired by inference (%s): it "
            "stays routed; promote another deployment or roll back",
            event.deployment_id,
            event.served_model_name,
            event.reason,
        )
