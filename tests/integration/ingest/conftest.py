"""A real ingest service for each test: nats-server, SQLite or PostgreSQL, and the local
store (with SQLite) or the GCS emulator (with PostgreSQL)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from services.ingest.app import wire
from services.ingest.settings import IngestSettings
from shared.bus import BusSettings, EventBus
from shared.events import Event
from shared.service import ServiceRuntime
from shared.settings import CommonSettings
from tests.integration.streams import eventually, read_stream


@pytest.fixture
def store_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    if database_url.startswith("sqlite"):
        return (tmp_path / "artifacts").as_uri()
    request.getfixturevalue("gcs_emulator")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    storage.Client(project="tuneloop", credentials=AnonymousCredentials()).create_bucket(bucket)
    return f"gs://{bucket}/artifacts"


@dataclass
class RunningIngest:
    runtime: ServiceRuntime
    settings: IngestSettings
    client: httpx.AsyncClient
    bus: EventBus
    work_dir: Path

    async def events(self, event_type: type[Event]) -> list[Any]:
        ns = self.runtime.ns
        msgs = await read_stream(
            self.bus.settings.nats_url, ns.stream, ns.subject(event_type.subject)
        )
        return [event_type.model_validate_json(m.data) for m in msgs]

    async def messages(self, event_type: type[Event]) -> list[Any]:
        ns = self.runtime.ns
        return await read_stream(
            self.bus.settings.nats_url, ns.stream, ns.subject(event_type.subject)
        )

    async def wait_for(self, event_type: type[Event], count: int = 1) -> list[Any]:
        async def enough() -> list[Any] | None:
            found = await self.events(event_type)
            return found if len(found) >= count else None

        result: list[Any] = await eventually(enough, timeout_s=30, what=event_type.__name__)
        return result

    async def scalar(self, sql: str) -> Any:
        async with self.runtime.db.session() as session:
            return (await session.execute(text(sql))).scalar()


@pytest.fixture
def ingest_service(
    bus_settings: BusSettings, database_url: str, store_url: str, tmp_path: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningIngest]]:
    @contextlib.asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[RunningIngest]:
        common = CommonSettings(
            nats_url=bus_settings.nats_url,
            subject_prefix=bus_settings.prefix,
            home=tmp_path / "home",
            artifact_store_url=store_url,
            ack_wait_s=10.0,
            max_deliver=3,
            **{"DATABASE_URL": database_url},
        )
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        settings = IngestSettings(
            **{
                "workers": 1,
                "harvest_enabled": False,
                "harvest_settle_s": 0,
                "harvest_min_examples": 3,
                "work_dir": str(work),
                **overrides,
            }
        )
        runtime = ServiceRuntime("ingest", common)
        wire(runtime, settings, None)
        await runtime.start()
        bus = EventBus(bus_settings, service="ingest-test")
        await bus.start()
        transport = httpx.ASGITransport(app=runtime.http)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
                yield RunningIngest(runtime, settings, client, bus, work)
        finally:
            await bus.close()
            await runtime.stop()

    return run
