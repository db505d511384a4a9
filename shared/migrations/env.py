"""Alembic environment: runs the same migrations on SQLite and PostgreSQL (async drivers)."""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
# Several services may start at once and all migrate: serialise them.
_PG_LOCK_KEY = 0x7475_6E65  # "tune"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=None,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_lock({_PG_LOCK_KEY})"))
                await conn.commit()
            try:
                await conn.run_sync(_run)
                await conn.commit()
            finally:
                if conn.dialect.name == "postgresql":
                    await conn.execute(text(f"SELECT pg_advisory_unlock({_PG_LOCK_KEY})"))
                    await conn.commit()
    finally:
        await engine.dispose()


def _sqlite_lock_path(url: str) -> Path | None:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path.startswith(":memory:"):
        return None
    return Path(path).with_suffix(".migrate.lock")


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    lock_path = _sqlite_lock_path(url) if url.startswith("sqlite") else None
    if lock_path is None:
        asyncio.run(_run_async(url))
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        asyncio.run(_run_async(url))


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
