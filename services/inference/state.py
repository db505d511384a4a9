"""The inference service's state: ``inference_deployments`` rows, read and written with the
events they cause (outbox), and what an engine behind a row looks like."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.inference.engines.base import EngineBackend, EngineHandle
from services.inference.engines.client import EngineClient
from services.inference.engines.profiles import get_profile
from services.inference.models import LIVE_STATUSES, Deployment
from services.inference.settings import InferenceSettings
from shared.db import Database, utcnow
from shared.events import Event
from shared.storage import ArtifactStore

log = logging.getLogger(__name__)

PRODUCER = "inference"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:\-]")


class Outbox(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]: ...

    def emit(self, session: AsyncSession, event: Event) -> None: ...


def safe_id(text: str, *, prefix: str = "") -> str:
    cleaned = _UNSAFE.sub("-", text).strip("-.:") or "model"
    if len(prefix + cleaned) > 120:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        cleaned = cleaned[: 120 - len(prefix) - 13] + "-" + digest
    return prefix + cleaned


class DeploymentState:
    """Ports, settings and queries shared by rollout and lifecycle."""

    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        store: ArtifactStore,
        backend: EngineBackend,
        client: EngineClient,
        settings: InferenceSettings,
        resolve_base: Callable[[str], str] | None = None,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.store = store
        self.backend = backend
        self.client = client
        self.settings = settings
        self.line = settings.served_model_name
        self.profile = get_profile(settings.profile_name(), settings.profile_overrides)
        self.lock = asyncio.Lock()
        if resolve_base is None:
            from shared.basemodels import resolve_base_model

            resolve_base = resolve_base_model
        self.resolve_base = resolve_base

    # ------------------------------------------------------------------ queries

    async def deployments(self, *, live_only: bool = False) -> list[Deployment]:
        async with self.db.session() as s:
            query = select(Deployment).order_by(col(Deployment.created_at))
            if live_only:
                query = query.where(col(Deployment.status).in_(LIVE_STATUSES))
            return list((await s.exec(query)).all())

    async def get(self, deployment_id: str) -> Deployment | None:
        async with self.db.session() as s:
            return await s.get(Deployment, deployment_id)

    async def _by_key(self, key: str) -> Deployment | None:
        async with self.db.session() as s:
            found = await s.exec(select(Deployment).where(col(Deployment.dedupe_key) == key))
            return found.first()

    async def _save(self, row: Deployment, *events: Event) -> None:
        row.updated_at = utcnow()
        async with self.outbox.transaction() as s:
            await s.merge(row)
            for event in events:
                self.outbox.emit(s, event)

    @staticmethod
    def handle_of(row: Deployment) -> EngineHandle:
        return EngineHandle(
            deployment_id=row.id,
            endpoint=row.endpoint or "",
            port=row.port,
            pid=row.pid,
            k8s_name=row.k8s_name,
            log_path=Path(row.log_path) if row.log_path else None,
        )

    async def healthy(self, row: Deployment) -> bool:
        host = row
        if row.host_deployment_id:
            found = await self.get(row.host_deployment_id)
            if found is None:
                return False
            host = found
        if not host.endpoint or not self.backend.alive(self.handle_of(host)):
            return False
        return row.upstream_name in await self.client.models(host.endpoint)


def describe(rows: list[Deployment]) -> list[dict[str, Any]]:
    """Rows as plain dicts (CLI and HTTP)."""
    return [json.loads(r.model_dump_json()) for r in rows]
