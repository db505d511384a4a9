"""What every service process is made of: telemetry, DB, bus, outbox relay, artifact store,
and a small HTTP side (health, readiness, Prometheus metrics), started and stopped together.

A service's ``app.py`` builds a :class:`ServiceRuntime`, registers its subscribers on
``runtime.bus``, optionally adds routes to ``runtime.http``, and calls :func:`run_service`.
Handlers stay plain functions; ``app.py`` adapts them to the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.bus import EventBus
from shared.db import Database
from shared.events import Event
from shared.outbox import OutboxRelay, record_event
from shared.settings import CommonSettings
from shared.storage import ArtifactStore
from shared.telemetry import setup_telemetry

log = logging.getLogger(__name__)


class ServiceRuntime:
    """The ports of one service process, wired from :class:`CommonSettings`."""

    def __init__(self, name: str, common: CommonSettings | None = None) -> None:
        self.name = name
        self.common = common or CommonSettings()
        setup_telemetry(name)
        self.common.home.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.common.resolved_database_url)
        self.bus = EventBus(self.common.bus_settings(), service=name)
        self.store = ArtifactStore.from_url(
            self.common.resolved_artifact_store_url, cache_dir=self.common.home / "cache" / name
        )
        self.relay = OutboxRelay(self.db, self.bus, service=name)
        self.http = FastAPI(title=f"tuneloop {name}", version="0.1.0")
        # Incoming traceparent headers continue the caller's trace (e.g. an upload's).
        # No per-chunk receive/send spans: a 2 GB upload would write tens of thousands.
        FastAPIInstrumentor.instrument_app(
            self.http, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"]
        )
        self._add_health_routes()
        self._started = False

    @property
    def ns(self) -> Any:
        return self.bus.ns

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A unit of work; events recorded with :meth:`emit` inside it are published after
        it commits (and only if it commits)."""
        async with self.db.session() as session:
            yield session
        self.relay.notify()

    def emit(self, session: AsyncSession, event: Event) -> None:
        """Record ``event`` in the outbox, in ``session``'s transaction."""
        record_event(session, event, service=self.name, ns=self.ns)

    async def start(self) -> None:
        await self.db.migrate()
        await self.bus.start()
        self.relay.start()
        self._started = True
        log.info("%s started (broker %s)", self.name, self.common.nats_url)

    async def stop(self) -> None:
        await self.relay.stop()
        await self.bus.close()
        await self.db.dispose()
        self._started = False

    async def ready(self) -> dict[str, bool]:
        return {
            "started": self._started,
            "broker": await self.bus.ready(),
            "database": await self.db.ping(),
        }

    def _add_health_routes(self) -> None:
        @self.http.get("/healthz", include_in_schema=False)
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "service": self.name}

        @self.http.get("/readyz", include_in_schema=False)
        async def readyz(response: Response) -> dict[str, Any]:
            checks = await self.ready()
            ok = all(checks.values())
            response.status_code = 200 if ok else 503
            return {"ready": ok, "checks": checks}

        @self.http.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def run_service(runtime: ServiceRuntime, *, host: str | None = None, port: int = 0) -> None:
    """Start the runtime and its HTTP side; run until SIGTERM/SIGINT; stop cleanly.

    ``host`` defaults to ``TUNELOOP_HTTP_HOST`` (loopback; 0.0.0.0 in a container)."""
    import uvicorn

    host = host or runtime.common.http_host
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    server: uvicorn.Server | None = None
    serve_task: asyncio.Task[None] | None = None
    if port >= 0:
        config = uvicorn.Config(
            runtime.http, host=host, port=port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        serve_task = asyncio.create_task(server.serve())
    try:
        await stop.wait()
    finally:
        if server and serve_task:
            server.should_exit = True
            await serve_task
        await runtime.stop()
