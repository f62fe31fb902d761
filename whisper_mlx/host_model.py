"""The Whisper model in numpy for MLX's CPU backend: the audio encoder, and the text decoder (greedy and
sampled decoding).

MLX's CPU elementwise kernels are scalar and single-threaded, and every hop between an MLX graph and the
numpy kernels of cpu_kernels is a wait. The encoder here is numpy from the mel on: the convolutions as
matrix products of shifted views, one fused Q/K/V product, the blocked threaded kernels, numpy layer
norms (one tiny.en window: 326 ms as MLX ops with the kernels, 299 ms here).

One decoding step of a Whisper decoder is ~25 small operations per layer on a handful of rows. As MLX
ops on the CPU each goes through MLX's scheduler (and the numpy cross-attention kernel made the step
wait for MLX once per layer); the same step in numpy, on the calling thread, is a few BLAS calls on
views of the model's own weights (zero-copy, except the fused Q/K/V projection). The decoder state
mirrors `whisper.DecoderState`: a preallocated self-attention cache written in place, the
cross-attention keys/values computed once per window (by `cpu_kernels.cross_keys_values`, in the
layouts the steps read), and each row's left padding.

Only float32 models with plain (not quantized) layers take these paths: see `host_encoder_for` and
`host_decoder_for`; the others keep MLX's modules.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import cpu_kernels, host_blas
from .backend import on_cpu
from .whisper import merge_heads, split_heads  # reshapes that serve numpy arrays as well

NEG_INF = np.float32(-np.inf)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = np.square(centered).mean(axis=-1, keepdims=True)
    centered *= 1 / np.sqrt(variance + np.float32(eps))
    centered *= weight
    centered += bias
    return centered


def affine(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """x Wᵀ + b with W as nn.Linear stores it, (out, in): the BLAS reads the transposed view."""
    out = host_blas.matmul(x.reshape(-1, x.shape[-1]), weight.T).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        out += bias
    return out


def _np(array: mx.array | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array)


@dataclass(frozen=True)
class HostLinear:
    weight: np.ndarray  # (out, in), a view of the MLX parameter
    bias: np.ndarray | None

    @classmethod
    def of(cls, layer: nn.Linear) -> "HostLinear":
        return cls(_np(layer.weight), _np(layer.bias) if "bias" in layer else None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return affine(x, self.weight, self.bias)


@dataclass(frozen=True)
class HostNorm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> "HostNorm":
        return cls(_np(norm.weight), _np(norm.bias), norm.eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class HostMLP:
    """A block's layer norm and MLP: the rows of a prompt or a window in blocks over the workers
    (cpu_kernels.mlp), a step's few rows through MKL's products (host_blas)."""

    ln: HostNorm
    mlp1: HostLinear
    mlp2: HostLinear

    @classmethod
    def of(cls, block) -> "HostMLP":
        return cls(HostNorm.of(block.mlp_ln), HostLinear.of(block.mlp1), HostLinear.of(block.mlp2))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        hidden = self.ln(x)
        if hidden.shape[0] * hidden.shape[1] > cpu_kernels.MLP_BLOCK_ROWS:
            return cpu_kernels.mlp(hidden, self.mlp1.weight, self.mlp1.bias, self.mlp2.weight, self.mlp2.bias)
        return self.mlp2(cpu_kernels.gelu(self.mlp1(hidden)))


def fused_qkv(attn) -> HostLinear:
    """The query, key and value projections stacked into one (3 n_state, n_state) projection (the key
    has no bias: zeros)."""
    width = attn.query.weight.shape[0]
    biases = [_np(attn.query.bias), np.zeros(width, np.float32), _np(attn.value.bias)]
    return HostLinear(np.concatenate([_np(attn.query.weight), _np(attn.key.weight), _np(attn.value.weight)]),
                      np.concatenate(biases))


def parameter_arrays(module) -> list[mx.array]:
    return [array for _, array in tree_flatten(module.parameters())]


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
    def of(cls, block) -> "HostLayer":
        attn, cross = block.attn, block.cross_attn
        return cls(attn.n_head, HostNorm.of(block.attn_ln), fused_qkv(attn), HostLinear.of(attn.out),
                   HostNorm.of(block.cross_attn_ln), HostLinear.of(cross.query), HostLinear.of(cross.out),
                   _np(cross.key.weight), HostLinear.of(cross.value), HostMLP.of(block))

    def cross_cache(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys scaled and transposed (B, H, D, T), values (B, H, T, D)) of encoded windows."""
        return cpu_kernels.cross_keys_values(audio, self.cross_key_weight, self.cross_value.weight,
                                             self.cross_value.bias, self.n_head)

    def __call__(self, x: np.ndarray, state: "HostDecoderState", index: int, mask: np.ndarray | None,
                 keep: list[int] | None = None):
        """The block over new tokens x (B, L, n_state); every position writes its keys/values, and with
        `keep` only those positions go on (attention outputs, cross-attention, MLP)."""
        attended = self.self_attention(self.attn_ln(x), state, index, mask, keep)
        x = (x if keep is None else x[:, keep]) + attended
        query = split_heads(self.cross_query(self.cross_ln(x)), self.n_head)
        x = x + self.cross_out(merge_heads(cpu_kernels.cross_attention(query, *state.cross_kv[index])))
        return x + self.mlp(x)

    def self_attention(self, x: np.ndarray, state: "HostDecoderState", index: int, mask: np.ndarray | None,
                       keep: list[int] | None = None):
        q, k, v = np.split(split_heads(self.qkv(x), 3 * self.n_head), 3, axis=1)
        keys, values = state.append(index, k, v)
        if keep is not None:
            q, mask = q[:, :, keep], (None if mask is None else mask[:, :, keep])
        if q.shape[2] > 1:  # a prompt: cache-sized blocks over the workers
            return self.attn_out(merge_heads(cpu_kernels.masked_attention(q, keys, values, mask)))
        scaled = q * np.float32(q.shape[-1] ** -0.5)
        return self.attn_out(merge_heads(cpu_kernels.attend(scaled, keys.swapaxes(-1, -2), values, mask)))


