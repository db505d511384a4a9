"""Fixtures of the chaos tier: a world of its own (broker on a fixed port and store that the
test may SIGKILL and restart, consumer processes) over a fresh PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest_asyncio

from shared.embedded import EmbeddedPostgres
from tests.chaos.ledger import ChaosWorld


async def create_database(postgres: EmbeddedPostgres) -> str:
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(
        host="127.0.0.1", port=postgres.port, user="postgres", database="postgres"
    )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/{name}"


@pytest_asyncio.fixture
async def make_world(
    postgres: EmbeddedPostgres, tmp_path: Path, span_file: Path
) -> AsyncIterator[Callable[..., Awaitable[ChaosWorld]]]:
    worlds: list[ChaosWorld] = []

    async def make(**kwargs: int) -> ChaosWorld:
        world = ChaosWorld(tmp_path / f"w{len(worlds)}", await create_database(postgres), **kwargs)
        worlds.append(world)
        await world.start()
        return world

    yield make
    for world in worlds:
        await world.close()
