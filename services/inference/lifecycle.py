"""Lifecycle: keep the stable and previous stable warm, retire the rest on promotion, re-adopt
or restart engines after a restart of the service, restart engines that die, stop them on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.inference.handlers import (
    ModelFiles,
    Plan,
    announced_engine,
    inspect_model,
    promote,
)
from services.inference.models import LIVE_STATUSES, Deployment
from services.inference.rollout import Deployer
from shared.events import ArtifactRef, RolloutChanged
from shared.telemetry import resume_trace

log = logging.getLogger(__name__)


class Rollout(Deployer):
    """The inference service's engine of record: deploys (:class:`Deployer`) and lifecycle."""

    # ------------------------------------------------------------------ lifecycle

    async def on_rollout_changed(self, event: RolloutChanged) -> None:
        if event.served_model_name != self.line:
            return
        async with self.lock:
            rows = await self.deployments()
            target = next((d for d in rows if d.id == event.deployment_id), None)
            if target is None:
                return
            if event.action == "promoted":
                plan = promote(rows, target.id)
                for d in rows:
                    rank = 0 if d.id == plan.stable else 1 if d.id == plan.previous else None
                    if d.stable_rank != rank:
                        d.stable_rank = rank
                        await self._save(d)
                for victim in plan.retire:
                    row = await self.get(victim)
                    if row is not None:
                        await self._retire(
                            row, reason=f"retired: {target.id} promoted", cause=event
                        )
            elif event.action in ("rolled_back", "refused") and target.stable_rank is None:
                await self._retire(
                    target, reason=f"retired: {event.action} by the gateway", cause=event
                )

    async def restore(self, *, locked: bool = False) -> None:
        """At start-up: re-adopt engines that outlived the previous run, restart the ones that
        should be running and are not, and mark what cannot come back as gone. ``locked``:
        the caller already holds :attr:`lock`."""
        if not locked:
            async with self.lock:
                await self.restore(locked=True)
            return
        rows = [d for d in await self.deployments(live_only=True) if d.mode == self.backend.mode]
        for row in sorted(rows, key=lambda d: (not d.has_engine, d.created_at)):
            try:
                await self._restore_one(row)
            except Exception as exc:
                log.exception("restoring %s failed", row.id)
                row = await self.get(row.id) or row
                if row.status in LIVE_STATUSES:
                    await self._end(row, "gone", f"restore failed: {exc!r}")

    async def _restore_one(self, row: Deployment) -> None:
        with _in_run_trace(row):
            await self._restore(row)

    async def _restore(self, row: Deployment) -> None:
        kind = "llama-cpp" if row.engine == "llama-cpp" else "vllm"
        plan = Plan("engine", kind, announced_engine(kind, self.profile))  # type: ignore[arg-type]
        if await self.healthy(row):
            log.info("re-adopted %s (pid %s) at %s", row.id, row.pid, row.endpoint)
            if row.status != "ready" and row.has_engine:  # its start was interrupted
                announced = row.ready_at is not None
                await self._finish_start(
                    row, self.handle_of(row), plan, None, announced, row.endpoint
                )
            elif row.status != "ready":
                row.status = "ready"
                await self._save(row)
            return
        if row.has_engine and row.pid and self.backend.alive(self.handle_of(row)):
            await self.backend.stop(self.handle_of(row))  # alive but not serving: no orphans
        if row.host_deployment_id:
            host = await self.get(row.host_deployment_id)
            if host is None or host.status != "ready" or not row.model_path:
                await self._end(row, "gone", "its base engine is gone")
                return
            if row.upstream_name not in await self.client.models(host.endpoint or ""):
                await self.client.load_lora(host.endpoint or "", row.upstream_name, row.model_path)
            row.status = "ready"
            await self._save(row)
            return
        path = row.model_path
        if not path or not await asyncio.to_thread(Path(path).exists):
            if row.role == "baseline":
                path = await asyncio.to_thread(self.resolve_base, row.base_model)
            elif row.artifact_uri and row.artifact_sha256 and row.artifact_size is not None:
                ref = ArtifactRef(
                    uri=row.artifact_uri, sha256=row.artifact_sha256, size_bytes=row.artifact_size
                )
                fetched = await self.store.fetch_dir(ref)
                fmt: Any = row.format
                files = inspect_model(fetched, fmt, max_lora_rank=self.settings.max_lora_rank)
                path = files.model_path
        if not path:
            await self._end(row, "gone", "model files unavailable")
            return
        tokenizer = None
        if kind == "llama-cpp" and Path(path).parent.joinpath("tokenizer_config.json").exists():
            tokenizer = str(Path(path).parent)
        log.info("restarting %s (%s)", row.id, row.status)
        await self._start(row, ModelFiles(model_path=path, tokenizer=tokenizer), plan, cause=None)

    async def heal(self) -> list[str]:
        """Restart engines that died while they should be serving (same port, so the
        endpoint the gateway holds stays valid). Returns the deployment ids restarted."""
        healed: list[str] = []
        async with self.lock:
            for row in await self.deployments(live_only=True):
                if not (row.has_engine and row.status == "ready" and row.mode == self.backend.mode):
                    continue
                if self.backend.alive(self.handle_of(row)):
                    continue
                log.warning("engine of %s (pid %s) died: restarting it", row.id, row.pid)
                try:
                    await self._restore_one(row)
                except Exception as exc:
                    log.exception("restarting %s failed", row.id)
                    row = await self.get(row.id) or row
                    if row.status in LIVE_STATUSES:
                        await self._end(row, "gone", f"restart failed: {exc!r}")
                healed.append(row.id)
            # LoRAs whose engine came back need loading again.
            for row in await self.deployments(live_only=True):
                if (
                    row.host_deployment_id
                    and row.status == "ready"
                    and row.host_deployment_id in healed
                ):
                    await self._restore_one(row)
        return healed

    async def shutdown(self) -> None:
        """Service stopping: stop the engines (unless configured to leave them running)."""
        if not self.settings.stop_engines_on_exit:
            return
        for row in await self.deployments(live_only=True):
            if row.has_engine and row.mode == self.backend.mode and row.pid is not None:
                await self.backend.stop(self.handle_of(row))
                row.status = "stopped"
                row.pid = None
                await self._save(row)
        await self.backend.stop_all()


@contextlib.contextmanager
def _in_run_trace(row: Deployment) -> Iterator[None]:
    """Restoring a deployment continues the trace of the run that created it (its events,
    e.g. the ModelDeployed of a start a crash interrupted, then join that run's trace)."""
    with resume_trace(
        row.trace_parent,
        "restore deployment",
        {"tuneloop.run_id": row.run_id, "tuneloop.deployment_id": row.id},
    ):
        yield
