"""shared.procs.steady_heap: freed buffers are reused, not faulted in again (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Three 4 MiB buffers made and freed in a loop, as ingest's chunks come and go: by default
# glibc gives the freed 12 MiB back to the kernel each time (more than twice the dynamic mmap
# threshold), and the next round faults it in again.
_PROBE = r"""
import sys
from pathlib import Path
from shared.procs import steady_heap

def faults():
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])

steady = sys.argv[1] == "1"
if steady:
    assert steady_heap()
for _ in range(3):
    bufs = [bytes(4 << 20) for _ in range(3)]
    del bufs
before = faults()
for _ in range(20):
    bufs = [bytes(4 << 20) for _ in range(3)]
    del bufs
print(faults() - before)
"""


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


glibc_linux = pytest.mark.skipif(not _glibc(), reason="glibc on Linux only (mallopt, /proc)")


def _faults(steady: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if steady else "0"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))),
    )
    return int(out.stdout)


@glibc_linux
def test_freed_buffers_are_reused_without_page_faults() -> None:
    default, steady = _faults(False), _faults(True)
    # The control: without it, the loop pays fresh pages (20 rounds of 12 MiB).
    assert default > 500, f"the default allocator did not fault ({default}): probe is moot"
    assert steady < 50, f"{steady} page faults with a steady heap (default: {default})"


def test_steady_heap_is_harmless_where_it_cannot_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import procs

    def no_confstr(name: str) -> str:
        raise ValueError(name)

    monkeypatch.setattr(procs.os, "confstr", no_confstr)
    assert procs.steady_heap() is False
