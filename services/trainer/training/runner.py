"""Drives a training worker process from async code: starts it, relays its progress, asks it
to stop on cancellation, and reads its outcome. The event loop stays free meanwhile (the
bus heartbeats from it); the worker dies with its parent (``PR_SET_PDEATHSIG``), so a killed
service never leaves an orphan training on the machine."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.trainer.training.worker import (
    EXIT_CANCELLED,
    PROGRESS_PREFIX,
    STOP_FILE,
)
from shared.aio import cancel_and_wait

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
PR_SET_PDEATHSIG = 1

ProgressHandler = Callable[[dict[str, Any]], Awaitable[None]]
StopCheck = Callable[[], Awaitable[bool]]


@dataclass
class Outcome:
    """How a worker run ended. ``crashed`` is the only retryable one. ``metadata``: the
    adapter's training metadata when done; where it failed (phase, step) when it diverged."""

    status: Literal["done", "failed", "cancelled", "crashed"]
    reason: str = ""
    kind: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, limit: int = 3000) -> str:
    if not path.exists():
        return ""
    data = path.read_bytes()[-limit:]
    return data.decode(errors="replace")


async def run_worker(
    spec: dict[str, Any],
    *,
    on_progress: ProgressHandler | None = None,
    should_stop: StopCheck | None = None,
    poll_s: float = 2.0,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run one training job (``spec`` as :mod:`worker` reads it) to its end."""
    work = Path(spec["work_dir"])
    spec_path, log_path = await asyncio.to_thread(_prepare, work, spec)
    with open(log_path, "ab") as stderr:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.trainer.training.worker",
            str(spec_path),
            cwd=str(REPO_ROOT),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            preexec_fn=_die_with_parent,
            limit=1024 * 1024,
        )
    watcher = asyncio.create_task(_watch_stop(work, should_stop, poll_s)) if should_stop else None
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith(PROGRESS_PREFIX):
                continue
            try:
                event = json.loads(line[len(PROGRESS_PREFIX) :])
            except ValueError:
                continue
            if on_progress is not None:
                try:
                    await on_progress(event)
                except Exception:  # progress bookkeeping must not kill the training
                    log.exception("progress handler failed for %s", event.get("type"))
        code = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        await cancel_and_wait(watcher)
    return await asyncio.to_thread(_outcome, work, code, log_path)


def _prepare(work: Path, spec: dict[str, Any]) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    (work / STOP_FILE).unlink(missing_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    return spec_path, work / "worker.log"


async def _watch_stop(work: Path, should_stop: StopCheck, poll_s: float) -> None:
    while True:
        await asyncio.sleep(poll_s)
        try:
            if await should_stop():
                await asyncio.to_thread((work / STOP_FILE).touch)
                return
        except Exception as exc:  # a DB hiccup must not stop the training
            log.warning("cancellation check failed: %r", exc)


def _outcome(work: Path, code: int, log_path: Path) -> Outcome:
    result_path = work / "result.json"
    result: dict[str, Any] = {}
    if result_path.exists():
        with contextlib.suppress(ValueError):
            result = json.loads(result_path.read_text())
    status = result.get("status")
    if status == "done" and code == 0:
        return Outcome("done", metadata=result.get("metadata", {}), returncode=code)
    if status == "failed":
        detail = result.get("detail")
        return Outcome(
            "failed",
            reason=result.get("reason", ""),
            kind=result.get("kind", ""),
            metadata=detail if isinstance(detail, dict) else {},
            returncode=code,
        )
    if status == "cancelled" or code == EXIT_CANCELLED:
        return Outcome("cancelled", reason="cancelled on request", returncode=code)
    if code == -signal.SIGKILL:
        # Killed while its parent lives: on a training box that is the kernel's OOM killer.
        return Outcome(
            "failed",
            kind="oom",
            reason="the training worker was killed (SIGKILL), most likely out of memory",
            returncode=code,
        )
    return Outcome(
        "crashed",
        reason=f"training worker exited with {code}: {_tail(log_path, 1500)}",
        returncode=code,
    )
