"""The numpy backend's buffer pool: a buffer is handed out again only once nothing but the pool holds
it (views of it count), the smallest idle one that fits is chosen, and trimming keeps idle buffers up
to the memory in use."""

import threading

import numpy as np

from whisper_mlx.backends.numpy_backend.buffers import BufferPool


def test_a_held_buffer_is_not_handed_out_twice():
    pool = BufferPool()
    first = pool.empty((4, 8))
    first[:] = 1
    second = pool.empty((4, 8))
    assert not np.shares_memory(first, second) and pool.held_bytes == 2 * 4 * 8 * 4
    derived = first[:2]  # a view made from the array keeps the buffer held
    del first
    third = pool.empty((4, 8))
    assert not np.shares_memory(third, derived) and not np.shares_memory(third, second)
    del derived
    fourth = pool.empty((2, 8))  # its buffer is idle again
    assert pool.held_bytes == 3 * 4 * 8 * 4 and not np.shares_memory(fourth, third)


def test_an_idle_buffer_is_reused_smallest_first_and_keeps_its_values():
    pool = BufferPool()
    big, small = pool.empty((100,)), pool.empty((10,))
    big[:], small[:] = 1.0, 2.0
    big_at, small_at = address(big), address(small)
    del big, small
    reused = pool.empty((5, 2))
    assert address(reused) == small_at and np.all(reused == 2.0)  # contents are undefined: the last values
    larger = pool.empty((50,))
    assert address(larger) == big_at and larger.shape == (50,)
    assert pool.held_bytes == 110 * 4


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_trim_keeps_idle_buffers_up_to_the_memory_in_use():
    pool = BufferPool()
    in_use = pool.empty((1000,))
    idle = [pool.empty((n,)) for n in (600, 300, 200)]
    del idle
    pool.trim(floor_bytes=0)  # idle 1100 floats against 1000 in use: the largest idle one goes
    assert pool.held_bytes == (1000 + 300 + 200) * 4
    pool.trim(floor_bytes=0)
    assert pool.held_bytes == (1000 + 300 + 200) * 4  # idle 500 <= 1000 in use
    del in_use
    pool.trim(floor_bytes=0)
    assert pool.held_bytes == 0


def test_threads_never_share_a_buffer():
    pool, errors = BufferPool(), []

    def worker(value: float) -> None:
        for _ in range(200):
            array = pool.empty((64,))
            array[:] = value
            if not np.all(array == value):
                errors.append(value)
            del array  # so that a thread holds none while it asks for the next

    threads = [threading.Thread(target=worker, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and pool.held_bytes <= 4 * 64 * 4
