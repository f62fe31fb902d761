"""The Whisper model in numpy: the audio encoder and the text decoder of the numpy backend.

The encoder is numpy from the mel on: the convolutions as matrix products of shifted views, one fused
Q/K/V product, the blocked threaded kernels of kernels.py, numpy layer norms. One decoding step is a few
BLAS calls on the calling thread over views of the model's own weights (zero-copy, except the fused
Q/K/V projection). The decoder state is a preallocated self-attention cache written in place, the
cross-attention keys/values computed once per window in the layouts the steps read, and each row's left
padding.

The weights are views of an MLX model's float32 parameters; MLX itself computes nothing here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import cast, overload

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...whisper import decoder_mask, merge_heads, split_heads  # written to serve numpy arrays as well
from . import blas, kernels, panels
from .buffers import BufferPool
from .schedule import run_blocks, run_whole, worker_count


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = np.square(centered).mean(axis=-1, keepdims=True)
    centered *= 1 / np.sqrt(variance + np.float32(eps))
    centered *= weight
    centered += bias
    return centered


def affine(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x Wᵀ + b with W as nn.Linear stores it, (out, in): the BLAS reads the transposed view."""
    out = blas.matmul(x.reshape(-1, x.shape[-1]), weight.T).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        out += bias
    return out


@overload
def _np(array: mx.array) -> np.ndarray: ...
@overload
def _np(array: None) -> None: ...
def _np(array: mx.array | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array)


@dataclass(frozen=True)
class HostLinear:
    weight: np.ndarray  # (out, in), a view of the MLX parameter
    bias: np.ndarray | None

    @classmethod
    def of(cls, layer: nn.Linear) -> HostLinear:
        return cls(_np(layer.weight), _np(layer.bias) if "bias" in layer else None)

    @cached_property
    def panel_weights(self) -> panels.PanelWeights | None:
        """The weights in panels for a decoding step's few rows, made on first use (None without the kernel)."""
        return panels.PanelWeights(self.weight) if panels.available() else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = x.size // x.shape[-1]
        if rows <= panels.MAX_ROWS and self.panel_weights is not None:
            out = self.panel_weights.matmul(x.reshape(rows, x.shape[-1]), self.bias)
            return out.reshape(*x.shape[:-1], self.weight.shape[0])
        return affine(x, self.weight, self.bias)


