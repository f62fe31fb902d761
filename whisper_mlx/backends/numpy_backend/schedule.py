"""Threads for the numpy backend: a worker pool for the kernels' blocks, one BLAS thread per worker,
and a background encoder that encodes windows on one core while the calling thread decodes.

numpy releases the GIL inside its kernels and the BLAS, so blocks of a window run in parallel on the
workers; each calls a single-threaded BLAS so that the threads do not oversubscribe the cores. Only numpy
arrays cross the threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

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
    """Within it, this thread's run_blocks runs its blocks itself (a background encoder on one core,
    beside the thread that decodes)."""
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


class BackgroundEncoder:
    """Encodes windows with the numpy encoder on a background thread, on one core, one window at a
    time, while the calling thread decodes one row on the other core. transcribe used it beside the
    opening window decoded alone; since lanes start with lead-ins no window is decoded alone, and
    transcribe no longer calls it (docs/experiments.md).

    The outputs are the same bits as the encoder's on the calling thread (test): which thread encoded
    a window never changes a transcript."""

    def __init__(self, encoder: Callable[[np.ndarray], np.ndarray], mels: dict):
        self._encoder = encoder
        self._mels = dict(mels)  # window key -> (frames, n_mels) float32, read before the thread starts
        self._waiting = list(mels)  # not started yet, in order
        self._results: dict[Hashable, Future[np.ndarray]] = {key: Future() for key in mels}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="whisper-mlx-encode-ahead", daemon=True)
        self._thread.start()

    def _next(self) -> tuple[Future, np.ndarray] | None:
        """The next window's future and mel, taken under the lock (the caller may withdraw the rest)."""
        with self._lock:
            if not self._waiting:
                return None
            key = self._waiting.pop(0)
            return self._results[key], self._mels.pop(key)

    def _run(self) -> None:
        try:
            blas.use_one_thread_here()
            with blocks_on_this_thread():
                while (work := self._next()) is not None:
                    future, mel = work
                    future.set_result(self._encoder(mel[None])[0])
        except BaseException as error:  # handed to whoever waits in result(): nothing waits forever
            with self._lock:
                self._waiting.clear()
                for future in self._results.values():
                    if not future.done():
                        future.set_exception(error)

    def withdraw(self, keys: list) -> list:
        """The keys among `keys` that this encoder has not started (or never had): the caller encodes
        them; the others come from result()."""
        with self._lock:
            taken = [key for key in keys if key in self._waiting or key not in self._results]
            self._waiting = [key for key in self._waiting if key not in taken]
            for key in taken:
                self._results.pop(key, None)
                self._mels.pop(key, None)
        return taken

    def result(self, key) -> np.ndarray:
        """The (n_audio_ctx, n_state) encoder output of a window it started, once it is done."""
        with self._lock:
            future = self._results[key]
        return future.result()

    def sharing_cores(self):
        """The caller's decoding beside this encoder keeps the BLAS libraries to one thread."""
        return one_blas_thread()

    def close(self) -> None:
        """Start nothing more (what was not started is cancelled) and wait for the window in progress."""
        with self._lock:
            for key in self._waiting:
                self._results[key].cancel()
            self._waiting.clear()
        self._thread.join()