@dataclass(frozen=True)
class HostEncoderLayer:
    """One encoder block's weights as numpy views (Q/K/V fused into one projection)."""

    n_head: int
    attn_ln: HostNorm
    qkv: HostLinear
    attn_out: HostLinear
    mlp: HostMLP

    @classmethod
    def of(cls, block) -> "HostEncoderLayer":
        return cls(block.attn.n_head, HostNorm.of(block.attn_ln), fused_qkv(block.attn), HostLinear.of(block.attn.out),
                   HostMLP.of(block))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q, k, v = np.split(self.qkv(self.attn_ln(x)), 3, axis=-1)
        x += self.attn_out(cpu_kernels.attention(q, k, v, self.n_head))
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
        self.convs = [(_np(conv.weight), _np(conv.bias) if "bias" in conv else None, conv.stride)
                      for conv in (encoder.conv1, encoder.conv2)]
        self.positional_embedding = _np(encoder._positional_embedding)
        self.layers = [HostEncoderLayer.of(block) for block in encoder.blocks]
        self.ln_post = HostNorm.of(encoder.ln_post)

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        """mel (B, n_frames, n_mels) -> audio features (B, n_frames // 2, n_state)."""
        x = np.ascontiguousarray(mel, dtype=np.float32)
        for weight, bias, stride in self.convs:
            x = cpu_kernels.gelu(conv1d(x, weight, bias, stride))
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(f"incorrect audio shape: {x.shape[1]} frames after conv, expected "
                             f"{self.positional_embedding.shape[0]}")
        x += self.positional_embedding
        for layer in self.layers:
            x = layer(x)
        return self.ln_post(x)

    def encode_windows(self, mels: np.ndarray) -> np.ndarray:
        """(B, n_frames, n_mels) -> (B, n_audio_ctx, n_state), one window at a time as __call__
        does, but as many windows at once as there are worker threads, each whole on one of them:
        a window's blocks share two cores less well than whole windows do (tiny.en, 6 windows:
        ~235-265 -> ~200-210 ms a window). A window left over is encoded alone over all the
        workers. Each window's output is the same bits either way (test)."""
        whole = len(mels) - len(mels) % cpu_kernels.worker_count()
        encoded = cpu_kernels.run_whole([partial(self, mels[i : i + 1]) for i in range(whole)])
        encoded += [self(mels[i : i + 1]) for i in range(whole, len(mels))]
        return np.concatenate(encoded)


