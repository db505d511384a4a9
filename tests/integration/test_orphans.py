"""A SIGKILLed service leaves nothing running: its pool workers (and fork server) end with it,
and the supervisor clears whatever is left in the dead service's process group before it
restarts the service. Real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shared.supervisor import ROOT, Embedded, Supervised

pytestmark = pytest.mark.integration

# A stand-in for a service: a worker pool as ingest (forkserver) or the quantizer (spawn)
# makes it, with both workers started; prints their pids (and the fork server's); waits.
SERVICE = textwrap.dedent(
    """
    import json, multiprocessing.forkserver, sys, time
    from shared.procs import worker_pool

    method, plain = sys.argv[1], sys.argv[2] == "plain"
    if plain:  # what the services did before: no initializer
        import concurrent.futures, multiprocessing
        ctx = multiprocessing.get_context(method)
        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx)
    else:
        pool = worker_pool(2, method)
    for f in [pool.submit(time.sleep, 0.3) for _ in range(2)]:
        f.result()
    pids = list(pool._processes)
    if method == "forkserver":
        pids.append(multiprocessing.forkserver._forkserver._forkserver_pid)
    print(json.dumps(pids), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start_service(method: str, plain: bool) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE, method, "plain" if plain else "guarded"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the stand-in service printed nothing (exit {proc.poll()})"
    return proc, json.loads(line)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_pool_workers_end_with_their_killed_service(method: str) -> None:
    proc, pids = _start_service(method, plain=False)
    try:
        assert len(pids) == (3 if method == "forkserver" else 2)
        assert all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(pids, timeout_s=15) == [], "workers outlived their killed service"
    finally:
        proc.kill()
        _kill_all(pids)


def test_without_the_guard_workers_are_orphaned() -> None:
    """The control: a plain pool's workers outlive the service (what CI runs left behind)."""
    proc, pids = _start_service("spawn", plain=True)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(pids, timeout_s=2) == pids
    finally:
        proc.kill()
        _kill_all(pids)


def test_supervisor_clears_a_dead_services_process_group(tmp_path: Path) -> None:
    """A service that dies leaves a child in its process group: the supervisor kills it on
    noticing the death, before the restart (which then starts from a clean slate)."""
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "sys.exit(3)\n"
    )
    log = tmp_path / "svc.log"
    child = Supervised(
        name="svc",
        args=[sys.executable, "-c", script],
        env=dict(os.environ),
        log_path=log,
        http_port=0,
    )
    sup = Embedded(home=tmp_path, services=[])
    sup.children = [child]
    child.start()
    assert child.proc is not None
    assert child.proc.wait(30) == 3
    grandchild = int(log.read_text().split()[0])
    try:
        assert _alive(grandchild)  # still running after its service died
        notes = sup.supervise_once()
        assert any("svc exited with code 3" in n for n in notes), notes
        assert _wait_gone([grandchild], timeout_s=10) == []
    finally:
        _kill_all([grandchild])
