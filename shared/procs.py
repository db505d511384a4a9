"""Worker processes that do not outlive the service that started them.

A ``ProcessPoolExecutor`` worker waits on its call queue, and it holds both ends of that queue
itself, so when its service is SIGKILLed (OOM killer, a preempted node, a crash test) it
waits forever: an orphan holding the memory of whatever it loaded (the quantizer's worker:
torch and a model, ~750 MB). With the ``forkserver`` method it is worse: every worker also
holds the fork server's liveness pipe, so the fork server stays too. The supervisor restarts
the service, and each crash leaves one more set behind.

``exit_with_parent`` is a pool initializer that ends the worker as soon as its parent dies.
It waits on ``multiprocessing.parent_process().sentinel``, which becomes ready when the
parent's end of the launch pipe is closed, and the kernel closes it when the parent dies.
This works for both ``spawn`` and ``forkserver`` workers, whose parent in that sense is the
service and not the fork server.

``steady_heap`` keeps glibc's allocator from handing freed memory back to the kernel after
every large buffer, for processes that allocate and free many-megabyte buffers in a loop
(ingest's chunks): each give-back is paid again in page faults on the next buffer.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext

ORPHAN_EXIT_CODE = 70  # what a worker exits with when its parent is gone

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
STEADY_TRIM_THRESHOLD = 128 << 20


def steady_heap() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the kernel
    and faulting it in again (glibc only; False, and nothing changed, elsewhere).

    glibc serves an allocation of 128 KiB or more with its own ``mmap`` and returns the
    heap's free top to the kernel once it passes twice that, both thresholds moving with
    what the process frees. Ingest allocates and frees buffers of several megabytes per
    chunk (a block read, the C pass's output, a chunk file read back), so each chunk paid
    for fresh zeroed pages: ~50,000 page faults per run of the bench corpus, ~15 % of all
    CPU time. Here buffers up to 32 MiB come from the heap, and the heap keeps up to 128
    MiB of free memory before it is trimmed: ~900-1,700 faults per run. The price is memory
    held after a large job, bounded by that 128 MiB per process."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr, or not this name: not glibc
        glibc = None
    if not glibc:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done: bool = mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD) == 1
    done = mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD) == 1 and done
    if not done:
        log.warning("mallopt refused the steady-heap thresholds; allocator defaults kept")
    return done


def exit_with_parent() -> None:
    """Pool initializer: end this worker process when its parent process dies."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(ORPHAN_EXIT_CODE)  # no cleanup: the parent that would want it is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(steady: bool) -> None:
    exit_with_parent()
    if steady:
        steady_heap()


def worker_pool(workers: int, method: str, *, steady: bool = False) -> ProcessPoolExecutor:
    """A process pool whose workers end with the process that made it (and, with
    ``steady``, keep the memory they free: :func:`steady_heap`)."""
    context: BaseContext = multiprocessing.get_context(method)
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(steady,)
    )
