"""``tuneloop deployments`` and ``tuneloop deploy MODEL``."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.events import AdapterQuantized, ArtifactRef, ModelFormat, new_run_id

console = Console()


async def _rows(live: bool) -> list[Any]:
    from sqlmodel import col, select

    from services.inference.models import LIVE_STATUSES, Deployment
    from shared.db import Database
    from shared.settings import CommonSettings

    db = Database(CommonSettings().resolved_database_url)
    try:
        await db.migrate()
        async with db.session() as s:
            query = select(Deployment).order_by(col(Deployment.created_at))
            if live:
                query = query.where(col(Deployment.status).in_(LIVE_STATUSES))
            return list((await s.exec(query)).all())
    finally:
        await db.dispose()


def deployments(
    live: Annotated[bool, typer.Option("--live", help="Only deployments that should run.")] = False,
) -> None:
    """List the inference service's deployments (engines and hot-loaded LoRAs)."""
    rows = asyncio.run(_rows(live))
    table = Table("id", "model", "format", "role", "rank", "status", "engine", "endpoint", "name")
    for r in rows:
        rank = {0: "stable", 1: "previous"}.get(r.stable_rank, "")
        table.add_row(
            r.id,
            r.model_id,
            r.format,
            r.role,
            rank,
            r.status,
            r.engine,
            r.endpoint or "",
            r.upstream_name,
        )
    console.print(table)


def _ref_of_uri(uri: str) -> ArtifactRef:
    from shared.settings import CommonSettings
    from shared.storage import ArtifactStore, safe_key, sha256_file

    store = ArtifactStore.from_url(CommonSettings().resolved_artifact_store_url)
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "manifest"
        store.backend.download(safe_key(store.backend.key_of(uri)), dest)
        digest, size = sha256_file(dest)
    return ArtifactRef(uri=uri, sha256=digest, size_bytes=size)


async def _deploy(event: AdapterQuantized) -> None:
    from shared.bus import EventBus
    from shared.settings import CommonSettings

    async with EventBus(CommonSettings().bus_settings(), service="cli") as bus:
        await bus.publish(event)


def deploy(
    model: Annotated[str, typer.Argument(help="A model directory, or its store URI (manifest).")],
    format: Annotated[str, typer.Option("--format", help="Model format.")] = "bf16-merged",
    base_model: Annotated[str, typer.Option(help="Base model name (for adapters).")] = "tiny",
    model_id: Annotated[str | None, typer.Option(help="Default: from the content hash.")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: don't).")] = 0,
) -> None:
    """Deploy a model by hand: publishes an AdapterQuantized that the service rolls out."""
    from shared.settings import CommonSettings
    from shared.storage import ArtifactStore

    fmt: ModelFormat = format  # type: ignore[assignment]
    if model.startswith(("file://", "gs://")):
        ref = _ref_of_uri(model)
    else:
        path = Path(model)
        if not path.is_dir():
            raise typer.BadParameter(f"{model} is not a directory or a file:// / gs:// URI")
        common = CommonSettings()
        store = ArtifactStore.from_url(common.resolved_artifact_store_url)
        ref = store.put_dir_sync(path, kind="model")
    mid = model_id or f"manual-{ref.sha256[:12]}"
    event = AdapterQuantized(
        run_id=new_run_id(),
        producer="cli",
        model_id=mid,
        adapter_id=mid,
        base_model=base_model,
        format=fmt,
        artifact=ref,
    )
    asyncio.run(_deploy(event))
    console.print(f"published AdapterQuantized {event.event_id} for model {mid} ({ref.uri})")
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        rows = [r for r in asyncio.run(_rows(False)) if r.model_id == mid]
        if rows and rows[-1].status in ("ready", "failed"):
            r = rows[-1]
            console.print(f"{r.id}: {r.status} {r.endpoint or ''} {r.reason or ''}")
            raise typer.Exit(0 if r.status == "ready" else 1)
        time.sleep(1)
    if wait:
        console.print("no outcome yet: see `tuneloop deployments`")
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command(name="deployments")(deployments)
    app.command(name="deploy")(deploy)