@dataclass(frozen=True)
class HostNorm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> HostNorm:
        return cls(_np(norm.weight), _np(norm.bias), norm.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class HostMLP:
    """A block's layer norm and MLP: the rows of a prompt or a window in blocks over the workers
    (kernels.mlp), a step's few rows through MKL's products (blas.py)."""

    ln: HostNorm
    mlp1: HostLinear
    mlp2: HostLinear

    @classmethod
    def of(cls, block) -> HostMLP:
        return cls(HostNorm.of(block.mlp_ln), HostLinear.of(block.mlp1), HostLinear.of(block.mlp2))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        hidden = self.ln(x)
        if hidden.shape[0] * hidden.shape[1] > kernels.MLP_BLOCK_ROWS:
            b1, b2 = cast(np.ndarray, self.mlp1.bias), cast(np.ndarray, self.mlp2.bias)  # MLP layers have biases
            return kernels.mlp(hidden, self.mlp1.weight, b1, self.mlp2.weight, b2)
        return self.mlp2(kernels.gelu(self.mlp1(hidden)))


def fused_qkv(attn) -> HostLinear:
    """The query, key and value projections stacked into one (3 n_state, n_state) projection (the key
    has no bias: zeros)."""
    width = attn.query.weight.shape[0]
    biases = [_np(attn.query.bias), np.zeros(width, np.float32), _np(attn.value.bias)]
    return HostLinear(
        np.concatenate([_np(attn.query.weight), _np(attn.key.weight), _np(attn.value.weight)]), np.concatenate(biases)
    )


def parameter_arrays(module) -> list[mx.array]:
    return [array for _, array in cast(list[tuple[str, mx.array]], tree_flatten(module.parameters()))]


@dataclass(frozen=True)
class HostLayer:
    """One decoder block's weights as numpy views (Q/K/V fused into one projection)."""

    n_head: int
    attn_ln: HostNorm
    qkv: HostLinear  # query, key and value projections stacked: (3 n_state, n_state)
    attn_out: HostLinear
    cross_ln: HostNorm
    cross_query: HostLinear
    cross_out: HostLinear
    cross_key_weight: np.ndarray
    cross_value: HostLinear
    mlp: HostMLP

    @classmethod
    def of(cls, block) -> HostLayer:
        attn, cross = block.attn, block.cross_attn
        return cls(
            attn.n_head,
            HostNorm.of(block.attn_ln),
            fused_qkv(attn),
            HostLinear.of(attn.out),
            HostNorm.of(block.cross_attn_ln),
            HostLinear.of(cross.query),
            HostLinear.of(cross.out),
            _np(cross.key.weight),
            HostLinear.of(cross.value),
            HostMLP.of(block),
        )

    def cross_cache(self, audio: np.ndarray, pool: BufferPool) -> tuple[np.ndarray, np.ndarray]:
        """(keys scaled and transposed (B, H, D, T), values (B, H, T, D)) of encoded windows."""
        return kernels.cross_keys_values(
            audio, self.cross_key_weight, self.cross_value.weight, self.cross_value.bias, self.n_head, pool.empty
        )

    def __call__(
        self, x: np.ndarray, state: HostDecoderState, index: int, mask: np.ndarray | None, keep: list[int] | None = None
    ):
        """The block over new tokens x (B, L, n_state); every position writes its keys/values, and with
        `keep` only those positions go on (attention outputs, cross-attention, MLP)."""
        attended = self.self_attention(self.attn_ln(x), state, index, mask, keep)
        x = (x if keep is None else x[:, keep]) + attended
        query = split_heads(self.cross_query(self.cross_ln(x)), self.n_head)
        x = x + self.cross_out(merge_heads(cross_attention(query, *state.cross_kv[index])))
        return x + self.mlp(x)

    def self_attention(
        self, x: np.ndarray, state: HostDecoderState, index: int, mask: np.ndarray | None, keep: list[int] | None = None
    ):
        q, k, v = np.split(split_heads(self.qkv(x), 3 * self.n_head), 3, axis=1)
        keys, values = state.append(index, k, v)
        if keep is not None:
            q, mask = q[:, :, keep], (None if mask is None else mask[:, :, keep])
        if q.shape[2] > 1:  # a prompt: cache-sized blocks over the workers
            return self.attn_out(merge_heads(kernels.masked_attention(q, keys, values, mask)))
        scaled = q * np.float32(q.shape[-1] ** -0.5)
        return self.attn_out(merge_heads(kernels.attend(scaled, keys.swapaxes(-1, -2), values, mask)))


def cross_attention(query: np.ndarray, keys_t: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Cross-attention of rows (B·R, H, L, D) over their windows' cached keys/values (B windows): a
    window's R consecutive rows (its beams, one token each) are R queries of one product over its one
    copy of the keys/values."""
    windows = keys_t.shape[0]
    if query.shape[0] == windows:
        return kernels.cross_attention(query, keys_t, values)
    rows, n_head, _, head_dim = query.shape
    grouped = query.reshape(windows, rows // windows, n_head, head_dim).transpose(0, 2, 1, 3)
    out = kernels.attend(np.ascontiguousarray(grouped), keys_t, values)
    return out.transpose(0, 2, 1, 3).reshape(rows, n_head, 1, head_dim)


@dataclass(frozen=True)
class HostEncoderLayer:
    """One encoder block's weights as numpy views (Q/K/V fused into one projection)."""

    n_head: int
    attn_ln: HostNorm
    qkv: HostLinear
    attn_out: HostLinear
    mlp: HostMLP

    @classmethod
    def of(cls, block) -> HostEncoderLayer:
        return cls(
            block.attn.n_head,
            HostNorm.of(block.attn_ln),
            fused_qkv(block.attn),
            HostLinear.of(block.attn.out),
            HostMLP.of(block),
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q, k, v = np.split(self.qkv(self.attn_ln(x)), 3, axis=-1)
        x += self.attn_out(kernels.attention(q, k, v, self.n_head))
        x += self.mlp(x)
        return x


def conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int) -> np.ndarray:
    """Conv1d with padding 1 over (B, T, C_in), weight (C_out, k, C_in) as MLX stores it: one matrix
    product of the k shifted (and strided) views side by side."""
    kernel = weight.shape[1]
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    length = (x.shape[1] + 2 - kernel) // stride + 1
    columns = np.concatenate([padded[:, i : i + stride * (length - 1) + 1 : stride] for i in range(kernel)], axis=-1)
    return affine(columns, weight.reshape(weight.shape[0], -1), bias)


class HostEncoder:
    """The audio encoder's weights as numpy views (Q/K/V fused: a copy), and its forward pass."""

    def __init__(self, encoder):
        self.sources = parameter_arrays(encoder)
        self.convs = [
            (_np(conv.weight), _np(conv.bias) if "bias" in conv else None, conv.stride)
            for conv in (encoder.conv1, encoder.conv2)
        ]
        self.positional_embedding = _np(encoder._positional_embedding)
        self.layers = [HostEncoderLayer.of(block) for block in encoder.blocks]
        self.ln_post = HostNorm.of(encoder.ln_post)

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        """mel (B, n_frames, n_mels) -> audio features (B, n_frames // 2, n_state)."""
        x = np.ascontiguousarray(mel, dtype=np.float32)
        for weight, bias, stride in self.convs:
            x = kernels.gelu(conv1d(x, weight, bias, stride))
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"incorrect audio shape: {x.shape[1]} frames after conv, expected {self.positional_embedding.shape[0]}"
            )
        x += self.positional_embedding
        for layer in self.layers:
            x = layer(x)
        return self.ln_post(x)

    def encode_windows(self, mels: np.ndarray) -> np.ndarray:
        """(B, n_frames, n_mels) -> (B, n_audio_ctx, n_state), one window at a time as __call__
        does, but as many windows at once as there are worker threads, each whole on one of them:
        a window's blocks share two cores less well than whole windows do. A window left over is
        encoded alone over all the workers. Each window's output is the same bits either way (test)."""
        whole = len(mels) - len(mels) % worker_count()
        encoded = run_whole([partial(self, mels[i : i + 1]) for i in range(whole)])
        encoded += [self(mels[i : i + 1]) for i in range(whole, len(mels))]
        return np.concatenate(encoded)


PACKED_MIN_ROWS = 2  # rows from which the logits read the packed embedding (see blas.PackedOperand)
# from this many rows (beams) the product is compute-bound: numpy's OpenBLAS beat MKL's packed copy (experiments.md)
OPENBLAS_LOGITS_MIN_ROWS = 24


class HostDecoder:
    """The decoder's weights as numpy views, and its forward pass over a HostDecoderState."""

    def __init__(self, decoder) -> None:
        self.sources = parameter_arrays(decoder)
        self.token_embedding = _np(decoder.token_embedding.weight)  # (n_vocab, n_state)
        self.positional_embedding = _np(decoder.positional_embedding)
        self.layers = [HostLayer.of(block) for block in decoder.blocks]
        self.ln = HostNorm.of(decoder.ln)
        # (n_state, n_vocab), contiguous: the layout the BLAS streams fastest for a few rows
        self.embedding_t = np.ascontiguousarray(self.token_embedding.T)
        self.pool = BufferPool()  # the batches' caches, reused

    def new_state(
        self, audio_features: np.ndarray, pad: np.ndarray, max_len: int, rows_per_window: int = 1
    ) -> HostDecoderState:
        audio = np.ascontiguousarray(audio_features, dtype=np.float32)
        cross_kv = [layer.cross_cache(audio, self.pool) for layer in self.layers]
        head = self.layers[0]
        return HostDecoderState(
            self,
            cross_kv,
            np.asarray(pad, np.int64),
            head.n_head,
            head.attn_out.weight.shape[0] // head.n_head,
            max_len,
            rows_per_window,
        )

    def hidden(self, tokens: np.ndarray, state: HostDecoderState, keep: list[int] | None = None) -> np.ndarray:
        """Final-layer-normed hidden states (B, L, n_state) of new tokens (B, L), or (B, len(keep),
        n_state) of the positions in `keep` (the last layer then skips the others' attention outputs and
        MLP: a prompt of ~220 tokens only needs two); updates the caches."""
        length = tokens.shape[1]
        positions = np.maximum(np.arange(state.offset, state.offset + length)[None, :] - state.pad[:, None], 0)
        x = self.token_embedding[tokens] + self.positional_embedding[positions]
        mask = state.mask(length)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x, state, index, mask, keep if index == last else None)
        state.offset += length
        return self.ln(x)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits (rows, n_vocab) of final hidden states (rows, n_state): the step's largest read (tiny,
        80 MB). One row: blas.matmul (numpy's gemv). From 2 to panels.MAX_ROWS rows, the panel kernel
        over the embedding's panels, one range per worker (panels.py); without it, or above,
        one block of vocabulary columns per worker (a single BLAS call computes such a skinny product
        on one thread): MKL's packed copy of the block, made on first use, or from
        OPENBLAS_LOGITS_MIN_ROWS rows numpy's product of the plain block (tests: MKL's blocks are the
        bits of its one product of all columns; numpy's, of its product of the block on one thread)."""
        hidden = np.ascontiguousarray(hidden)
        rows = hidden.shape[0]
        embedding = self.embedding_panels if PACKED_MIN_ROWS <= rows <= panels.MAX_ROWS else None
        if embedding is not None:
            out = np.empty((rows, embedding.width), np.float32)
            run_blocks([partial(embedding.matmul, hidden, out=out, part=part) for part in self.embedding_parts])
            return out
        plain = rows >= OPENBLAS_LOGITS_MIN_ROWS
        if not plain and (rows < PACKED_MIN_ROWS or not blas.PackedOperand.available()):
            return blas.matmul(hidden, self.embedding_t)
        out = np.empty((rows, self.embedding_t.shape[1]), np.float32)
        if plain:
            tasks = [partial(np.matmul, hidden, self.embedding_t[:, c], out=out[:, c]) for c in self.column_blocks]
        else:
            tasks = [partial(packed.matmul, hidden, out[:, c]) for c, packed in self.packed_blocks]
        run_blocks(tasks)
        return out

    @cached_property
    def embedding_panels(self) -> panels.PanelWeights | None:
        """The token embedding in panels, made on first use (None without the kernel)."""
        return panels.PanelWeights(self.token_embedding) if panels.available() else None

    @cached_property
    def embedding_parts(self) -> list[slice]:
        """The embedding's panels in one range per worker thread (with embedding_panels)."""
        return cast(panels.PanelWeights, self.embedding_panels).split(worker_count())

    @cached_property
    def column_blocks(self) -> list[slice]:
        """The embedding's vocabulary columns in one block per worker thread."""
        bounds = np.linspace(0, self.embedding_t.shape[1], worker_count() + 1).astype(int)
        return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]

    @cached_property
    def packed_blocks(self) -> list[tuple[slice, blas.PackedOperand]]:
        """column_blocks, each with its packed copy, made on first use."""
        return [
            (columns, blas.PackedOperand(np.ascontiguousarray(self.embedding_t[:, columns])))
            for columns in self.column_blocks
        ]


