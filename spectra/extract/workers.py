"""Worker processes that never outlive the process that started them.

A parallel command (``collapse-spectra extract STUDY --jobs N``) computes in a pool of ``spawn``-started
worker processes. If the command itself is killed (SIGKILL, the out-of-memory killer), nothing tells its
workers by default: they are reparented to PID 1 and compute on, unwatched, each holding its memory and
the lock of the cube it writes. So every worker arranges, as the first thing it does, to end with its
parent (:func:`exit_with_parent`, the pool's initializer):

- on Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` kills the worker the moment its parent
  dies. The parent may have died before that call took effect, so the worker then checks that its parent
  is still the process that started it. (The signal follows the parent *thread* that started the worker:
  :func:`worker_pool` starts them from the thread that submits the work and waits for it, in a ``with``.)
- elsewhere a daemon thread polls ``os.getppid()`` once a second and ends the worker when it changes.

A worker that ends this way leaves what a kill leaves: its cube's previous version and a temporary file
that the next extraction removes (docs/recovery.md).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` ``spawn``-started processes (no forked torch state) that die with this process."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent,
        initargs=(os.getpid(),),
    )


def exit_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid``, the process that started it, dies (see the module docstring).

    Parameters
    ----------
    parent_pid
        The pid of the parent as the parent saw it, passed from there: if the parent is already gone, this
        process's parent pid is no longer it, and the process ends at once.
    """
    if _kill_me_when_my_parent_dies():
        if os.getppid() != parent_pid:  # it died before prctl took effect: no signal will come
            os._exit(1)
        return
    threading.Thread(
        target=_exit_when_orphaned, args=(parent_pid,), name="exit-with-parent", daemon=True
    ).start()


def _kill_me_when_my_parent_dies() -> bool:
    """Ask Linux to send SIGKILL to this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def _exit_when_orphaned(parent_pid: int, poll_seconds: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    os._exit(1)
