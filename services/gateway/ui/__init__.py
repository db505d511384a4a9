"""The pipeline dashboard, served by the gateway under ``/ui``.

Pages: runs (one row per run, polled while runs move), run detail (dataset, loss curve,
quantization, deployments, benchmark base vs fine-tuned per category, rollout history) and
traffic (routes with weights and live stats, admin actions). Everything is read from the event
stream and the gateway's own route state; admin actions go through the same route-state
functions as the admin API. Charts: uPlot, served from ``/ui/static`` (no CDN).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.gateway.control import GatewayState
from services.gateway.routing import state as route_state
from services.gateway.ui import auth
from services.gateway.ui.data import (
    EventLog,
    curve_series,
    ingest_report,
    lineage,
    loss_curve,
    run_view,
    runs_table,
    trace_rows,
)
from shared.events import Event, RolloutChanged
from shared.interactions import Interaction
from shared.storage import ArtifactStore
from shared.telemetry import default_span_file

__all__ = ["Dashboard", "EventLog", "install"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_FORM_BYTES = 4096
_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"
# State-changing calls must carry this header: a cross-site form cannot set it, and a
# cross-site fetch with it needs a CORS preflight the gateway never grants.
ACTION_HEADER = "x-tuneloop-ui"


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(pattern=r"^(weight|promote|rollback)$")
    deployment_id: str = Field(pattern=_ID)
    weight: float | None = Field(default=None, ge=0, le=1)


class Dashboard:
    def __init__(
        self, state: GatewayState, events: EventLog, store: ArtifactStore, secret: str
    ) -> None:
        self.state = state
        self.events = events
        self.store = store
        self.secret = secret
        self.curves: dict[str, Any] = {}
        self.reports: dict[str, Any] = {}
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )

    def page(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("stale", self.events.error)
        html = self.templates.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def refused(self, request: Request) -> Response:
        if request.url.path.startswith("/ui/api/"):
            return JSONResponse({"error": "admin key or login required"}, status_code=401)
        target = quote(request.url.path, safe="/")
        return self.page("login.html", status=401, error="", next=target, page="login")

    async def traffic(self) -> dict[str, Any]:
        await self.state.sync_once()
        models: dict[str, list[dict[str, Any]]] = {}
        routable = [r for r in self.state.rows.values() if r.state != "retired"]
        for row in sorted(routable, key=lambda r: (r.served_model_name, r.created_at)):
            models.setdefault(row.served_model_name, []).append(
                {
                    "deployment_id": row.deployment_id,
                    "model_id": row.model_id,
                    "run_id": row.run_id,
                    "role": row.role,
                    "state": row.state,
                    "weight": row.weight,
                    "auto": row.auto,
                    "pinned": row.pinned,
                    "reason": row.reason,
                    "live": self.state.live_stats(row.deployment_id),
                }
            )
        for rows in models.values():
            _shares(rows)
        return {"models": models}

    async def act(self, model: str, body: ActionBody) -> list[dict[str, Any]]:
        await self.state.sync_once()
        row = self.state.rows.get(body.deployment_id)
        if row is None or row.served_model_name != model:
            raise route_state.UnknownDeployment(f"{body.deployment_id!r} does not serve {model!r}")
        reason = f"{body.action} from the dashboard"
        async with self.state.changing() as session:
            if body.action == "weight":
                if body.weight is None:
                    raise route_state.Conflict("weight is required")
                events = await route_state.set_weight(
                    session, body.deployment_id, weight=body.weight, reason=reason
                )
            elif body.action == "promote":
                events = await route_state.promote(
                    session, body.deployment_id, expected_step=None, reason=reason, metrics={}
                )
            else:
                events = await route_state.rollback(
                    session,
                    body.deployment_id,
                    expected_step=None,
                    reason=reason,
                    metrics=self.state.live_stats(body.deployment_id),
                )
            await self.state.emit_all(session, events)
        return [e.model_dump(mode="json") for e in events]


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def install(
    app: FastAPI, state: GatewayState, *, events: EventLog, store: ArtifactStore, secret: str
) -> Dashboard:
    """Mount the dashboard on the gateway's FastAPI app."""
    ui = Dashboard(state, events, store, secret)
    router = APIRouter()

    def allowed(request: Request) -> bool:
        return auth.authorised(request, state.keys, secret)

    @router.get("/ui", include_in_schema=False)
    @router.get("/ui/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/ui/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        target = auth.safe_next(request.query_params.get("next"))
        return ui.page("login.html", error="", next=target, page="login")

    @router.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
            return ui.page("login.html", 413, error="form too large", next="/ui/runs", page="login")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return ui.page("login.html", 413, error="form too large", next="/ui/runs", page="login")
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        key = (form.get("key") or [""])[0].strip()
        target = auth.safe_next((form.get("next") or [""])[0])
        if not key or len(key) > 512 or not auth.is_admin_key(state.keys, key):
            return ui.page("login.html", 401, error="not an admin key", next=target, page="login")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            auth.COOKIE,
            auth.make_cookie(secret),
            max_age=auth.SESSION_S,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/ui/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(auth.COOKIE, path="/ui")
        return response

    @router.get("/ui/runs", include_in_schema=False)
    async def runs_page(request: Request) -> Response:
        if not allowed(request):
            return ui.refused(request)
        events = await ui.events.refresh()
        return ui.page("runs.html", runs=runs_table(events), held=len(events), page="runs")

    @router.get("/ui/api/runs", include_in_schema=False)
    async def runs_api(request: Request) -> Response:
        if not allowed(request):
            return ui.refused(request)
        events = await ui.events.refresh()
        return JSONResponse({"runs": runs_table(events)}, headers={"Cache-Control": "no-store"})

    @router.get("/ui/runs/{run_id}", include_in_schema=False)
    async def run_page(request: Request, run_id: str) -> Response:
        if not allowed(request):
            return ui.refused(request)
        if len(run_id) > 200:
            return ui.page("missing.html", 404, what="run", page="runs")
        view = run_view(await ui.events.refresh(), run_id)
        if view is None:
            return ui.page("missing.html", 404, what="run", page="runs")
        curve: dict[str, Any] = {"x": [], "phases": [], "y": []}
        curve_error = ""
        if view["training"] is not None:
            try:
                points = await loss_curve(store, view["training"]["adapter"], cache=ui.curves)
                curve = curve_series(points)
            except Exception as exc:  # a missing artefact must not take the page down
                log.warning("loss curve of %s unavailable: %s", run_id, exc)
                curve_error = "the adapter's loss curve could not be read"
        report: dict[str, dict[str, int]] | None = None
        if view["dataset"] is not None:
            try:
                report = await ingest_report(store, view["dataset"]["report"], cache=ui.reports)
            except Exception as exc:
                log.warning("ingest report of %s unavailable: %s", run_id, exc)
        spans, spans_note = await asyncio.to_thread(trace_rows, default_span_file(), run_id)
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            spans_note = "spans are exported over OTLP: see the run in your tracing UI (Jaeger)"
        return ui.page(
            "run.html",
            run=view,
            spans=spans,
            spans_note=spans_note,
            curve=curve,
            curve_error=curve_error,
            report=report,
            page="runs",
        )

    @router.get("/ui/lineage", include_in_schema=False)
    async def lineage_page(request: Request) -> Response:
        """From a response id or a deployment id: model → adapter → dataset → sources."""
        if not allowed(request):
            return ui.refused(request)
        query = request.query_params.get("q", "").strip()[:200]
        steps: list[dict[str, Any]] = []
        answered: dict[str, Any] | None = None
        if query:
            events = await ui.events.refresh()
            steps = lineage(events, query)
            if not steps:
                async with state.db.session() as session:
                    row = await session.get(Interaction, query)
                if row is not None:
                    answered = {
                        "id": row.id,
                        "at": row.created_at.isoformat(timespec="seconds"),
                        "deployment_id": row.deployment_id,
                        "model": row.served_model_name,
                        "status": row.status_code,
                        "feedback": row.feedback_rating,
                    }
                    steps = lineage(events, row.deployment_id)
        status = 404 if query and not steps else 200
        return ui.page(
            "lineage.html", status, q=query, steps=steps, answered=answered, page="lineage"
        )

    @router.get("/ui/traffic", include_in_schema=False)
    async def traffic_page(request: Request) -> Response:
        if not allowed(request):
            return ui.refused(request)
        data = await ui.traffic()
        rollouts = _rollout_history(await ui.events.refresh())
        return ui.page("traffic.html", traffic=data, rollouts=rollouts, page="traffic")

    @router.get("/ui/api/traffic", include_in_schema=False)
    async def traffic_api(request: Request) -> Response:
        if not allowed(request):
            return ui.refused(request)
        return JSONResponse(await ui.traffic(), headers={"Cache-Control": "no-store"})

    @router.post("/ui/api/traffic/{model}", include_in_schema=False)
    async def traffic_action(request: Request, model: str) -> Response:
        if not allowed(request):
            return ui.refused(request)
        if request.headers.get(ACTION_HEADER) != "1":
            return JSONResponse({"error": f"missing {ACTION_HEADER} header"}, status_code=403)
        raw = await request.body()
        if len(raw) > MAX_FORM_BYTES:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            body = ActionBody.model_validate_json(raw)
        except ValidationError as exc:
            return JSONResponse(
                {"error": "invalid action", "detail": [e["msg"] for e in exc.errors()[:5]]},
                status_code=400,
            )
        try:
            events = await ui.act(model[:200], body)
        except route_state.UnknownDeployment as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except route_state.Conflict as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"events": events})

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    return ui


def _shares(rows: list[dict[str, Any]]) -> None:
    """The share of requests each deployment gets now: a pin takes everything, else the canary
    its weight and stable the rest."""
    pinned = [r for r in rows if r["pinned"]]
    canary = sum(r["weight"] for r in rows if r["state"] == "canary")
    for r in rows:
        if pinned:
            r["share"] = 1.0 if r is pinned[0] else 0.0
        elif r["state"] == "canary":
            r["share"] = r["weight"]
        elif r["state"] == "stable":
            r["share"] = max(0.0, 1.0 - canary)
        else:
            r["share"] = 0.0


def _rollout_history(events: list[Event]) -> list[dict[str, Any]]:
    out = [
        {
            "at": e.occurred_at.isoformat(timespec="seconds"),
            "run_id": e.run_id,
            "model": e.served_model_name,
            "action": e.action,
            "deployment_id": e.deployment_id,
            "weight": e.weight,
            "reason": e.reason,
            "metrics": e.metrics,
        }
        for e in events
        if isinstance(e, RolloutChanged)
    ]
    return list(reversed(out))[:200]
