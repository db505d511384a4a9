"""``tuneloop gateway-key create|list|revoke``: API key management from a shell, straight
against the database (``DATABASE_URL`` / ``TUNELOOP_HOME``). A running gateway picks changes
up within ``GATEWAY_SYNC_INTERVAL_S``."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer


def _db() -> Any:
    from shared.db import Database
    from shared.settings import CommonSettings

    return Database(CommonSettings().resolved_database_url)


def register(app: typer.Typer) -> None:
    keys = typer.Typer(help="Gateway API keys (hashed at rest; a key is shown once).")
    app.add_typer(keys, name="gateway-key")

    @keys.command("create")
    def create(
        name: Annotated[str, typer.Option(help="Who or what the key is for.")] = "",
        scope: Annotated[
            list[str] | None, typer.Option("--scope", help="client and/or admin (repeatable).")
        ] = None,
        model: Annotated[
            list[str] | None,
            typer.Option("--model", help="Allowed model (repeatable; default all)."),
        ] = None,
        rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
        tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    ) -> None:
        """Create a key and print it (the only time it is shown)."""
        from services.gateway.keys import create_key

        async def go() -> Any:
            db = _db()
            await db.migrate()
            try:
                async with db.session() as session:
                    return await create_key(
                        session,
                        name=name,
                        scopes=set(scope or ["client"]),
                        models=model,
                        rpm=rpm,
                        tpm=tpm,
                    )
            finally:
                await db.dispose()

        try:
            created = asyncio.run(go())
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        typer.echo(json.dumps({"key": created.key, "key_id": created.info.key_id}))

    @keys.command("list")
    def list_() -> None:
        """List keys (never the keys themselves)."""
        from services.gateway.keys import list_keys

        async def go() -> list[dict[str, Any]]:
            db = _db()
            await db.migrate()
            try:
                async with db.session() as session:
                    rows = await list_keys(session)
            finally:
                await db.dispose()
            return [
                {
                    "key_id": r.key_id,
                    "name": r.name,
                    "scopes": r.scopes,
                    "rpm": r.rpm,
                    "tpm": r.tpm,
                    "revoked": r.revoked_at is not None,
                }
                for r in rows
            ]

        for row in asyncio.run(go()):
            typer.echo(json.dumps(row))

    @keys.command("revoke")
    def revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
        """Revoke a key: every gateway refuses it from its next sync on."""
        from services.gateway.keys import revoke_key

        async def go() -> bool:
            db = _db()
            await db.migrate()
            try:
                async with db.session() as session:
                    return await revoke_key(session, key_id)
            finally:
                await db.dispose()

        if not asyncio.run(go()):
            typer.echo(f"no active key {key_id!r}", err=True)
            raise typer.Exit(1)
        typer.echo(f"revoked {key_id}")
