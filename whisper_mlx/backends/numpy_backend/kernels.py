"""numpy kernels of the numpy backend: the encoder's attention, GELU and MLP, and the decoder's attention
(prompts, steps, cross-attention).

numpy's ufuncs are SIMD-vectorised where MLX's CPU elementwise kernels are scalar. The work is cut into
blocks small enough to stay in the L2 cache and spread over the worker threads (schedule.py), each block
calling a single-threaded BLAS (docs/performance.md has the measurements).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from . import blas, panels
from .schedule import run_blocks, worker_count, workers

ATTENTION_BLOCK_ROWS = 256  # query rows per block: 256 x 1500 float32 scores = 1.5 MB
GELU_BLOCK_ELEMENTS = 1 << 16  # 256 KB of float32 per block


def _blocks(length: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, length, size)]


SOFTMAX_UNSHIFTED_MAX = 60.0  # exp(60) ~ 1e26: sums of 1500 such terms stay far below float32's 3.4e38


def _shift_rows(scores: np.ndarray, q: np.ndarray, key_norm: float | None) -> None:
    """Subtract its largest score from each row that needs it before exp (see _attend_block).

    With key_norm (the largest key norm, no mask) a row whose scores are bounded, |q·k| <= |q| key_norm
    < SOFTMAX_UNSHIFTED_MAX, needs no max at all (every tiny.en encoder row is)."""
    unsure = True
    if key_norm is not None:
        unsure = np.sqrt(np.square(q).sum(axis=-1, keepdims=True)) * np.float32(key_norm) >= SOFTMAX_UNSHIFTED_MAX
        if not unsure.any():
            return
    top = scores.max(axis=-1, keepdims=True)
    shifted = unsure & ((top < 0) | (top >= SOFTMAX_UNSHIFTED_MAX))  # decided per row: a row's result
    if shifted.any():  # never depends on the rows computed with it
        scores -= np.where(shifted, top, np.float32(0))


def _attend_block(
    q: np.ndarray,
    keys_t: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    mask: np.ndarray | None = None,
    key_norm: float | None = None,
) -> None:
    """out = softmax(q keys_t + mask) v, for one block or a stack of blocks.

    A row whose largest score is in [0, SOFTMAX_UNSHIFTED_MAX), or whose scores are bounded below it
    in magnitude (key_norm), goes to exp unshifted (softmax is shift-invariant; no overflow, and no
    exponent low enough for a denormal): when all rows are, one pass fewer. When v is wider than out,
    its column out.shape[-1] is ones (the encoder's values, see `attention`): the product with it gives
    each row's sum too, no summing pass. A block's products and exp go to MKL when it is preloaded
    (host_blas)."""
    scores = blas.matmul(q, keys_t)
    if mask is not None:
        scores += mask
    _shift_rows(scores, q, None if mask is not None else key_norm)
    blas.exp_into(scores, scores)
    width = out.shape[-1]
    if v.shape[-1] > width:  # column `width` of v is ones (further columns: zeros, see `attention`)
        weighted = blas.matmul(scores, v)
        np.divide(weighted[..., :width], weighted[..., width : width + 1], out=out)
        return
    total = scores.sum(axis=-1, keepdims=True)
    blas.matmul(scores, v, out=out)
    out /= total


# the values are zero-padded to a multiple of this width: MKL's products with such widths run faster
VALUE_WIDTH_MULTIPLE = 16


def _padded(width: int) -> int:
    return -(-width // VALUE_WIDTH_MULTIPLE) * VALUE_WIDTH_MULTIPLE


def _summing_values(v: np.ndarray) -> np.ndarray:
    """Values (S, D) followed by a column of ones (each softmax row's sum comes out of the product)
    and zero columns up to a multiple of VALUE_WIDTH_MULTIPLE."""
    head_dim = v.shape[-1]
    values = np.zeros((v.shape[0], _padded(head_dim + 1)), np.float32)
    values[:, :head_dim] = v
    values[:, head_dim] = 1
    return values


def _largest_norm(keys_t: np.ndarray) -> float:
    """The largest norm among the columns of keys_t (D, S): with a query's norm, a bound on its scores."""
    return float(np.sqrt(np.square(keys_t).sum(axis=0).max(initial=0)))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_head: int) -> np.ndarray:
    """Unmasked softmax(q kᵀ / √d) v on (B, L, n_head * d) float32 arrays with heads side by side
    (the layout of the projections), returned in the same layout."""
    batch, length, width = q.shape
    head_dim = width // n_head
    q = q * np.float32(head_dim**-0.5)
    k = np.ascontiguousarray(k)
    out = np.empty_like(q)
    tasks = []
    for b in range(batch):
        for h in range(n_head):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            keys_t = np.ascontiguousarray(k[b, :, cols]).T
            value, key_norm = _summing_values(v[b, :, cols]), _largest_norm(keys_t)
            for rows in _blocks(length, ATTENTION_BLOCK_ROWS):
                tasks.append(
                    partial(_attend_block, q[b, rows, cols], keys_t, value, out[b, rows, cols], key_norm=key_norm)
                )
    run_blocks(tasks)
    return out


def _attend_head(q: np.ndarray, keys_t: np.ndarray, v: np.ndarray, out: np.ndarray, mask: np.ndarray | None) -> None:
    """One head of _attend_heads, its rows in blocks: the values get their summing column once."""
    values, key_norm = _summing_values(v), None if mask is not None else _largest_norm(keys_t)
    for rows in _blocks(q.shape[0], ATTENTION_BLOCK_ROWS):
        _attend_block(q[rows], keys_t, values, out[rows], None if mask is None else mask[rows], key_norm)


def _attend_heads(q: np.ndarray, keys_t: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """softmax(q keys_t + mask) v on scaled (B, H, L, D) queries, (B, H, D, S) keys, (B, H, S, D)
    values and a (1 or B, 1, L, S) mask, one task per head (a prompt's prefill), with the summing
    column."""
    batch, n_head = q.shape[:2]
    out = np.empty(q.shape, np.float32)
    run_blocks(
        [
            partial(
                _attend_head,
                q[b, h],
                keys_t[b, h],
                v[b, h],
                out[b, h],
                None if mask is None else mask[min(b, mask.shape[0] - 1), 0],
            )
            for b in range(batch)
            for h in range(n_head)
        ]
    )
    return out


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """softmax(q kᵀ / √d + mask) v on (B, H, L, D) queries and (B, H, S, D) keys/values, with an
    additive mask of shape (1 or B, 1, L, S): the decoder's self-attention over a prompt, in
    cache-sized blocks over the workers (MLX's softmax on the CPU is scalar and single-threaded)."""
    return _attend_heads(q * np.float32(q.shape[-1] ** -0.5), k.swapaxes(-1, -2), v, mask)


def cross_attention(q: np.ndarray, scaled_keys_t: np.ndarray, values: np.ndarray) -> np.ndarray:
    """softmax(q kᵀ) v of the decoder's new tokens over a window's audio frames: q (B, H, L, D), keys
    pre-scaled and transposed (B, H, D, T), values (B, H, T, D) -> (B, H, L, D). A decoding step
    (L = 1) goes to `attend`. A prompt's first step (L up to ~225) is split into cache-sized blocks
    over the workers, as the encoder's attention is."""
    if q.shape[2] > 1:
        return _attend_heads(q, scaled_keys_t, values, None)
    return attend(q, scaled_keys_t, values)


# A step's attention is memory-bound and two cores stream more than one: from this many rows, half go to a worker.
STEP_SPLIT_MIN_ROWS = 3


def attend(q: np.ndarray, keys_t: np.ndarray, values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(q keys_t + mask) values over stacks (B, H, L, D), (B, H, D, S), (B, H, S, D) and a
    (1 or B, 1, L, S) mask: a decoding step's attention, memory-bound. Through the C kernel where it can
    read the arrays in place (panels.StepAttention), else numpy's and the BLAS's calls. From
    STEP_SPLIT_MIN_ROWS rows, half of the rows go to a worker (each row's result is the same either way;
    the BLAS calls, 1 x 64 x 1500, stay below OpenBLAS's threading threshold)."""
    kernel = panels.StepAttention.of(q, keys_t, values, mask)
    if kernel is not None:
        n_head = q.shape[1]
        _over_row_halves(lambda first, last: kernel(first * n_head, last * n_head), q.shape[0])
        return kernel.out
    out = np.empty(q.shape, np.float32)

    def rows(first: int, last: int) -> None:
        part = slice(first, last)
        _attend_block(
            q[part], keys_t[part], values[part], out[part], mask if mask is None or mask.shape[0] == 1 else mask[part]
        )

    _over_row_halves(rows, q.shape[0])
    return out


def _over_row_halves(run: Callable[[int, int], object], rows: int) -> None:
    """run(first, last) over rows [0, rows): from STEP_SPLIT_MIN_ROWS rows, the second half on a worker."""
    if rows < STEP_SPLIT_MIN_ROWS or worker_count() < 2:
        run(0, rows)
        return
    half = rows // 2
    other = workers().submit(run, half, rows)
    run(0, half)
    other.result()


def _values_by_head(audio: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """out (H, T, D) = the value projection of one window (T, width), its heads split."""
    projected = audio @ weight.T
    if bias is not None:
        projected += bias
    n_head, frames, head_dim = out.shape
    out[...] = projected.reshape(frames, n_head, head_dim).transpose(1, 0, 2)


def cross_keys_values(
    audio: np.ndarray,
    key_weight: np.ndarray,
    value_weight: np.ndarray,
    value_bias: np.ndarray | None,
    n_head: int,
    empty: Callable[[tuple[int, ...]], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """A decoder layer's cross-attention cache of encoded windows (B, T, width), in the layouts the
    decoding steps read: keys scaled by 1/√d and transposed (B, H, D, T), which one product per window
    writes directly ((H·D, T) is that layout), and values (B, H, T, D), one product per window and a
    copy that splits the heads (faster than one narrow product per head). empty(shape) makes the
    float32 outputs."""
    batch, frames, width = audio.shape
    head_dim = width // n_head
    key_weight = key_weight * np.float32(head_dim**-0.5)
    keys_t = empty((batch, n_head, head_dim, frames))
    values = empty((batch, n_head, frames, head_dim))
    tasks = []
    for b in range(batch):
        tasks.append(partial(np.matmul, key_weight, audio[b].T, out=keys_t[b].reshape(width, frames)))
        tasks.append(partial(_values_by_head, audio[b], value_weight, value_bias, values[b]))
    run_blocks(tasks)
    return keys_t, values


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-z²), t = 1 / (1 + p z), z >= 0,
# absolute error <= 1.5e-7 (below float32 resolution of the GELU output).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


# Φ's inputs are clamped at -GELU_CLAMP so that no output is a denormal, which would slow the next matrix product.
GELU_CLAMP = 10.0


def _gelu_block(x: np.ndarray, out: np.ndarray) -> None:
    """out = x Φ(x) = 0.5 x (1 + erf(x / √2)); out must not alias x. With MKL, its vector Φ; else
    with tail = t·poly·exp(-z²), 1 + erf is 2 - tail for x >= 0 and tail for x < 0 (no 1 - erf
    cancellation near zero output)."""
    if x.flags.c_contiguous and out.flags.c_contiguous and blas.has_normal_cdf():
        np.maximum(x, -GELU_CLAMP, out=out)
        blas.normal_cdf_into(out, out)
        out *= x
        return
    z = np.abs(x)
    np.minimum(z, GELU_CLAMP, out=z)
    z *= np.float32(1 / math.sqrt(2))
    t = z * np.float32(_ERF_P)
    t += 1
    np.reciprocal(t, out=t)
    tail = t * np.float32(_ERF_A[-1])
    for coefficient in reversed(_ERF_A[:-1]):
        tail += np.float32(coefficient)
        tail *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    tail *= z
    np.multiply(x, np.float32(0.5), out=out)
    out *= tail
    np.subtract(x, out, out=out, where=x >= 0)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU of a float32 array, blockwise over the worker threads."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty_like(flat)
    tasks = [
        partial(_gelu_block, flat[i : i + GELU_BLOCK_ELEMENTS], out[i : i + GELU_BLOCK_ELEMENTS])
        for i in range(0, flat.size, GELU_BLOCK_ELEMENTS)
    ]
    run_blocks(tasks)
    return out.reshape(x.shape)


MLP_BLOCK_ROWS = 256  # 256 x 1536 float32 hidden activations = 1.5 MB (twice: before/after GELU)


def _mlp_block(x, w1, b1, w2, b2, out) -> None:
    hidden = blas.matmul(x, w1.T)
    hidden += b1
    activated = np.empty_like(hidden)  # _gelu_block reads its input after writing its output
    _gelu_block(hidden, activated)
    blas.matmul(activated, w2.T, out=out)
    out += b2


def mlp(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """gelu(x w1ᵀ + b1) w2ᵀ + b2 over (..., n_state) rows, blockwise: each block's (rows, 4 n_state)
    hidden activations stay in cache between the two matmuls and the GELU."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], w2.shape[0]), np.float32)
    tasks = [
        partial(_mlp_block, rows[i : i + MLP_BLOCK_ROWS], w1, b1, w2, b2, out[i : i + MLP_BLOCK_ROWS])
        for i in range(0, rows.shape[0], MLP_BLOCK_ROWS)
    ]
    run_blocks(tasks)
    return out.reshape(*x.shape[:-1], w2.shape[0])
