"""Hermetic test harness: real nats-server (JetStream), PostgreSQL, SQLite and GCS emulator.

Each server starts once per test run on a free loopback port in a temp dir. Each test gets
its own subject prefix (so its own streams) and its own database, so tests never see each
other's messages or rows.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from shared.bus import BusSettings
from shared.db import Database
from shared.embedded import EmbeddedPostgres, GcsEmulator, NatsServer

os.environ.setdefault("TUNELOOP_LOG_LEVEL", "INFO")


def _timeout_of(item: pytest.Item) -> float:
    try:
        from pytest_timeout import _get_item_settings

        return float(_get_item_settings(item).timeout or 0)
    except Exception:  # another pytest-timeout version: no early cancel, the timeout still holds
        return 0.0


@pytest_asyncio.fixture(autouse=True)
async def _cancel_a_stuck_async_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Cancel an async test a little before pytest-timeout would kill it.

    pytest-timeout can only show the event loop waiting in ``select()``; a cancelled task
    fails with the chain of awaits it was stuck in, which is what one needs to fix a hang."""
    timeout = _timeout_of(request.node)
    function = getattr(request, "function", None)
    if timeout <= 0 or function is None or not inspect.iscoroutinefunction(function):
        yield
        return
    loop = asyncio.get_running_loop()

    def cancel() -> None:
        tasks = asyncio.all_tasks(loop)
        print(f"\n{len(tasks)} tasks on the loop:", *tasks, sep="\n  ", file=sys.stderr)
        for task in tasks:
            if getattr(task.get_coro(), "cr_code", None) is function.__code__:
                print(
                    f"\n{request.node.nodeid}: still running after {after:.0f}s; cancelling "
                    "it to show where it is stuck",
                    file=sys.stderr,
                )
                task.print_stack(file=sys.stderr)
                task.cancel(f"stuck for {after:.0f}s (pytest-timeout is {timeout:.0f}s)")

    after = timeout - min(30.0, timeout * 0.1)
    handle = loop.call_later(after, cancel)
    try:
        yield
    finally:
        handle.cancel()


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def span_file(infra_dir: Path) -> Path:
    """Every span of this test run (in-process and child processes) lands here."""
    path = infra_dir / "spans.jsonl"
    os.environ["TUNELOOP_SPAN_FILE"] = str(path)
    from shared.telemetry import setup_telemetry

    setup_telemetry("tests")
    return path


@pytest.fixture(scope="session")
def nats_server(infra_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(infra_dir / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres(infra_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(infra_dir / "pg").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(infra_dir: Path) -> Iterator[GcsEmulator]:
    server = GcsEmulator(infra_dir).start()
    os.environ["STORAGE_EMULATOR_HOST"] = server.host
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A subject prefix (and so stream names) of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus_settings(nats_server: NatsServer, prefix: str, span_file: Path) -> BusSettings:
    return BusSettings(
        nats_url=nats_server.url,
        prefix=prefix,
        ack_wait_s=2.0,
        max_deliver=3,
        backoff_s=(0.2, 0.4),
        duplicate_window_s=120.0,
    )


async def _postgres_database(postgres: EmbeddedPostgres) -> str:
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(
        host="127.0.0.1", port=postgres.port, user="postgres", database="postgres"
    )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/{name}"


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind (the test runs once per kind)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    postgres = request.getfixturevalue("postgres")
    return await _postgres_database(postgres)


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.migrate()
    yield database
    await database.dispose()


@pytest_asyncio.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    await database.migrate()
    yield database
    await database.dispose()
