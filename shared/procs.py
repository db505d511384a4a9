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
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext

ORPHAN_EXIT_CODE = 70  # what a worker exits with when its parent is gone


def exit_with_parent() -> None:
    """Pool initializer: end this worker process when its parent process dies."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(ORPHAN_EXIT_CODE)  # no cleanup: the parent that would want it is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_pool(workers: int, method: str) -> ProcessPoolExecutor:
    """A process pool whose workers end with the process that made it."""
    context: BaseContext = multiprocessing.get_context(method)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent)