class BackgroundEncoder:
    """Encodes windows with the numpy encoder on a background thread, on one core, one window at a
    time, while the calling thread decodes. The opening window of a batched transcription is decoded
    alone, on one core (transcribe.decode_opening_window): the other lanes' first windows are encoded
    beside it.

    The outputs are the same bits as the encoder's on the calling thread (test): which thread encoded
    a window never changes a transcript."""

    def __init__(self, encoder: HostEncoder, mels: dict):
        self._encoder = encoder
        self._mels = dict(mels)  # window key -> (frames, n_mels) float32, read before the thread starts
        self._waiting = list(mels)  # not started yet, in order
        self._results = {key: Future() for key in mels}
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
            host_blas.use_one_thread_here()
            with cpu_kernels.blocks_on_this_thread():
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

    def close(self) -> None:
        """Start nothing more (what was not started is cancelled) and wait for the window in progress."""
        with self._lock:
            for key in self._waiting:
                self._results[key].cancel()
            self._waiting.clear()
        self._thread.join()


PACKED_MIN_ROWS = 2  # rows from which the logits read the packed embedding (see host_blas.PackedOperand)


class HostDecoder:
    """The decoder's weights as numpy views, and its forward pass over a HostDecoderState."""

    def __init__(self, decoder):
        self.sources = parameter_arrays(decoder)
        self.token_embedding = _np(decoder.token_embedding.weight)  # (n_vocab, n_state)
        self.positional_embedding = _np(decoder.positional_embedding)
        self.layers = [HostLayer.of(block) for block in decoder.blocks]
        self.ln = HostNorm.of(decoder.ln)
        # (n_state, n_vocab), contiguous: the layout the BLAS streams fastest for a few rows
        self.embedding_t = _np(decoder.transposed_embedding())
        self._packed_embedding: host_blas.PackedOperand | None = None

    def new_state(self, audio_features: mx.array, pad: np.ndarray, max_len: int) -> "HostDecoderState":
        audio = np.ascontiguousarray(np.asarray(audio_features), dtype=np.float32)
        cross_kv = [layer.cross_cache(audio) for layer in self.layers]
        head = self.layers[0]
        return HostDecoderState(cross_kv, np.asarray(pad, np.int64), head.n_head,
                                head.attn_out.weight.shape[0] // head.n_head, max_len)

    def hidden(self, tokens: np.ndarray, state: "HostDecoderState", keep: list[int] | None = None) -> np.ndarray:
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
        80 MB). One row: host_blas.matmul (numpy's gemv); from PACKED_MIN_ROWS rows, MKL's packed copy
        of the embedding, made on first use (greedy sequential decoding never needs it)."""
        hidden = np.ascontiguousarray(hidden)
        if hidden.shape[0] >= PACKED_MIN_ROWS and host_blas.PackedOperand.available():
            if self._packed_embedding is None:
                self._packed_embedding = host_blas.PackedOperand(self.embedding_t)
            return self._packed_embedding.matmul(hidden)
        return host_blas.matmul(hidden, self.embedding_t)


class HostDecoderState:
    """Per batch of windows: self-attention caches (preallocated, written in place), cross-attention
    keys/values, and the left padding of each row's prompt."""

    def __init__(self, cross_kv: list, pad: np.ndarray, n_head: int, head_dim: int, max_len: int):
        batch = pad.shape[0]
        self.keys = [np.zeros((batch, n_head, max_len, head_dim), np.float32) for _ in cross_kv]
        self.values = [np.zeros((batch, n_head, max_len, head_dim), np.float32) for _ in cross_kv]
        self.cross_kv = cross_kv
        self.pad = pad
        self.offset = 0

    def append(self, index: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the new keys/values of layer `index` after the cached ones; return all of them."""
        end = self.offset + k.shape[2]
        if end > self.keys[index].shape[2]:
            raise ValueError(f"decoder context overflow: {end} > {self.keys[index].shape[2]} positions")
        self.keys[index][:, :, self.offset : end] = k
        self.values[index][:, :, self.offset : end] = v
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]

    def mask(self, length: int) -> np.ndarray | None:
        """Additive (1 or B, 1, L, offset + L) mask: causal within the new tokens, and real tokens never
        attend to a row's left padding (padding positions still see themselves: no all -inf row)."""
        total = self.offset + length
        queries = np.arange(self.offset, total)
        blocked = np.zeros((1, length, total), bool)
        if length > 1:
            blocked = blocked | (np.arange(total)[None, None, :] > queries[None, :, None])
        if self.pad.any():
            padded_key = np.arange(total)[None, None, :] < self.pad[:, None, None]
            blocked = blocked | (padded_key & (queries[None, :, None] >= self.pad[:, None, None]))
        if not blocked.any():
            return None
        return np.where(blocked, NEG_INF, np.float32(0))[:, None]

    def take(self, rows: np.ndarray) -> None:
        """Keep only `rows` (compaction after rows finish). Ascending rows move forward inside the
        buffers they are in (only the rows after the first dropped one are copied, and no new ~100 MB
        of cross-attention is allocated: the copies were ~0.2 s of alice_ch1)."""
        rows = np.asarray(rows)
        if len(rows) and np.all(np.diff(rows) > 0):
            moves = [(dst, int(src)) for dst, src in enumerate(rows) if dst != src]
            kept = slice(0, len(rows))
            arrays = [*self.keys, *self.values, *(a for pair in self.cross_kv for a in pair)]
            for array in arrays:
                for dst, src in moves:  # src > dst: a row is read before anything overwrites it
                    array[dst] = array[src]
        else:
            kept = rows
        self.keys = [k[kept] for k in self.keys]
        self.values = [v[kept] for v in self.values]
        self.cross_kv = [(keys_t[kept], values[kept]) for keys_t, values in self.cross_kv]
        self.pad = self.pad[rows]


def _plain_float32(module) -> bool:
    """Only float32 nn.Linear, nn.Conv1d and nn.Embedding layers (nothing quantized)."""
    plain = (nn.Linear, nn.Conv1d, nn.Embedding)
    layers = [m for _, m in module.named_modules() if isinstance(m, plain) or "Quantized" in type(m).__name__]
    return all(type(m) in plain and m.weight.dtype == mx.float32 for m in layers)


def _cached(module, attribute: str, build):
    """module's numpy twin, built once (views, not copies) and rebuilt if its parameters are replaced."""
    cached = getattr(module, attribute, None)
    if cached is not None:
        current = parameter_arrays(module)
        if len(current) == len(cached.sources) and all(a is b for a, b in zip(current, cached.sources)):
            return cached
    cached = build(module)
    setattr(module, attribute, cached)  # a plain attribute (not an array): never a parameter
    return cached


def host_encoder_for(model) -> HostEncoder | None:
    """The model's numpy encoder when MLX computes on the CPU in float32 with plain layers, else None."""
    if not on_cpu() or not _plain_float32(model.encoder):
        return None
    return _cached(model.encoder, "_host_encoder", HostEncoder)


def host_decoder_for(model) -> HostDecoder | None:
    """The model's numpy decoder when MLX computes on the CPU in float32 with plain layers, else None."""
    decoder = model.decoder
    if not on_cpu() or not _plain_float32(decoder):
        return None
    return _cached(decoder, "_host_decoder", HostDecoder)
