"""The gateway's live state and the loops that keep it right.

- Route table and keys, rebuilt from the DB when it changes (``sync_once``, every
  ``sync_interval_s``): a restart or a second replica converges on the same routes.
- The canary controller (``control_once``, every ``control_interval_s`` and at once after a
  canary failure): feeds live stats to :func:`routing.policy.decide` and applies the result as
  a conditional DB transition with its ``RolloutChanged`` event (outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol

from prometheus_client import Counter, Gauge
from sqlalchemy import delete, func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.gateway.capture import CaptureRecord, CaptureSink, apply_feedback
from services.gateway.keys import KeyInfo, KeyRing, RateLimiter
from services.gateway.models import GatewayDeployment, GatewayFeedback, GatewayReplicaStats
from services.gateway.routing import state as route_state
from services.gateway.routing.policy import Decision, Slo, decide
from services.gateway.routing.stats import ROLLING, LiveStats, WindowStats, merge, paired_step
from services.gateway.routing.table import Route, Upstream
from services.gateway.settings import GatewaySettings
from shared.aio import cancel_and_wait, wait_set
from shared.db import Database, utcnow
from shared.events import Event, RolloutChanged
from shared.telemetry import resume_trace

log = logging.getLogger(__name__)

ROLLOUTS = Counter("gateway_rollout_changes_total", "Rollout transitions made here", ["action"])
CANARY_WEIGHT = Gauge("gateway_canary_weight", "Current canary share", ["model"])
STABLE_RETIRED = Gauge(
    "gateway_stable_engine_retired",
    "1 while a model's stable deployment is one whose engine inference retired (alert on it)",
    ["model"],
)
ROUTED_STATES = ("stable", "canary")
FEEDBACK_RETRY_S = 30.0
REPROBE_S = 30.0
# Asks an upstream which model name it serves and its context length (see handlers).
Probe = Callable[[str, str], Awaitable[tuple[str | None, int | None]]]


class Outbox(Protocol):
    """What the state needs to record transitions (``ServiceRuntime`` is one)."""

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]: ...

    def emit(self, session: AsyncSession, event: Event) -> None: ...


class GatewayState:
    def __init__(
        self,
        settings: GatewaySettings,
        db: Database,
        outbox: Outbox,
        *,
        admin_key: str | None,
        probe: Probe | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self._probed: dict[str, float] = {}
        self.db = db
        self.outbox = outbox
        self.routes: dict[str, Route] = {}
        self.rows: dict[str, GatewayDeployment] = {}
        self.upstreams: dict[str, Upstream] = {}
        self.keys = KeyRing(admin_key)
        self.limiter = RateLimiter(settings.default_rpm, settings.default_tpm)
        self.stats = LiveStats(settings.stats_window, settings.slo_latency_confidence)
        self.slo = Slo(
            max_error_rate_increase=settings.slo_max_error_rate_increase,
            max_p95_ratio=settings.slo_max_p95_ratio,
            p95_slack_ms=settings.slo_p95_slack_ms,
            min_samples=settings.slo_min_samples,
            latency_confidence=settings.slo_latency_confidence,
        )
        self.capture = CaptureSink(
            db,
            enabled=settings.enable_data_collection,
            queue_size=settings.capture_queue_size,
            batch_size=settings.capture_batch_size,
            flush_s=settings.capture_flush_s,
            max_text_chars=settings.capture_max_text_chars,
            charge_tokens=self.limiter.charge_tokens,
        )
        self._routes_version: tuple[Any, ...] | None = None
        self._wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.canary_ids: frozenset[str] = frozenset()
        # Stable deployment id -> the step of the canary running beside it (paired windows).
        self.paired: dict[str, int] = {}
        # Feedback that arrived before its interaction was written: id -> give-up time.
        self.pending_feedback: dict[int, float] = {}
        self.replica_id = uuid.uuid4().hex[:12]
        # Other replicas' windows, keyed by (deployment, step); refreshed by the controller.
        self._peers: dict[tuple[str, int], list[WindowStats]] = {}

    # ------------------------------------------------------------------ hot-path hooks

    def record_outcome(
        self, deployment_id: str, step: int, ok: bool, latency_ms: float | None
    ) -> None:
        self.stats.record(deployment_id, step, ok, latency_ms)
        if step == ROLLING:
            canary_step = self.paired.get(deployment_id)
            if canary_step is not None:
                self.stats.record(deployment_id, paired_step(canary_step), ok, latency_ms)
        if not ok and deployment_id in self.canary_ids:
            self._wake.set()  # judge the canary now, not at the next tick

    def wants_capture(self, key: KeyInfo) -> bool:
        return self.capture.enabled or bool(key.tpm or self.limiter.default_tpm)

    def capture_offer(self, record: CaptureRecord) -> None:
        self.capture.offer(record)

    def feedback_pending(self, feedback_id: int) -> None:
        """Retry applying this feedback for a while (its interaction may still be queued here
        or on another replica). Bounded: beyond 10,000 pending, the oldest are given up."""
        if len(self.pending_feedback) >= 10_000:
            self.pending_feedback.pop(next(iter(self.pending_feedback)))
        self.pending_feedback[feedback_id] = time.monotonic() + FEEDBACK_RETRY_S

    async def apply_pending_feedback(self) -> int:
        if not self.pending_feedback:
            return 0
        now = time.monotonic()
        for fid in [f for f, until in self.pending_feedback.items() if until < now]:
            del self.pending_feedback[fid]
        applied = 0
        async with self.db.session() as session:
            result = await session.exec(
                select(GatewayFeedback).where(
                    col(GatewayFeedback.id).in_(list(self.pending_feedback)),
                    col(GatewayFeedback.applied).is_(False),
                )
            )
            for fb in result.all():
                if await apply_feedback(session, fb):
                    applied += 1
                    assert fb.id is not None
                    self.pending_feedback.pop(fb.id, None)
        return applied

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.sync_once(force=True)
        self.capture.start()
        self._tasks = [
            asyncio.create_task(self._loop(self.apply_pending_feedback, 0.5, False)),
            asyncio.create_task(self._loop(self._sync_tick, self.settings.sync_interval_s, False)),
            asyncio.create_task(
                self._loop(self.control_once, self.settings.control_interval_s, True)
            ),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        await self.capture.stop()
        try:
            await self.apply_pending_feedback()
        except Exception:
            log.exception("pending feedback not applied at shutdown")
        for upstream in self.upstreams.values():
            await upstream.close()

    async def _loop(self, step: Callable[[], Any], interval: float, wakeable: bool) -> None:
        while True:
            try:
                await step()
            except Exception:
                log.exception("%s failed; retrying", getattr(step, "__name__", step))
            if wakeable:
                await wait_set(self._wake, interval)
                self._wake.clear()
            else:
                await asyncio.sleep(interval)

    # ------------------------------------------------------------------ sync from the DB

    async def sync_once(self, force: bool = False) -> bool:
        """Reload routes and keys if their tables changed. Returns whether routes changed.

        Serialised: a periodic sync that read the tables before a change committed must not
        install its older view after the change's own (forced) sync."""
        async with self._sync_lock:
            return await self._sync(force)

    async def _sync(self, force: bool) -> bool:
        async with self.db.session() as session:
            await self.keys.reload(session, force=force)
            result = await session.exec(
                select(func.count(), func.max(col(GatewayDeployment.updated_at)))  # type: ignore[call-overload]
            )
            count, newest = result.one()
            version = (int(count), newest.isoformat() if isinstance(newest, datetime) else newest)
            if version == self._routes_version and not force:
                return False
            rows = await route_state.all_deployments(session)
        self._routes_version = version
        await self._rebuild(rows)
        return True

    async def _rebuild(self, rows: list[GatewayDeployment]) -> None:
        s = self.settings
        keep: dict[str, Upstream] = {}
        by_model: dict[str, list[GatewayDeployment]] = {}
        for row in rows:
            by_model.setdefault(row.served_model_name, []).append(row)
            if row.state in ROUTED_STATES or row.pinned:
                up = self.upstreams.get(row.deployment_id)
                if up is None or up.endpoint != row.endpoint:
                    if up is not None:
                        await up.close()
                    up = Upstream(
                        row,
                        pool_size=s.upstream_pool_size,
                        connect_timeout_s=s.upstream_connect_timeout_s,
                        breaker_failures=s.breaker_failures,
                        breaker_cooldown_s=s.breaker_cooldown_s,
                    )
                up.refresh(row)
                keep[row.deployment_id] = up
        routes: dict[str, Route] = {}
        canaries: set[str] = set()
        paired: dict[str, int] = {}
        for name, model_rows in by_model.items():
            stable = next((r for r in model_rows if r.state == "stable"), None)
            canary = next((r for r in model_rows if r.state == "canary"), None)
            pinned = next((r for r in model_rows if r.pinned), None)
            if stable is None and canary is None and pinned is None:
                continue
            if canary is not None:
                canaries.add(canary.deployment_id)
                if stable is not None:
                    paired[stable.deployment_id] = canary.step
                    old = self.routes.get(name)
                    if (
                        old is None
                        or old.canary is None
                        or (old.canary.deployment_id != canary.deployment_id)
                    ):
                        # A new canary: compare it with the stable from now on only.
                        self.stats.forget_paired(stable.deployment_id)
            routes[name] = Route(
                served_model_name=name,
                stable=keep[stable.deployment_id] if stable else None,
                canary=keep[canary.deployment_id] if canary else None,
                canary_weight=canary.weight if canary else 0.0,
                canary_step=canary.step if canary else 0,
                pinned=keep[pinned.deployment_id] if pinned else None,
            )
            CANARY_WEIGHT.labels(name).set(canary.weight if canary else 0.0)
            STABLE_RETIRED.labels(name).set(1 if stable and stable.retired_at else 0)
        for dep_id, up in self.upstreams.items():
            if dep_id not in keep:
                await up.close()
                self.stats.forget(dep_id)
        self.upstreams = keep
        self.rows = {r.deployment_id: r for r in rows}
        self.routes = routes  # one assignment: requests see the old or the new table
        self.canary_ids = frozenset(canaries)
        self.paired = paired

    async def _sync_tick(self) -> None:
        await self.sync_once()
        await self.publish_stats()
        if self.probe is not None:
            await self.reprobe()

    async def reprobe(self) -> int:
        """Ask routed upstreams whose model facts are unknown (their engine did not answer
        ``/v1/models`` when announced) again, at most every ``REPROBE_S`` each."""
        assert self.probe is not None
        now = time.monotonic()
        found = 0
        for dep_id in list(self.upstreams):
            row = self.rows.get(dep_id)
            if row is None or row.max_context_tokens or row.upstream_model:
                continue
            if now - self._probed.get(dep_id, -REPROBE_S) < REPROBE_S:
                continue
            self._probed[dep_id] = now
            upstream_model, max_context = await self.probe(row.endpoint, row.served_model_name)
            if not (upstream_model or max_context):
                continue
            async with self.changing() as session:
                fresh = await session.get(GatewayDeployment, dep_id)
                if fresh is not None:
                    fresh.upstream_model = upstream_model
                    fresh.max_context_tokens = max_context
                    fresh.updated_at = utcnow()
            found += 1
        return found

    def _windows(self) -> list[tuple[str, int]]:
        """The (deployment, step) windows that matter now: each stable's, each canary's, and
        the stable's window paired with its canary's step."""
        keys = []
        for route in self.routes.values():
            if route.stable is not None:
                keys.append((route.stable.deployment_id, ROLLING))
            if route.canary is not None:
                keys.append((route.canary.deployment_id, route.canary_step))
                if route.stable is not None:
                    keys.append((route.stable.deployment_id, paired_step(route.canary_step)))
        return keys

    async def publish_stats(self) -> None:
        """Write this replica's windows for the others (and drop long-dead replicas' rows)."""
        now = utcnow()
        async with self.db.session() as session:
            for dep, step in self._windows():
                w = self.stats.get(dep, step)
                values: dict[str, Any] = {
                    "requests": w.requests,
                    "errors": w.errors,
                    "p50_ms": w.p50_ms,
                    "p95_ms": w.p95_ms,
                    "p95_low_ms": w.p95_low_ms,
                    "latency_samples": w.latency_samples,
                    "updated_at": now,
                }
                result = await session.exec(
                    update(GatewayReplicaStats)
                    .where(
                        col(GatewayReplicaStats.replica_id) == self.replica_id,
                        col(GatewayReplicaStats.deployment_id) == dep,
                        col(GatewayReplicaStats.step) == step,
                    )
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if not result.rowcount:  # type: ignore[attr-defined]
                    session.add(
                        GatewayReplicaStats(
                            replica_id=self.replica_id, deployment_id=dep, step=step, **values
                        )
                    )
            await session.exec(
                delete(GatewayReplicaStats).where(
                    col(GatewayReplicaStats.updated_at) < now - timedelta(hours=1)
                )
            )

    async def refresh_peers(self) -> None:
        """Read the other live replicas' windows (fresh within a few sync intervals)."""
        fresh = utcnow() - timedelta(seconds=max(5.0, 3 * self.settings.sync_interval_s))
        peers: dict[tuple[str, int], list[WindowStats]] = {}
        async with self.db.session() as session:
            rows = await session.exec(
                select(GatewayReplicaStats).where(
                    col(GatewayReplicaStats.replica_id) != self.replica_id,
                    col(GatewayReplicaStats.updated_at) >= fresh,
                )
            )
            for r in rows.all():
                peers.setdefault((r.deployment_id, r.step), []).append(
                    WindowStats(
                        requests=r.requests,
                        errors=r.errors,
                        p95_ms=r.p95_ms,
                        p95_low_ms=r.p95_low_ms,
                        p50_ms=r.p50_ms,
                        latency_samples=r.latency_samples,
                    )
                )
        self._peers = peers

    def combined(self, deployment_id: str, step: int) -> WindowStats:
        """This replica's window merged with the other replicas' (as last read)."""
        own = self.stats.get(deployment_id, step)
        others = self._peers.get((deployment_id, step), [])
        return merge([own, *others], min_samples=self.settings.slo_min_samples)

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[AsyncSession]:
        """A transaction whose route changes apply here at once (others see them next sync)."""
        async with self.outbox.transaction() as session:
            yield session
        await self.sync_once(force=True)

    async def emit_all(self, session: AsyncSession, events: list[RolloutChanged]) -> None:
        for event in events:
            self.outbox.emit(session, event)
            ROLLOUTS.labels(event.action).inc()
            log.info(
                "rollout %s: %s %s at %.0f%% (%s)",
                event.served_model_name,
                event.deployment_id,
                event.action,
                event.weight * 100,
                event.reason,
            )

    # ------------------------------------------------------------------ canary control

    def live_stats(self, deployment_id: str) -> dict[str, float]:
        row = self.rows.get(deployment_id)
        if row is None:
            return {}
        step = row.step if row.state == "canary" else -1
        return self.combined(deployment_id, step).as_dict()

    async def control_once(self) -> list[RolloutChanged]:
        """Judge every canary once; apply and return the transitions this replica won."""
        done: list[RolloutChanged] = []
        steps = self.settings.canary_steps
        if any(r.canary is not None for r in self.routes.values()):
            await self.refresh_peers()
        for route in list(self.routes.values()):
            canary = route.canary
            if canary is None or route.pinned is not None:
                continue
            row = self.rows.get(canary.deployment_id)
            if row is None or row.state != "canary":
                continue
            canary_stats = self.combined(canary.deployment_id, row.step)
            # The reference: the stable's outcomes of the same period as this canary step.
            stable_stats = (
                self.combined(route.stable.deployment_id, paired_step(row.step))
                if route.stable
                else canary_stats
            )
            started = row.step_started_at or row.updated_at
            decision = decide(
                canary=canary_stats,
                stable=stable_stats,
                step=row.step,
                steps=steps,
                step_age_s=(utcnow() - started).total_seconds(),
                min_requests=self.settings.step_min_requests,
                min_seconds=self.settings.step_min_seconds,
                slo=self.slo,
                auto=row.auto,
                circuit_open=canary.breaker.is_open,
            )
            if decision.action == "hold":
                continue
            metrics = {f"canary_{k}": v for k, v in canary_stats.as_dict().items()}
            metrics.update({f"stable_{k}": v for k, v in stable_stats.as_dict().items()})
            with _decision_span(row, decision.action):
                done.extend(await self._apply(row, decision, steps, metrics))
        return done

    async def _apply(
        self,
        row: GatewayDeployment,
        decision: Decision,
        steps: list[float],
        metrics: dict[str, float],
    ) -> list[RolloutChanged]:
        """Apply one canary decision (and emit its events) in one transaction."""
        async with self.changing() as session:
            if decision.action == "rollback":
                events = await route_state.rollback(
                    session,
                    row.deployment_id,
                    expected_step=row.step,
                    reason=decision.reason,
                    metrics=metrics,
                )
            elif decision.action == "promote":
                events = await route_state.promote(
                    session,
                    row.deployment_id,
                    expected_step=row.step,
                    reason=decision.reason,
                    metrics=metrics,
                )
            else:
                assert decision.next_step is not None
                events = await route_state.advance(
                    session,
                    row.deployment_id,
                    expected_step=row.step,
                    new_step=decision.next_step,
                    weight=steps[decision.next_step],
                    reason=decision.reason,
                    metrics=metrics,
                )
            await self.emit_all(session, events)
        return events


@contextlib.contextmanager
def _decision_span(row: GatewayDeployment, action: str) -> Iterator[None]:
    """A live-stats decision joins the trace of the run whose evaluation started the canary."""
    with resume_trace(
        row.trace_parent,
        f"canary {action}",
        {"tuneloop.run_id": row.run_id, "tuneloop.deployment_id": row.deployment_id},
    ):
        yield
