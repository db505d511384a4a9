"""Failpoints: named places where a process can be made to crash on purpose.

Fault injection for the chaos tier and for anyone who wants to see what a crash at the worst
moment does (the idea of FreeBSD's fail(9) and TiKV's fail-rs). Off unless
``TUNELOOP_FAILPOINTS`` names some, comma-separated::

    TUNELOOP_FAILPOINTS="trainer.DatasetReady.working@3,quantizer.TrainingDone.handled"

A named failpoint SIGKILLs its own process when it is reached (the N-th time with ``@N``):
no cleanup, no ``finally``, exactly what a preempted VM or an OOM kill does. Each fires once
per ``$TUNELOOP_HOME`` (a marker file under ``failpoints/`` records it), so the restarted
process carries on and the test can see that the crash happened.

Failpoints in the shared runtime (so every service has them):

``<service>.<Event>.working``
    each heartbeat while a handler works on ``<Event>`` (mid-work: training, engine start...)
``<service>.<Event>.handled``
    the handler finished and committed, the message is not yet acknowledged
``<service>.outbox.published``
    an event was published by the outbox relay, its row not yet marked published
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)
ENV = "TUNELOOP_FAILPOINTS"
_hits: Counter[str] = Counter()


def armed() -> dict[str, int]:
    """The failpoints this process was asked for: name → the hit that fires it."""
    spec = os.environ.get(ENV, "")
    points: dict[str, int] = {}
    for item in spec.split(","):
        name, _, nth = item.strip().partition("@")
        if name:
            points[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return points


def marker_dir(home: Path | None = None) -> Path:
    return (home or Path(os.environ.get("TUNELOOP_HOME", ".tuneloop"))) / "failpoints"


def fired(home: Path | None = None) -> list[str]:
    """Names of the failpoints that have fired under ``home`` (default ``$TUNELOOP_HOME``)."""
    directory = marker_dir(home)
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def hit(name: str) -> None:
    """Reached ``name``: crash here if it is armed, due, and has not fired yet."""
    if ENV not in os.environ:
        return
    nth = armed().get(name)
    if nth is None:
        return
    _hits[name] += 1
    if _hits[name] < nth:
        return
    directory = marker_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(fd, f"pid={os.getpid()} at={time.time():.3f} hit={_hits[name]}\n".encode())
    os.fsync(fd)
    os.close(fd)
    log.warning("failpoint %s reached: SIGKILL pid %d", name, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
