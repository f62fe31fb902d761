"""Counter-based random numbers for temperature sampling: each row's draws are a pure function of its
key, the step and the vocabulary column, so a sampled window gives the same tokens whatever else shares
its batch, whether finished rows were dropped, and in every run with the same seed.

Written once for numpy and MLX arrays (uint32 arithmetic wraps the same way in both); samples are the
Gumbel-max trick, argmax(logits / T + Gumbel noise), an exact draw from softmax(logits / T).
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import numpy as np

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters over the whole word


def array_module(x):
    """numpy for numpy arrays, else mlx.core: the decoding code is written once for both."""
    return np if isinstance(x, np.ndarray) else mx


def mix32(x):
    """A uint32 -> uint32 bijection with good avalanche (Wellons' lowbias32), elementwise."""
    xp = array_module(x)
    x = x ^ (x >> 16)
    x = x * xp.array(0x7FEB352D, dtype=xp.uint32)
    x = x ^ (x >> 15)
    x = x * xp.array(0x846CA68B, dtype=xp.uint32)
    return x ^ (x >> 16)


def derive_key(*parts: int) -> int:
    """One 32-bit key from integers (any size, any sign): a seed, a window's position, a candidate."""
    key = np.array([0], np.uint32)
    for part in parts:
        for word in _words(int(part)):
            key = mix32(key ^ np.uint32(word) ^ np.uint32(GOLDEN32))
    return int(key[0])


def _words(value: int) -> Iterable[int]:
    """The 32-bit words of an integer, low first, with its sign as a last word."""
    magnitude = abs(value)
    while True:
        yield magnitude & MASK32
        magnitude >>= 32
        if not magnitude:
            break
    yield 1 if value < 0 else 0


def random_keys(count: int) -> np.ndarray:
    """Keys drawn from MLX's generator (so `mx.random.seed` fixes them), for callers that give none."""
    return np.array(mx.random.randint(0, 2**31 - 1, (count,)), dtype=np.uint32)


def uniform(row_keys, step: int, width: int):
    """Uniform numbers in (0, 1), (rows, width) float32: column c of a row from (its key, step, c)."""
    xp = array_module(row_keys)
    step_keys = mix32(row_keys ^ xp.array((step * GOLDEN32) & MASK32, dtype=xp.uint32))
    columns = xp.arange(width, dtype=xp.uint32) * xp.array(GOLDEN32, dtype=xp.uint32)
    bits = mix32(mix32(columns[None, :] ^ step_keys[:, None]))
    # 23 bits and a half step: every value and 1 - 2^-24 are exact in float32, so 0 and 1 (whose logs are
    # infinite) never occur
    return ((bits >> 9).astype(xp.float32) + 0.5) * (1.0 / (1 << 23))


def gumbel_sample(logits, temperature: float, row_keys, step: int):
    """One token per row of logits (B, V), drawn from softmax(logits / temperature), as int32."""
    xp = array_module(logits)
    noise = -xp.log(-xp.log(uniform(row_keys, step, logits.shape[-1])))
    return xp.argmax(logits / temperature + noise, axis=-1).astype(xp.int32)
