"""``tuneloop up``: the embedded mode on one machine, as supervised processes.

Starts a real nats-server with JetStream (unless ``TUNELOOP_NATS_URL`` points elsewhere), the
database (SQLite file by default; the embedded PostgreSQL with ``--postgres``; whatever
``DATABASE_URL`` says otherwise), the local artifact store, and every service that has an
``app.py`` (run as ``python -m services.<name>.app``). A service that exits is restarted with
exponential backoff and reported. Everything lives under one run directory; its state file
lets ``tuneloop down`` stop exactly what this started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.embedded import EmbeddedPostgres, NatsServer, free_port, wait_for_port

SERVICES = ("ingest", "trainer", "quantizer", "inference", "evaluator", "gateway")
ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "up.json"


def available_services() -> list[str]:
    return [s for s in SERVICES if (ROOT / "services" / s / "app.py").exists()]


@dataclass
class Supervised:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff_s: float = 1.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()


@dataclass
class Embedded:
    home: Path
    postgres: bool = False
    services: list[str] = field(default_factory=available_services)
    nats: NatsServer | None = None
    pg: EmbeddedPostgres | None = None
    children: list[Supervised] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Defaults for the services' environment (the caller's own environment wins).
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> dict[str, Any]:
        self.home.mkdir(parents=True, exist_ok=True)
        logs = self.home / "logs"
        env = {**self.extra_env, **os.environ}
        env["TUNELOOP_HOME"] = str(self.home)
        env.setdefault("TUNELOOP_SPAN_FILE", str(self.home / "spans.jsonl"))
        env.setdefault("TUNELOOP_LOG_FORMAT", "json")
        if not env.get("TUNELOOP_NATS_URL"):
            self.nats = NatsServer(self.home / "nats", log_dir=logs).start()
            env["TUNELOOP_NATS_URL"] = self.nats.url
        if self.postgres and not env.get("DATABASE_URL"):
            self.pg = EmbeddedPostgres(self.home / "postgres").start()
            env["DATABASE_URL"] = self.pg.url
        env.setdefault(
            "DATABASE_URL", f"sqlite+aiosqlite:///{(self.home / 'tuneloop.db').resolve()}"
        )
        env.setdefault("TUNELOOP_ARTIFACT_STORE_URL", (self.home / "artifacts").resolve().as_uri())
        # Migrate once, before any service starts.
        from shared.db import upgrade

        upgrade(env["DATABASE_URL"])
        self.env = env
        for name in self.services:
            port = free_port()
            child_env = {**env, f"{name.upper()}_HTTP_PORT": str(port)}
            child = Supervised(
                name=name,
                args=[sys.executable, "-m", f"services.{name}.app"],
                env=child_env,
                log_path=logs / f"{name}.log",
                http_port=port,
            )
            child.start()
            self.children.append(child)
        for child in self.children:
            try:
                wait_for_port(child.http_port, timeout_s=60, proc=child.proc, what=child.name)
            except (RuntimeError, TimeoutError) as exc:
                print(f"  ! {child.name} did not come up: {exc}; see {child.log_path}")
        state = self.state()
        (self.home / STATE_FILE).write_text(json.dumps(state, indent=2))
        return state

    def state(self) -> dict[str, Any]:
        return {
            "supervisor_pid": os.getpid(),
            "home": str(self.home.resolve()),
            "nats_url": self.env.get("TUNELOOP_NATS_URL"),
            "database_url": self.env.get("DATABASE_URL"),
            "artifact_store_url": self.env.get("TUNELOOP_ARTIFACT_STORE_URL"),
            "span_file": self.env.get("TUNELOOP_SPAN_FILE"),
            "services": {
                c.name: {
                    "pid": c.proc.pid if c.proc else None,
                    "http_port": c.http_port,
                    "log": str(c.log_path),
                }
                for c in self.children
            },
            "infra_pids": [p.proc.pid for p in (self.nats,) if p and p.proc],
            "postgres_data": str(self.pg.data_dir) if self.pg else None,
        }

    def supervise_once(self) -> list[str]:
        """Restart any service that exited, with backoff. Returns messages for the user."""
        notes = []
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.next_start == 0.0:
                # Whatever the dead service left in its process group (pool workers that
                # missed their parent's death, a fork server) goes with it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.next_start = now + child.backoff_s
                notes.append(
                    f"{child.name} exited with code {child.proc.returncode}; restarting in "
                    f"{child.backoff_s:.0f}s (log: {child.log_path})"
                )
            elif now >= child.next_start:
                child.start()
                child.restarts += 1
                child.next_start = 0.0
                child.backoff_s = min(child.backoff_s * 2, 60.0)
                notes.append(f"{child.name} restarted (restart #{child.restarts})")
        return notes

    def stop(self) -> None:
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGTERM)
        for child in self.children:
            if child.proc:
                try:
                    child.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(child.proc.pid, signal.SIGKILL)
        if self.nats:
            self.nats.stop()
        if self.pg:
            self.pg.stop()
        (self.home / STATE_FILE).unlink(missing_ok=True)


def stop_from_state(home: Path) -> bool:
    """``tuneloop down``: signal the supervisor recorded in the state file (it stops the rest)."""
    path = home / STATE_FILE
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    pid = int(state["supervisor_pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        # The supervisor is gone: stop what it left behind, and only that.
        for svc in state["services"].values():
            if svc.get("pid"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(svc["pid"]), signal.SIGTERM)
        for infra_pid in state.get("infra_pids", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(infra_pid), signal.SIGTERM)
        path.unlink(missing_ok=True)
        return True
    for _ in range(300):
        if not path.exists():
            break
        time.sleep(0.1)
    return True
