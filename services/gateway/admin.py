"""Admin API (admin-scoped keys) and feedback (client keys), on the FastAPI side.

Admin: list routes with live stats, set a canary's weight, pin, promote, roll back; create,
list and revoke API keys. Every route change goes through the DB with its ``RolloutChanged``
event, so other replicas and a restarted gateway see it.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.capture import apply_feedback
from services.gateway.control import GatewayState
from services.gateway.keys import SCOPES, KeyInfo, create_key, list_keys, revoke_key
from services.gateway.models import GatewayFeedback
from services.gateway.routing import state as route_state
from shared.db import utcnow

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightBody(_Body):
    deployment_id: str = Field(pattern=_ID)
    weight: float = Field(ge=0, le=1)


class PinBody(_Body):
    deployment_id: str | None = Field(default=None, pattern=_ID)


class DeploymentBody(_Body):
    deployment_id: str = Field(pattern=_ID)


class RollbackBody(_Body):
    deployment_id: str | None = Field(default=None, pattern=_ID)


class KeyBody(_Body):
    name: str = Field(default="", max_length=200)
    scopes: list[str] = Field(default=["client"], min_length=1, max_length=2)
    models: list[str] | None = Field(default=None, max_length=100)
    rpm: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm: int | None = Field(default=None, ge=1, le=10_000_000_000)


class FeedbackBody(_Body):
    response_id: str = Field(min_length=1, max_length=64)
    rating: int = Field(ge=-1, le=1)
    correction: str | None = Field(default=None, max_length=100_000)
    comment: str | None = Field(default=None, max_length=10_000)


def _error(status: int, message: str, kind: str) -> HTTPException:
    return HTTPException(status, detail={"message": message, "type": kind})


def install(app: FastAPI, state: GatewayState) -> None:
    """Add the admin and feedback routes to ``app`` (the service runtime's FastAPI)."""

    def key_with(scope: str) -> Any:
        def dependency(request: Request) -> KeyInfo:
            key = state.keys.authenticate(request.headers.get("authorization"))
            if key is None:
                raise _error(401, "missing, invalid or revoked API key", "authentication_error")
            if scope not in key.scopes:
                raise _error(403, f"this key lacks the {scope!r} scope", "permission_error")
            return key

        return dependency

    Admin = Annotated[KeyInfo, Depends(key_with("admin"))]
    Client = Annotated[KeyInfo, Depends(key_with("client"))]
    router = APIRouter()

    @app.exception_handler(HTTPException)
    async def openai_error(_request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse(
            {"error": {"type": "invalid_request_error", "param": None, "code": None, **detail}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def change(op: Any) -> list[dict[str, Any]]:
        try:
            async with state.changing() as session:
                events = await op(session)
                await state.emit_all(session, events)
        except route_state.UnknownDeployment as exc:
            raise _error(404, str(exc), "not_found") from exc
        except route_state.Conflict as exc:
            raise _error(409, str(exc), "conflict") from exc
        return [e.model_dump(mode="json") for e in events]

    @router.get("/admin/routes")
    async def routes(_: Admin) -> dict[str, Any]:
        await state.sync_once()
        out: dict[str, Any] = {}
        rows = [r for r in state.rows.values() if r.state != "retired"]  # history, not routes
        for row in sorted(rows, key=lambda r: (r.served_model_name, r.created_at)):
            up = state.upstreams.get(row.deployment_id)
            out.setdefault(row.served_model_name, []).append(
                {
                    "deployment_id": row.deployment_id,
                    "model_id": row.model_id,
                    "endpoint": row.endpoint,
                    "role": row.role,
                    "state": row.state,
                    "weight": row.weight,
                    "step": row.step,
                    "auto": row.auto,
                    "pinned": row.pinned,
                    "reason": row.reason,
                    "engine_retired": row.retired_at is not None,
                    "updated_at": row.updated_at.isoformat(),
                    "circuit_open": bool(up and up.breaker.is_open),
                    "live": state.live_stats(row.deployment_id),
                }
            )
        return {"models": out, "steps": state.settings.canary_steps}

    @router.post("/admin/routes/{model}/weight")
    async def set_weight(model: str, body: WeightBody, _: Admin) -> dict[str, Any]:
        await _belongs(model, body.deployment_id)
        events = await change(
            lambda s: route_state.set_weight(
                s, body.deployment_id, weight=body.weight, reason="weight set by admin"
            )
        )
        return {"events": events}

    @router.post("/admin/routes/{model}/pin")
    async def pin(model: str, body: PinBody, _: Admin) -> dict[str, Any]:
        events = await change(
            lambda s: route_state.pin(s, model, body.deployment_id, reason="pinned by admin")
        )
        return {"events": events}

    @router.post("/admin/routes/{model}/promote")
    async def promote(model: str, body: DeploymentBody, _: Admin) -> dict[str, Any]:
        await _belongs(model, body.deployment_id)
        events = await change(
            lambda s: route_state.promote(
                s, body.deployment_id, expected_step=None, reason="promoted by admin", metrics={}
            )
        )
        return {"events": events}

    @router.post("/admin/routes/{model}/rollback")
    async def rollback(model: str, body: RollbackBody, _: Admin) -> dict[str, Any]:
        """Roll back the canary; with no canary, restore the previous stable."""
        await state.sync_once()
        rows = [r for r in state.rows.values() if r.served_model_name == model]
        if not rows:
            raise _error(404, f"unknown model {model!r}", "not_found")
        target = body.deployment_id
        canary = next((r for r in rows if r.state == "canary"), None)
        if target is None and canary is not None:
            target = canary.deployment_id
        if target is not None and any(
            r.deployment_id == target and r.state == "canary" for r in rows
        ):
            events = await change(
                lambda s: route_state.rollback(
                    s,
                    target,
                    expected_step=None,
                    reason="rolled back by admin",
                    metrics=state.live_stats(target),
                )
            )
            return {"events": events}
        if target is not None:  # a named deployment that is not the canary: restore it
            named = next((r for r in rows if r.deployment_id == target), None)
            if named is None:
                raise _error(404, f"{target!r} does not serve {model!r}", "not_found")
            if named.state != "previous":
                what = "retired by inference (its engine is gone)" if named.retired_at else None
                raise _error(
                    409,
                    f"cannot roll back to {target}: it is {what or named.state}, not a canary "
                    "or a previous stable",
                    "conflict",
                )
            previous = [named]
        else:
            previous = sorted(
                (r for r in rows if r.state == "previous"),
                key=lambda r: r.updated_at,
                reverse=True,
            )
        if not previous:
            gone = max(
                (r for r in rows if r.state == "retired"), key=lambda r: r.updated_at, default=None
            )
            detail = (
                " (deployments retired by inference are not rollback targets: their engines "
                f"are gone; the latest is {gone.deployment_id})"
                if gone is not None
                else ""
            )
            raise _error(409, f"no canary to roll back and no previous stable{detail}", "conflict")
        restore = previous[0].deployment_id
        events = await change(
            lambda s: route_state.promote(
                s,
                restore,
                expected_step=None,
                reason="manual rollback to previous stable",
                metrics={},
            )
        )
        return {"events": events}

    async def _belongs(model: str, deployment_id: str) -> None:
        await state.sync_once()
        row = state.rows.get(deployment_id)
        if row is None or row.served_model_name != model:
            raise _error(404, f"{deployment_id!r} does not serve {model!r}", "not_found")

    @router.post("/admin/keys", status_code=201)
    async def new_key(body: KeyBody, _: Admin) -> dict[str, Any]:
        if set(body.scopes) - SCOPES:
            raise _error(400, f"scopes must be among {sorted(SCOPES)}", "invalid_request_error")
        async with state.db.session() as session:
            created = await create_key(
                session,
                name=body.name,
                scopes=set(body.scopes),
                models=body.models,
                rpm=body.rpm,
                tpm=body.tpm,
            )
        state.keys.add(created.key, created.info)
        return {"key": created.key, "key_id": created.info.key_id, "scopes": body.scopes}

    @router.get("/admin/keys")
    async def keys(_: Admin) -> dict[str, Any]:
        async with state.db.session() as session:
            rows = await list_keys(session)
        return {
            "keys": [
                {
                    "key_id": r.key_id,
                    "name": r.name,
                    "scopes": r.scopes.split(","),
                    "rpm": r.rpm,
                    "tpm": r.tpm,
                    "revoked": r.revoked_at is not None,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ]
        }

    @router.delete("/admin/keys/{key_id}")
    async def revoke(key_id: str, _: Admin) -> dict[str, Any]:
        async with state.db.session() as session:
            revoked = await revoke_key(session, key_id[:32])
        if not revoked:
            raise _error(404, f"no active key {key_id[:32]!r}", "not_found")
        await state.sync_once(force=True)
        return {"revoked": key_id}

    @router.post("/v1/feedback", status_code=202)
    async def feedback(body: FeedbackBody, key: Client) -> dict[str, Any]:
        """Rate an answer by its response id (and optionally correct it). Applied at once when
        the interaction is stored, or as soon as capture writes it."""
        async with state.db.session() as session:
            fb = GatewayFeedback(
                response_id=body.response_id,
                api_key_id=key.key_id,
                rating=body.rating,
                correction=body.correction,
                comment=body.comment,
                created_at=utcnow(),
            )
            session.add(fb)
            await session.flush()
            applied = await apply_feedback(session, fb)
        if not applied and fb.id is not None:
            state.feedback_pending(fb.id)
        return {"response_id": body.response_id, "applied": applied}

    app.include_router(router)
