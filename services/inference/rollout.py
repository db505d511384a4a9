"""Rollout: AdapterQuantized → a ready engine (or a hot-loaded LoRA) → ModelDeployed.

State lives in ``inference_deployments``; every transition that other services must hear about
is recorded with its event in one transaction (outbox). One rollout operation runs at a time
(engines compete for the same cores and memory; a lock serialises them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any
from uuid import UUID, uuid4, uuid5

from sqlalchemy.exc import IntegrityError

from services.inference.engines.base import EngineHandle, EngineSpec, EngineStartError
from services.inference.engines.client import EngineError
from services.inference.handlers import (
    ModelFiles,
    Plan,
    Refused,
    announced_engine,
    inspect_model,
    pick_eviction,
    plan_for,
)
from services.inference.models import LIVE_STATUSES, Deployment
from services.inference.state import PRODUCER, DeploymentState, safe_id
from shared.db import utcnow
from shared.events import (
    AdapterQuantized,
    ArtifactRef,
    DeploymentFailed,
    DeploymentRetired,
    Engine,
    Event,
    ModelDeployed,
)
from shared.storage import ArtifactCorrupted, ArtifactError, ArtifactNotFound
from shared.telemetry import current_traceparent

log = logging.getLogger(__name__)

# DeploymentRetired event ids: uuid5(this, deployment id).
RETIRED_NAMESPACE = UUID("5b0e7d0c-6f1e-4a0e-9d7a-2c1e6d9b7a41")


class CapacityFull(RuntimeError):
    """Every engine slot holds a deployment that must stay; retry later."""


class Deployer(DeploymentState):
    """Deploys: a model on an engine of its own, a LoRA on its base engine, the baseline."""

    # ------------------------------------------------------------------ rollout

    async def deploy(self, event: AdapterQuantized) -> Deployment:
        """Handle one AdapterQuantized (idempotent: a redelivery starts nothing new)."""
        async with self.lock:
            return await self._deploy(event)

    async def _deploy(self, event: AdapterQuantized) -> Deployment:
        key = f"model:{event.model_id}:{event.format}:{self.line}"
        row = await self._by_key(key)
        if row is not None and (
            row.status in ("failed", "retired", "gone")
            or (row.status == "ready" and await self.healthy(row))
        ):
            log.info("deployment %s for %s is %s: nothing to do", row.id, key, row.status)
            return row
        if row is None:
            row = await self._new_row(key, event)
            if row.status != "starting":
                return row
        try:
            plan = plan_for(
                event.format, profile=self.profile, gguf_engine=self.settings.gguf_engine
            )
        except Refused as exc:
            return await self._fail(row, str(exc), retryable=False, cause=event)
        row.engine = plan.engine
        try:
            started = time.monotonic()
            path = await self.store.fetch_dir(event.artifact)
            row.fetch_s = time.monotonic() - started
            files = await asyncio.to_thread(
                inspect_model, path, event.format, max_lora_rank=self.settings.max_lora_rank
            )
        except (ArtifactCorrupted, ArtifactNotFound) as exc:
            return await self._fail(row, f"model artifact unusable: {exc}", False, cause=event)
        except Refused as exc:
            return await self._fail(row, str(exc), retryable=False, cause=event)
        except ArtifactError as exc:  # anything else from the store may pass: retry
            raise RuntimeError(f"fetching {event.artifact.uri}: {exc}") from exc
        row.model_path = files.model_path
        if plan.kind == "lora":
            return await self._hot_load(row, files, event)
        return await self._start(row, files, plan, cause=event)

    async def _new_row(self, key: str, event: AdapterQuantized) -> Deployment:
        row = Deployment(
            id=f"dep-{uuid4().hex[:16]}",
            dedupe_key=key,
            run_id=event.run_id,
            source_event_id=str(event.event_id),
            trace_parent=current_traceparent(),
            model_id=event.model_id,
            adapter_id=event.adapter_id,
            dataset_id=event.dataset_id,
            base_model=event.base_model,
            format=event.format,
            role="candidate",
            served_model_name=self.line,
            upstream_name=self.line,
            engine="vllm",
            mode=self.backend.mode,
            profile=self.profile.name,
            status="starting",
            artifact_uri=event.artifact.uri,
            artifact_sha256=event.artifact.sha256,
            artifact_size=event.artifact.size_bytes,
            validation_json=event.validation.model_dump_json() if event.validation else None,
        )
        if event.format == "adapter":
            row.upstream_name = safe_id(event.adapter_id, prefix=f"{self.line}-")
        try:
            async with self.db.session() as s:
                s.add(row)
        except IntegrityError:  # another delivery created it first
            existing = await self._by_key(key)
            assert existing is not None
            return existing
        return row

    async def _evict_if_full(self, starting: Deployment, cause: Event | None) -> None:
        while True:
            others = [d for d in await self.deployments(live_only=True) if d.id != starting.id]
            victim = pick_eviction(others, max_engines=self.settings.max_engines)
            if victim is False:
                return
            if victim is None:
                raise CapacityFull(
                    f"all {self.settings.max_engines} engine slots hold stable, previous-stable "
                    "or baseline deployments (INFERENCE_MAX_ENGINES)"
                )
            row = await self.get(str(victim))
            assert row is not None
            log.info("engine budget full: retiring %s", row.id)
            await self._retire(row, reason="evicted: engine budget full", cause=cause)

    def _spec(self, row: Deployment, files: ModelFiles, kind: str) -> EngineSpec:
        names = (row.upstream_name,) if kind == "llama-cpp" else (row.upstream_name, row.id)
        return EngineSpec(
            deployment_id=row.id,
            kind="llama-cpp" if kind == "llama-cpp" else "vllm",
            model_path=files.model_path,
            tokenizer=files.tokenizer,
            served_names=names,
            profile=self.profile,
            enable_lora=self.settings.enable_lora and kind == "vllm" and row.role == "baseline",
            max_loras=self.settings.max_loras,
            max_lora_rank=self.settings.max_lora_rank,
            port=row.port,
        )

    async def _start(
        self, row: Deployment, files: ModelFiles, plan: Plan, *, cause: Event | None
    ) -> Deployment:
        try:
            await self._evict_if_full(row, cause)
        except CapacityFull as exc:
            return await self._fail(row, str(exc), retryable=True, cause=cause)
        kind = plan.engine_kind
        old_endpoint = row.endpoint
        announced = row.ready_at is not None
        try:
            handle = await self.backend.start(self._spec(row, files, kind))
        except EngineStartError as exc:
            return await self._fail(row, f"engine could not start: {exc}", False, cause)
        row.pid, row.port, row.endpoint = handle.pid, handle.port, handle.endpoint
        row.k8s_name = handle.k8s_name
        row.log_path = str(handle.log_path) if handle.log_path else None
        row.status = "starting"
        await self._save(row)  # a crash from here on leaves a row to adopt or clean up
        return await self._finish_start(row, handle, plan, cause, announced, old_endpoint)

    async def _finish_start(
        self,
        row: Deployment,
        handle: EngineHandle,
        plan: Plan,
        cause: Event | None,
        announced: bool,
        old_endpoint: str | None,
    ) -> Deployment:
        kind = plan.engine_kind
        try:
            row.start_s, row.ready_s = await self.client.wait_ready(
                handle.endpoint,
                row.upstream_name,
                timeout_s=self.settings.start_timeout_s,
                smoke_timeout_s=self.settings.smoke_timeout_s,
                alive=lambda: self.backend.alive(handle),
                vllm=kind == "vllm",
            )
        except EngineError as exc:
            return await self._fail(row, f"engine not ready: {exc}", False, cause, handle)
        except BaseException:
            await self.backend.stop(handle)  # cancelled: leave nothing running
            raise
        row.status = "ready"
        row.ready_at = row.ready_at or utcnow()
        row.reason = None
        if announced and old_endpoint == row.endpoint:
            await self._save(row)  # restarted in place: the gateway's route still holds
        else:
            await self._save(row, self._deployed(row, plan.engine, cause))
        log.info("deployment %s ready at %s", row.id, row.endpoint)
        return row

    def _deployed(self, row: Deployment, engine: Engine, cause: Event | None) -> ModelDeployed:
        fields: dict[str, Any] = {
            "producer": PRODUCER,
            "deployment_id": row.id,
            "model_id": row.model_id,
            "engine": engine,
            "endpoint": row.endpoint,
            "served_model_name": row.upstream_name,
            "format": row.format,
            "role": row.role,
            "dataset_id": row.dataset_id,
            "validation": ArtifactRef.model_validate_json(row.validation_json)
            if row.validation_json
            else None,
        }
        if cause is not None and cause.run_id == row.run_id:
            return cause.follow(ModelDeployed, **fields)
        # Finished outside the handler (a start that a crash interrupted): still caused by
        # the event that asked for it.
        causation = UUID(row.source_event_id) if row.source_event_id else None
        return ModelDeployed(run_id=row.run_id, causation_id=causation, **fields)

    async def _fail(
        self,
        row: Deployment,
        reason: str,
        retryable: bool,
        cause: Event | None = None,
        handle: EngineHandle | None = None,
    ) -> Deployment:
        """Tear down, keep the log's tail in the artifact store, publish DeploymentFailed."""
        if handle is not None:
            await self.backend.stop(handle)
            tail = await self.backend.log_tail(handle, self.settings.log_tail_bytes)
            if tail:
                try:
                    ref = await self.store.put_bytes(
                        tail, kind="inference-logs", name=f"{row.id}.log"
                    )
                    row.log_uri = ref.uri
                except Exception as exc:  # the failure is reported either way
                    log.warning("could not keep the log tail of %s: %r", row.id, exc)
                last = tail.decode(errors="replace").strip().splitlines()[-15:]
                reason = f"{reason}\nengine log (tail): {row.log_uri}\n" + "\n".join(last)
        row.status = "failed"
        row.reason = reason[:8000]
        row.pid = None
        event_fields: dict[str, Any] = {
            "producer": PRODUCER,
            "reason": row.reason,
            "retryable": retryable,
            "model_id": row.model_id,
            "failed_event_id": cause.event_id if cause else None,
        }
        if cause is not None:
            failed = cause.follow(DeploymentFailed, **event_fields)
        else:
            failed = DeploymentFailed(run_id=row.run_id, **event_fields)
        if retryable:  # a later delivery (or a replay) may try again with the same key
            row.dedupe_key = f"{row.dedupe_key}#failed-{row.id}"[:255]
        events: list[Event] = [failed]
        if row.ready_at is not None:  # it had served (a restart failed): the gateway must know
            events.append(self._retired(row, f"failed: {row.reason}", cause))
        await self._save(row, *events)
        log.error("deployment %s failed: %s", row.id, reason.splitlines()[0])
        return row

    async def _hot_load(
        self, row: Deployment, files: ModelFiles, event: AdapterQuantized
    ) -> Deployment:
        if self.backend.mode != "local":
            return await self._fail(
                row, "LoRA hot-loading is implemented for local engines only", False, event
            )
        host = await self._ensure_baseline(event.base_model)
        if host is None or host.status != "ready" or not host.endpoint:
            reason = f"no running base engine for {event.base_model!r} to hot-load the LoRA into"
            return await self._fail(row, reason, retryable=True, cause=event)
        row.host_deployment_id = host.id
        row.endpoint = host.endpoint
        try:
            if row.upstream_name not in await self.client.models(host.endpoint):
                await self.client.load_lora(host.endpoint, row.upstream_name, files.model_path)
            started = time.monotonic()
            _, row.ready_s = await self.client.wait_ready(
                host.endpoint,
                row.upstream_name,
                timeout_s=30,
                smoke_timeout_s=self.settings.smoke_timeout_s,
            )
            row.start_s = time.monotonic() - started
        except EngineError as exc:
            return await self._fail(row, f"LoRA hot-load failed: {exc}", False, event)
        row.status = "ready"
        row.ready_at = utcnow()
        await self._save(row, self._deployed(row, announced_engine("vllm", self.profile), event))
        return row

    # ------------------------------------------------------------------ baseline

    async def deploy_baseline(self, base_model: str) -> Deployment | None:
        async with self.lock:
            return await self._ensure_baseline(base_model)

    async def _ensure_baseline(self, base_model: str) -> Deployment | None:
        key = f"baseline:{base_model}:{self.line}"
        row = await self._by_key(key)
        if row is not None and row.status == "ready" and await self.healthy(row):
            return row
        if row is not None and row.status in ("failed", "retired"):
            return row
        if row is None:
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            row = Deployment(
                id=f"dep-{uuid4().hex[:16]}",
                dedupe_key=key,
                run_id=f"run-baseline-{digest}",
                model_id=safe_id(base_model, prefix="base-"),
                base_model=base_model,
                format="bf16-merged",
                role="baseline",
                served_model_name=self.line,
                upstream_name=self.line,
                engine=announced_engine("vllm", self.profile),
                mode=self.backend.mode,
                profile=self.profile.name,
                status="starting",
            )
            if not any(
                d.stable_rank == 0 and d.served_model_name == self.line
                for d in await self.deployments(live_only=True)
            ):
                row.stable_rank = 0
            async with self.db.session() as s:
                s.add(row)
        try:
            path = await asyncio.to_thread(self.resolve_base, base_model)
        except Exception as exc:
            return await self._fail(row, f"base model {base_model!r}: {exc}", retryable=False)
        row.model_path = path
        plan = Plan("engine", "vllm", announced_engine("vllm", self.profile))
        return await self._start(row, ModelFiles(model_path=path), plan, cause=None)

    async def _retire(self, row: Deployment, *, reason: str, cause: Event | None = None) -> None:
        """Stop serving ``row`` for good (engine stopped, or LoRA unloaded) and announce it with
        ``DeploymentRetired`` in the same transaction. Only a live row is retired, so a
        redelivered cause announces nothing twice."""
        fresh = await self.get(row.id)
        if fresh is None or fresh.status not in LIVE_STATUSES:
            return
        row = fresh
        if row.host_deployment_id:
            host = await self.get(row.host_deployment_id)
            if host and host.endpoint:
                try:
                    await self.client.unload_lora(host.endpoint, row.upstream_name)
                except (EngineError, OSError) as exc:
                    log.warning("unloading %s: %r", row.upstream_name, exc)
        else:
            for d in await self.deployments(live_only=True):
                if d.host_deployment_id == row.id:
                    await self._retire(d, reason=f"retired with its engine {row.id}", cause=cause)
            await self.backend.stop(self.handle_of(row))
        row.status = "retired"
        row.reason = reason
        row.stable_rank = None
        row.pid = None
        await self._save(row, self._retired(row, reason, cause))
        log.info("deployment %s retired: %s", row.id, reason)

    def _retired(self, row: Deployment, reason: str, cause: Event | None) -> DeploymentRetired:
        """The announcement that ``row`` no longer serves. Its id is derived from the
        deployment, so even a second publish is one event for the broker (dedupe) and for
        consumers (inbox). It belongs to the deployment's run (like ModelDeployed): the cause's
        run when that is the same, otherwise the deployment's own, caused by ``cause``."""
        fields: dict[str, Any] = {
            "event_id": uuid5(RETIRED_NAMESPACE, row.id),
            "producer": PRODUCER,
            "deployment_id": row.id,
            "model_id": row.model_id,
            "served_model_name": row.upstream_name,
            "reason": reason[:4000],
        }
        if cause is not None and cause.run_id == row.run_id:
            return cause.follow(DeploymentRetired, **fields)
        causation = cause.event_id if cause is not None else None
        return DeploymentRetired(run_id=row.run_id, causation_id=causation, **fields)

    async def _end(self, row: Deployment, status: str, reason: str) -> None:
        """A live row that cannot serve again (``gone``): recorded, and announced as retired
        when the gateway had been told it serves."""
        row.status, row.reason, row.pid = status, reason[:8000], None
        events = [self._retired(row, reason, None)] if row.ready_at is not None else []
        await self._save(row, *events)
