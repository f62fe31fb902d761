"""Reused float32 buffers for the decoder's per-batch caches: the numpy backend's counterpart of MLX's
buffer cache.

A batch's self- and cross-attention caches are ~100-300 MB (tiny.en, 6 windows with 5 beams each).
Memory fresh from the kernel costs a page fault per page on first touch, far more on VMs that hand
free pages back to their host, and glibc returns blocks this large to the kernel when they are freed:
every batch would pay those faults again. The pool keeps the buffers, and hands one out again once
nothing but the pool holds it (arrays and views made from it keep it held).
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

# Idle buffers are kept up to the memory in use, and at least this much: between batches nothing is in
# use, and a batch of tiny.en windows with 5 beams each needs ~300-500 MB of caches.
FREE_FLOOR_BYTES = 1 << 30


def _reference_counts(buffers: list[np.ndarray]) -> list[int]:
    """Each buffer's reference count, read the same way for the calibration and for every check (what
    the interpreter adds for the loop and the call then cancels out)."""
    return [sys.getrefcount(buffer) for buffer in buffers]


class BufferPool:
    """float32 buffers, each handed out as one array (a view of it) at a time; thread-safe."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        (self._idle_count,) = _reference_counts([np.empty(1, np.float32)])  # held by the list alone

    def _idle(self) -> list[np.ndarray]:
        counts = _reference_counts(self._buffers)
        return [buffer for buffer, count in zip(self._buffers, counts) if count <= self._idle_count]

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of `shape` whose contents are undefined: a view of the smallest idle buffer
        that holds it (it keeps an earlier array's values), else of a new zeroed buffer."""
        size = math.prod(shape)
        with self._lock:
            fitting = [buffer for buffer in self._idle() if buffer.size >= size]
            if fitting:
                buffer = min(fitting, key=lambda b: b.size)
            else:
                buffer = np.zeros(size, np.float32)
                self._buffers.append(buffer)
            return buffer[:size].reshape(shape)

    def trim(self, floor_bytes: int = FREE_FLOOR_BYTES) -> None:
        """Between batches: drop idle buffers, largest first, while they hold more than the buffers in
        use and more than floor_bytes."""
        with self._lock:
            idle = sorted(self._idle(), key=lambda b: b.nbytes, reverse=True)
            idle_bytes = sum(b.nbytes for b in idle)
            used_bytes = sum(b.nbytes for b in self._buffers) - idle_bytes
            for buffer in idle:
                if idle_bytes <= max(used_bytes, floor_bytes):
                    break
                self._buffers = [b for b in self._buffers if b is not buffer]
                idle_bytes -= buffer.nbytes

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._buffers)
