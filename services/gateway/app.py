"""Gateway service: wires the runtime (DB, bus, outbox, health/metrics), the route state, the
event handlers, the admin API and the ASGI proxy; ``main()`` serves it with uvicorn
(httptools + uvloop when installed).

Run alone: ``python -m services.gateway.app`` (port from ``GATEWAY_HTTP_PORT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from services.gateway import admin, ui
from services.gateway.control import GatewayState
from services.gateway.handlers import (
    on_deployment_retired,
    on_evaluation_completed,
    on_model_deployed,
    probe_upstream,
)
from services.gateway.keys import create_key, list_keys
from services.gateway.proxy import ProxyApp
from services.gateway.settings import GatewaySettings
from shared.bus import Delivery
from shared.embedded import free_port
from shared.events import DeploymentRetired, EvaluationCompleted, ModelDeployed
from shared.service import ServiceRuntime
from shared.settings import CommonSettings

log = logging.getLogger(__name__)


class GatewayService:
    def __init__(
        self,
        settings: GatewaySettings | None = None,
        common: CommonSettings | None = None,
        *,
        probe: Any = probe_upstream,
    ) -> None:
        self.settings = settings or GatewaySettings()
        self.runtime = ServiceRuntime("gateway", common)
        self.state = GatewayState(
            self.settings,
            self.runtime.db,
            self.runtime,
            admin_key=self.runtime.common.admin_key.get_secret_value(),
            probe=probe,
        )
        self.probe = probe
        admin.install(self.runtime.http, self.state)
        common = self.runtime.common
        self.dashboard = ui.install(
            self.runtime.http,
            self.state,
            events=ui.EventLog(common.nats_url, common.subject_prefix),
            store=self.runtime.store,
            secret=common.admin_key.get_secret_value(),
        )
        self.asgi = ProxyApp(self.state, self.runtime.http)
        self.runtime.bus.subscribe(ModelDeployed, self._on_deployed)
        self.runtime.bus.subscribe(EvaluationCompleted, self._on_evaluated)
        self.runtime.bus.subscribe(DeploymentRetired, self._on_retired)
        self.dev_key: str | None = None
        self.port: int | None = None
        self._stopped = False

    async def _on_deployed(self, event: ModelDeployed, delivery: Delivery) -> None:
        await on_model_deployed(event, state=self.state, probe=self.probe)

    async def _on_evaluated(self, event: EvaluationCompleted, delivery: Delivery) -> None:
        await on_evaluation_completed(event, state=self.state)

    async def _on_retired(self, event: DeploymentRetired, delivery: Delivery) -> None:
        await on_deployment_retired(event, state=self.state)

    async def start(self) -> None:
        await self.runtime.start()
        await self.state.start()
        if self.runtime.common.dev_mode and self.settings.dev_client_key:
            async with self.runtime.db.session() as session:
                if not await list_keys(session):
                    created = await create_key(session, name="dev", scopes={"client"})
                    self.dev_key = created.key
            if self.dev_key:
                self.state.keys.add(self.dev_key, created.info)
                # Dev mode only: the one time this key is ever shown.
                print(f"gateway dev mode: client API key {self.dev_key}", flush=True)

    async def stop(self) -> None:
        """Refuse new model requests, let those in flight finish (``SHUTDOWN_GRACE_S``), then
        drain capture: every request that completed is recorded. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.asgi.drain(self.settings.shutdown_grace_s)
        await self.dashboard.events.close()
        await self.state.stop()
        await self.runtime.stop()

    @contextlib.asynccontextmanager
    async def serving(self, host: str | None = None, port: int | None = None) -> AsyncIterator[int]:
        """Start everything and serve HTTP until the block ends; yields the port."""
        import uvicorn

        await self.start()
        self.port = port or self.settings.http_port or free_port()
        config = uvicorn.Config(
            self.asgi,
            host=host or self.settings.http_host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http=_http_impl(),
            timeout_keep_alive=75,
            backlog=4096,
            # On SIGTERM, in-flight answers (long streams too) get this long to finish; stop()
            # gives them the same again when uvicorn did not wait (a second signal).
            timeout_graceful_shutdown=max(1, round(self.settings.shutdown_grace_s)),
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("gateway HTTP server stopped during start-up")
                await asyncio.sleep(0.01)
            yield self.port
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
            await self.stop()


def _http_impl() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


async def serve() -> None:
    service = GatewayService()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with service.serving() as port:
        log.info("gateway listening on %s:%s", service.settings.http_host, port)
        await stop.wait()


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
