"""Threads for the numpy backend: a worker pool for the kernels' blocks, one BLAS thread per worker;
whole tasks (encoder windows) on one worker each.

numpy releases the GIL inside its kernels and the BLAS, so blocks of a window run in parallel on the
workers; each calls a single-threaded BLAS so that the threads do not oversubscribe the cores. Only numpy
arrays cross the threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from . import blas

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_limiter = None


def worker_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def workers() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child has none of the parent's threads
            _pool = ThreadPoolExecutor(
                worker_count(), thread_name_prefix="whisper-mlx-cpu", initializer=blas.use_one_thread_here
            )
            _pool_pid = os.getpid()
        return _pool


def _blas_limiter():
    """threadpoolctl's handle on the loaded BLAS libraries, or None without threadpoolctl."""
    global _limiter
    with _lock:
        if _limiter is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                _limiter = False
            else:
                _limiter = ThreadpoolController().select(user_api="blas") or False
        return _limiter or None


def one_blas_thread():
    """A context in which the loaded BLAS libraries (numpy's, the preloaded one) use one thread."""
    limiter = _blas_limiter()
    return contextlib.nullcontext() if limiter is None else limiter.limit(limits=1)


_this_thread = threading.local()


@contextlib.contextmanager
def blocks_on_this_thread():
    """Within it, this thread's run_blocks runs its blocks itself (a whole task on one worker)."""
    _this_thread.inline = True
    try:
        yield
    finally:
        _this_thread.inline = False


def _in_caller(tasks: list) -> bool:
    """Whether tasks run in the calling thread: threads cannot help, or this thread runs its own."""
    return len(tasks) < 2 or worker_count() < 2 or getattr(_this_thread, "inline", False) or _blas_limiter() is None


def run_blocks(tasks: list) -> None:
    """Run callables on the worker threads (in the calling thread when threads cannot help)."""
    if _in_caller(tasks):
        for task in tasks:
            task()
        return
    # each block is small: one BLAS thread per worker (MLX is idle meanwhile: its inputs were evaluated)
    with one_blas_thread():
        for future in [workers().submit(task) for task in tasks]:
            future.result()


def run_whole(tasks: list) -> list:
    """The results of independent tasks, each run whole on one worker thread (its own blocks run
    inline there, on one BLAS thread): for work, such as an encoder window, whose blocks share two
    cores less well than whole tasks do. Each block is computed as run_blocks would compute it, so
    the results are the same bits."""
    if _in_caller(tasks):
        return [task() for task in tasks]

    def whole(task):
        with blocks_on_this_thread():
            return task()

    with one_blas_thread():
        futures = [workers().submit(whole, task) for task in tasks]
        return [future.result() for future in futures]