class HostDecoderState:
    """Per batch of windows: self-attention caches (preallocated, written in place), cross-attention
    keys/values, and the left padding of each row's prompt. A window has `rows_per_window` consecutive
    rows (its beams): its prompt is fed once and copied to them (`expand`); they share its cross-attention
    keys/values."""

    def __init__(
        self,
        decoder: HostDecoder,
        cross_kv: list,
        pad: np.ndarray,
        n_head: int,
        head_dim: int,
        max_len: int,
        rows_per_window: int = 1,
    ):
        batch = pad.shape[0]
        self.decoder = decoder  # the weights this state's caches were made with
        # a position is written before it is read (append), so reused buffers need no clearing
        self.keys = [decoder.pool.empty((batch, n_head, max_len, head_dim)) for _ in cross_kv]
        self.values = [decoder.pool.empty((batch, n_head, max_len, head_dim)) for _ in cross_kv]
        self.cross_kv = cross_kv
        self.pad = pad
        self.offset = 0
        self.rows_per_window = rows_per_window
        self.shared = 0  # cached positions alike in every row of a window (the prompt)

    def append(self, index: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the new keys/values of layer `index` after the cached ones; return all of them."""
        end = self.offset + k.shape[2]
        if end > self.keys[index].shape[2]:
            raise ValueError(f"decoder context overflow: {end} > {self.keys[index].shape[2]} positions")
        self.keys[index][:, :, self.offset : end] = k
        self.values[index][:, :, self.offset : end] = v
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]

    def mask(self, length: int) -> np.ndarray | None:
        """The additive mask of `length` new tokens (whisper.decoder_mask, in numpy)."""
        return decoder_mask(self.offset, length, self.pad if self.pad.any() else None, xp=np)

    def take(self, windows: np.ndarray) -> None:
        """Keep only `windows`, with their rows (compaction after windows finish), moved forward inside
        their buffers when ascending (see keep_rows)."""
        windows = np.asarray(windows)
        per_window = self.rows_per_window
        rows = windows if per_window == 1 else (windows[:, None] * per_window + np.arange(per_window)).reshape(-1)
        caches = keep_rows([*self.keys, *self.values], rows)
        self.keys, self.values = caches[: len(self.keys)], caches[len(self.keys) :]
        cross = keep_rows([a for pair in self.cross_kv for a in pair], windows)
        self.cross_kv = list(zip(cross[::2], cross[1::2]))
        self.pad = self.pad[rows]

    def expand(self) -> None:
        """After the prompt, fed one row per window: copy each window's caches to its rows."""
        self.shared = self.offset
        if self.rows_per_window > 1:
            empty = self.decoder.pool.empty
            self.keys = [repeat_rows(k, self.rows_per_window, self.offset, empty) for k in self.keys]
            self.values = [repeat_rows(v, self.rows_per_window, self.offset, empty) for v in self.values]
            self.pad = np.repeat(self.pad, self.rows_per_window)

    def rearrange(self, rows: np.ndarray) -> None:
        """Row i continues row rows[i] (a row of the same window): only the rows that change, and only
        their positions after the prompt (alike in a window's rows), are copied."""
        rows = np.asarray(rows)
        moved = np.flatnonzero(rows != np.arange(len(rows)))
        if len(moved) == 0 or self.offset == self.shared:
            return
        span, sources = slice(self.shared, self.offset), rows[moved]
        for array in (*self.keys, *self.values):
            array[moved, :, span] = array[sources, :, span]  # the right side is a copy: overlaps are safe


def keep_rows(arrays: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    """Each array's `rows`, in that order. Ascending rows move forward inside the buffers they are in
    (only the rows after the first dropped one are copied, and no new arrays are allocated)."""
    if len(rows) and np.all(np.diff(rows) > 0):
        moves = [(dst, int(src)) for dst, src in enumerate(rows) if dst != src]
        for array in arrays:
            for dst, src in moves:  # src > dst: a row is read before anything overwrites it
                array[dst] = array[src]
        return [array[: len(rows)] for array in arrays]
    return [array[rows] for array in arrays]


def repeat_rows(
    cache: np.ndarray, repeats: int, filled: int, empty: Callable[[tuple[int, ...]], np.ndarray]
) -> np.ndarray:
    """A (B·repeats, H, max_len, D) cache, made by empty(shape), whose rows are each row of `cache` (B, H,
    max_len, D) `repeats` times, its first `filled` positions copied (the later ones are written before
    they are read)."""
    batch, *rest = cache.shape
    out = empty((batch * repeats, *rest))
    out.reshape(batch, repeats, *rest)[:, :, :, :filled] = cache[:, None, :, :filled]
    return out
