"""The inference service: AdapterQuantized → engine → ModelDeployed; keeps rollback targets warm.

python -m services.inference.app        (HTTP port from INFERENCE_HTTP_PORT)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import HTTPException

from services.inference.engines.base import EngineBackend
from services.inference.engines.client import EngineClient
from services.inference.engines.local import LocalEngines
from services.inference.lifecycle import Rollout
from services.inference.settings import InferenceSettings
from services.inference.state import describe
from shared.aio import cancel_and_wait
from shared.bus import Delivery
from shared.events import AdapterQuantized, RolloutChanged
from shared.service import ServiceRuntime, run_service
from shared.settings import CommonSettings

log = logging.getLogger(__name__)


def make_backend(settings: InferenceSettings, runtime: ServiceRuntime) -> EngineBackend:
    if settings.mode == "k8s":
        from services.inference.engines.k8s import K8sEngines

        # The artifact cache (TUNELOOP_HOME) is the models PVC, mounted at the same path in
        # the engine pods, so a fetched model's path means the same thing there.
        backend: EngineBackend = K8sEngines(
            settings, models_mount=str(runtime.common.home.resolve())
        )
        return backend
    return LocalEngines(
        vllm_python=str(settings.vllm_python),
        llama_cpp_python=str(settings.llama_cpp_python) if settings.llama_cpp_python else None,
        log_dir=runtime.common.home / "logs" / "engines",
        host=settings.host,
        stop_timeout_s=settings.stop_timeout_s,
    )


class InferenceRuntime(ServiceRuntime):
    """The shared runtime plus engines: restored before consuming, stopped after."""

    def __init__(
        self,
        settings: InferenceSettings | None = None,
        common: CommonSettings | None = None,
        *,
        name: str = "inference",
    ) -> None:
        super().__init__(name, common)
        self.settings = settings or InferenceSettings()
        self.client = EngineClient()
        self.rollout = Rollout(
            db=self.db,
            outbox=self,
            store=self.store,
            backend=make_backend(self.settings, self),
            client=self.client,
            settings=self.settings,
        )
        self._baseline_task: asyncio.Task[Any] | None = None
        self._restored = False
        self._watch_task: asyncio.Task[None] | None = None
        self.bus.subscribe(
            AdapterQuantized,
            self._on_adapter_quantized,
            heartbeat=True,
            ack_wait_s=self.settings.ack_wait_s,
        )
        self.bus.subscribe(RolloutChanged, self._on_rollout_changed)
        self._add_routes()

    async def _on_adapter_quantized(self, event: AdapterQuantized, delivery: Delivery) -> None:
        await self.rollout.deploy(event)

    async def _on_rollout_changed(self, event: RolloutChanged, delivery: Delivery) -> None:
        await self.rollout.on_rollout_changed(event)

    async def start(self) -> None:
        """Serve at once; engines are restored in the background (restarting one takes a
        minute on a CPU) while deliveries wait for the rollout lock, held until then."""
        await self.db.migrate()
        await self.rollout.lock.acquire()
        self._baseline_task = asyncio.create_task(self._boot(), name="inference-boot")
        await super().start()
        if self.settings.watch_interval_s > 0:
            self._watch_task = asyncio.create_task(self._watch(), name="inference-watch")

    async def _boot(self) -> None:
        try:
            await self.rollout.restore(locked=True)
        except Exception:
            log.exception("restoring engines failed")
        finally:
            self.rollout.lock.release()
            self._restored = True
        if self.settings.baseline_model:
            await self._deploy_baseline(self.settings.baseline_model)

    async def _deploy_baseline(self, base_model: str) -> None:
        try:
            row = await self.rollout.deploy_baseline(base_model)
        except Exception:
            log.exception("baseline deployment of %s failed", base_model)
            return
        if row is not None:
            log.info("baseline %s: %s %s", base_model, row.id, row.status)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                await self.rollout.heal()
            except Exception:  # the next round tries again
                log.exception("engine watch failed")

    async def _cancel_tasks(self) -> None:
        await cancel_and_wait(self._baseline_task, self._watch_task)
        self._baseline_task = self._watch_task = None

    async def wait_baseline(self) -> None:
        """Until the engines of the previous run are restored and the baseline deployed."""
        if self._baseline_task is not None:
            await asyncio.shield(self._baseline_task)

    async def stop(self) -> None:
        await self._cancel_tasks()
        await self.relay.stop()
        await self.bus.close()  # no new work while the engines go down
        try:
            await self.rollout.shutdown()  # records states only; nothing to publish
        finally:
            await self.db.dispose()
            await self.client.close()
            self._started = False

    async def abandon(self) -> None:
        """Stop this process's service side and leave the engines running, as a crash would
        (tests use it to check that the next start re-adopts them)."""
        await self._cancel_tasks()
        await super().stop()
        await self.client.close()

    async def ready(self) -> dict[str, bool]:
        checks = await super().ready()
        checks["engines_restored"] = self._restored
        if self.settings.baseline_model:
            rows = await self.rollout.deployments(live_only=True)
            checks["baseline"] = any(r.role == "baseline" and r.status == "ready" for r in rows)
        return checks

    def _add_routes(self) -> None:
        @self.http.get("/deployments")
        async def list_deployments(live: bool = False) -> list[dict[str, Any]]:
            return describe(await self.rollout.deployments(live_only=live))

        @self.http.get("/deployments/{deployment_id}")
        async def get_deployment(deployment_id: str) -> dict[str, Any]:
            if len(deployment_id) > 64:
                raise HTTPException(status_code=404, detail="no such deployment")
            row = await self.rollout.get(deployment_id)
            if row is None:
                raise HTTPException(status_code=404, detail="no such deployment")
            return describe([row])[0]


async def serve() -> None:
    runtime = InferenceRuntime()
    await run_service(runtime, host=runtime.settings.http_host, port=runtime.settings.http_port)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
