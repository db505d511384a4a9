"""Failpoints: off by default; an armed one SIGKILLs its process once, at the N-th hit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from shared import failpoints

SCRIPT = """
import sys
from shared import failpoints
for i in range(1, 6):
    print(i, flush=True)
    failpoints.hit("svc.Event.working")
print("done", flush=True)
"""


def run(home: Path, spec: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    env["TUNELOOP_HOME"] = str(home)
    if spec is not None:
        env[failpoints.ENV] = spec
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )


def test_unarmed_failpoints_do_nothing(tmp_path: Path) -> None:
    assert run(tmp_path, None).stdout.split() == ["1", "2", "3", "4", "5", "done"]
    assert run(tmp_path, "other.point").returncode == 0
    assert not (tmp_path / "failpoints").exists()


def test_an_armed_failpoint_kills_at_the_nth_hit_once_per_home(tmp_path: Path) -> None:
    first = run(tmp_path, "svc.Event.working@3, other")
    assert first.returncode == -signal.SIGKILL
    assert first.stdout.split() == ["1", "2", "3"]
    assert (tmp_path / "failpoints" / "svc.Event.working").read_text().startswith("pid=")
    # The restarted process carries on: the failpoint has fired for this home.
    again = run(tmp_path, "svc.Event.working@3")
    assert again.returncode == 0 and again.stdout.split()[-1] == "done"


def test_armed_parses_names_and_counts(monkeypatch) -> None:
    monkeypatch.setenv(failpoints.ENV, "a@2, b ,c@0,,d@x")
    assert failpoints.armed() == {"a": 2, "b": 1, "c": 1, "d": 1}
