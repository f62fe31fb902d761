"""The Whisper encoder-decoder in pure MLX (mlx-examples' model), with a preallocated self-attention
cache (mlx-lm's cache protocol: `update_and_fetch`, `offset`) and a once-per-window cross-attention cache.

Parameter names follow mlx-whisper, so mlx-community checkpoints load unchanged. Nothing here knows the
device: attention goes through `mx.fast.scaled_dot_product_attention` everywhere, as in mlx-lm.
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .dims import ModelDimensions
from .dims import sinusoids as sinusoids_table

__all__ = ["ModelDimensions", "Whisper", "sinusoids"]


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> mx.array:
    """Sinusoidal position embedding of the audio encoder, (length, channels)."""
    return mx.array(sinusoids_table(length, channels, max_timescale))


def split_heads(x, n_head: int):
    """(B, L, H·D) -> (B, H, L, D); reshapes only, so numpy arrays work too."""
    batch, length, width = x.shape
    return x.reshape(batch, length, n_head, width // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    batch, n_head, length, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, n_head * head_dim)


def attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    """softmax(q kᵀ / √d + mask) v over (B, H, L, D) inputs (the one attention dispatch)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


def attend_windows(q: mx.array, keys: mx.array, values: mx.array) -> mx.array:
    """Cross-attention of rows (B·R, H, L, D) over their windows' keys/values (B, H, T, D): a window's R
    consecutive rows (its beams) attend to its one copy, as R queries of one product (one token each)."""
    windows = keys.shape[0]
    if q.shape[0] == windows:
        return attend(q, keys, values, None)
    rows, n_head, _, head_dim = q.shape
    grouped = q.reshape(windows, rows // windows, n_head, head_dim).transpose(0, 2, 1, 3)
    out = attend(grouped, keys, values, None)
    return out.transpose(0, 2, 1, 3).reshape(rows, n_head, 1, head_dim)


def attention_weights(q: mx.array, k: mx.array) -> mx.array:
    """The explicit softmax(q kᵀ / √d) in float32, (B, H, L, T): word timing reads these weights."""
    scores = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)
    return mx.softmax(scores.astype(mx.float32), axis=-1)


def decoder_mask(offset: int, length: int, pad=None, xp=mx):
    """Additive (1 or B, 1, L, offset + L) float32 mask of L new tokens after `offset` cached ones, or
    None: causal within the new tokens, and real tokens never attend to a row's left padding (`pad`, (B,)
    padding tokens per row, None when no row has any). Written over `xp` (mlx.core or numpy) so both
    backends build the same mask."""
    total = offset + length
    queries = xp.arange(offset, total)
    blocked = xp.arange(total)[None, None, :] > queries[None, :, None] if length > 1 else None
    if pad is not None:
        padded_key = xp.arange(total)[None, None, :] < pad[:, None, None]
        # padding positions still see themselves, so no softmax row is all -inf (0 * NaN = NaN)
        from_padding = padded_key & (queries[None, :, None] >= pad[:, None, None])
        blocked = from_padding if blocked is None else blocked | from_padding
    if blocked is None:
        return None
    return xp.where(blocked, -xp.inf, 0.0).astype(xp.float32)[:, None]


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: KVCache | None = None) -> mx.array:
        """Self-attention; with a cache, the new keys/values are appended to it first."""
        q = split_heads(self.query(x), self.n_head)
        k = split_heads(self.key(x), self.n_head)
        v = split_heads(self.value(x), self.n_head)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.out(merge_heads(attend(q, k, v, mask)))

    def cross_kv(self, xa: mx.array) -> CrossKV:
        return CrossKV(split_heads(self.key(xa), self.n_head), split_heads(self.value(xa), self.n_head))

    def cross(self, x: mx.array, kv: CrossKV) -> mx.array:
        q = split_heads(self.query(x), self.n_head)
        return self.out(merge_heads(attend_windows(q, kv.keys, kv.values)))

    def cross_from_features(self, x: mx.array, xa: mx.array) -> mx.array:
        """Cross-attention of one query per row (B, 1, D) straight from the audio features (B, T, D),
        without their keys/values: a head's scores are (q_h W_k,h) xaᵀ and its output (weights xa) W_v,hᵀ
        plus the value bias (the weights sum to 1). Plain (unquantized) projections only."""
        n_head, (batch, _, width) = self.n_head, x.shape
        head_dim = width // n_head
        q = self.query(x).reshape(batch, n_head, head_dim)
        key_rows = self.key.weight.reshape(n_head, head_dim, -1)
        scores = mx.einsum("bhd,hdk->bhk", q, key_rows) @ xa.swapaxes(1, 2) * head_dim**-0.5
        weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(xa.dtype)
        value_rows = self.value.weight.reshape(n_head, head_dim, -1)
        heads = mx.einsum("bhk,hdk->bhd", weights @ xa, value_rows) + self.value.bias.reshape(n_head, head_dim)
        return self.out(heads.reshape(batch, 1, width))

    def cross_with_weights(self, x: mx.array, xa: mx.array) -> tuple[mx.array, mx.array]:
        """Cross-attention that also returns the (B, H, L, T) attention weights (for word timing)."""
        q = split_heads(self.query(x), self.n_head)
        keys, values = split_heads(self.key(xa), self.n_head), split_heads(self.value(xa), self.n_head)
        weights = attention_weights(q, keys)
        return self.out(merge_heads(weights.astype(values.dtype) @ values)), weights


class CrossKV:
    """Cross-attention keys/values (B, H, T, D) of one layer for a batch of windows, computed once per
    window and made contiguous once: a strided operand would be copied by every step's attention."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys = mx.contiguous(keys)
        self.values = mx.contiguous(values)

    def take(self, rows: mx.array) -> CrossKV:
        return CrossKV(self.keys[rows], self.values[rows])


class KVCache:
    """Self-attention keys/values of one decoder layer, preallocated and written in place."""

    def __init__(self, batch: int, n_head: int, head_dim: int, max_len: int, dtype):
        self.keys = mx.zeros((batch, n_head, max_len, head_dim), dtype)
        self.values = mx.zeros((batch, n_head, max_len, head_dim), dtype)
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        end = self.offset + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"decoder context overflow: {end} > {self.keys.shape[2]} positions")
        self.keys[:, :, self.offset : end, :] = k
        self.values[:, :, self.offset : end, :] = v
        self.offset = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    def take(self, rows: mx.array) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]

    def repeat_rows(self, repeats: int) -> None:
        self.keys = mx.repeat(self.keys, repeats, axis=0)
        self.values = mx.repeat(self.values, repeats, axis=0)

    def rearrange(self, rows: mx.array, start: int) -> None:
        """Row i's positions from `start` on become row rows[i]'s (the positions before are alike)."""
        span = slice(start, self.offset)
        self.keys[:, :, span, :] = self.keys[rows, :, span, :]
        self.values[:, :, span, :] = self.values[rows, :, span, :]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp1 = nn.Linear(n_state, 4 * n_state)
        self.mlp2 = nn.Linear(4 * n_state, n_state)
        self.mlp_ln = nn.LayerNorm(n_state)

    def mlp(self, x: mx.array) -> mx.array:
        return self.mlp2(nn.gelu(self.mlp1(self.mlp_ln(x))))

    def __call__(self, x, mask=None, cache=None, cross_kv=None):
        x = x + self.attn(self.attn_ln(x), mask, cache)
        if cross_kv is not None:
            x = x + self.cross_attn.cross(self.cross_attn_ln(x), cross_kv)
        return x + self.mlp(x)


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int, dtype=mx.float32):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self._positional_embedding = sinusoids(n_ctx, n_state).astype(dtype)
        self.blocks = [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
        self.ln_post = nn.LayerNorm(n_state)

    def __call__(self, mel: mx.array) -> mx.array:
        """mel (B, n_frames, n_mels) -> audio features (B, n_frames // 2, n_state)."""
        x = nn.gelu(self.conv1(mel))
        x = nn.gelu(self.conv2(x))
        if x.shape[1] != self._positional_embedding.shape[0]:
            raise ValueError(
                f"incorrect audio shape: {x.shape[1]} frames after conv, expected {self._positional_embedding.shape[0]}"
            )
        x = x + self._positional_embedding.astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int, dtype=mx.float32):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = mx.zeros((n_ctx, n_state), dtype)
        self.blocks = [ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)]
        self.ln = nn.LayerNorm(n_state)

    def embed(self, tokens: mx.array, positions: mx.array) -> mx.array:
        return self.token_embedding(tokens) + self.positional_embedding[positions]

    def hidden(self, tokens, positions, mask, state: DecoderState) -> mx.array:
        """Final-layer-normed hidden states (B, L, n_state) of new tokens, updating the caches."""
        x = self.embed(tokens, positions)
        for block, cache, cross_kv in zip(self.blocks, state.caches, state.cross_kv):
            x = block(x, mask, cache, cross_kv)
        return self.ln(x)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.token_embedding.as_linear(hidden).astype(mx.float32)


class DecoderState:
    """Everything the decoder keeps per batch of windows: self-attention caches, cross-attention K/V,
    and the left padding of each row's prompt (rows may have prompts of different lengths).

    A window may have several rows (its beams, `rows_per_window`, consecutive): the prompt is fed once
    per window, then copied to the window's rows (`expand`); the cross-attention K/V stay one per window.
    """

    def __init__(
        self, decoder: TextDecoder, audio_features: mx.array, pad: mx.array, max_len: int, rows_per_window: int = 1
    ):
        block = decoder.blocks[0]
        n_head, width = block.attn.n_head, block.attn.query.weight.shape[0]
        batch, dtype = audio_features.shape[0], audio_features.dtype
        self.caches = [KVCache(batch, n_head, width // n_head, max_len, dtype) for _ in decoder.blocks]
        self.cross_kv = [cast(MultiHeadAttention, b.cross_attn).cross_kv(audio_features) for b in decoder.blocks]
        self.pad = pad  # (B,) int32: padding tokens before each row's prompt
        self.has_padding = bool(mx.any(pad > 0).item())
        self.rows_per_window = rows_per_window
        self.shared = 0  # cached positions alike in every row of a window (the prompt)

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def take(self, windows: mx.array) -> None:
        """Keep only `windows`, with their rows (compaction after windows finish). One layer at a time,
        each gather evaluated before the next: the old arrays are released as the new ones are made, so
        the caches never exist twice (a large model's cross-attention keys/values are ~250 MB per row)."""
        per_window = self.rows_per_window
        rows = windows if per_window == 1 else (windows[:, None] * per_window + mx.arange(per_window)).reshape(-1)
        for cache in self.caches:
            cache.take(rows)
            mx.eval(cache.keys, cache.values)
        for layer in range(len(self.cross_kv)):
            kept = self.cross_kv[layer].take(windows)
            self.cross_kv[layer] = kept  # the old keys/values now live only as the gather's inputs
            mx.eval(kept.keys, kept.values)
        self.pad = self.pad[rows]

    def expand(self) -> None:
        """After the prompt, fed one row per window: copy each window's caches to its rows."""
        self.shared = self.offset
        if self.rows_per_window > 1:
            for cache in self.caches:
                cache.repeat_rows(self.rows_per_window)
            self.pad = mx.repeat(self.pad, self.rows_per_window)

    def rearrange(self, rows: mx.array) -> None:
        """Row i continues row rows[i] (a row of the same window): beams reordered after a step."""
        if self.offset > self.shared:
            for cache in self.caches:
                cache.rearrange(rows, self.shared)


class Whisper(nn.Module):
    # openai-whisper's model methods, bound by whisper_mlx.model_methods: this module knows no decoding
    transcribe: Callable[..., dict]
    decode: Callable[..., Any]
    detect_language: Callable[..., Any]

    def __init__(self, dims: ModelDimensions, dtype=mx.float32):
        super().__init__()
        self.dims = dims
        self.dtype = dtype
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer, dtype
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer, dtype
        )
        # openai's default: all heads of the second half of the decoder layers
        heads = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
        heads[dims.n_text_layer // 2 :] = True
        self.alignment_heads = np.argwhere(heads)

    def set_alignment_heads(self, heads) -> None:
        """(layer, head) pairs, or openai's dump: base85 of a gzipped (n_text_layer, n_text_head) bool mask."""
        if isinstance(heads, (bytes, str)):
            mask = np.frombuffer(gzip.decompress(base64.b85decode(heads)), dtype=bool)
            heads = np.argwhere(mask.reshape(self.dims.n_text_layer, self.dims.n_text_head))
        heads = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
        if heads.size and (heads[:, 0].max() >= self.dims.n_text_layer or heads[:, 1].max() >= self.dims.n_text_head):
            raise ValueError("alignment heads outside the decoder's layers/heads")
        self.alignment_heads = heads

    def with_dtype(self, dtype) -> Whisper:
        """This model computing in `dtype`: itself when it already does, else a copy (made once, kept on
        the model) with its floating parameters cast; quantized weights stay quantized."""
        if dtype == self.dtype:
            return self
        variants = self.__dict__.setdefault("_dtype_variants", SimpleNamespace(by_dtype={})).by_dtype
        if dtype not in variants:
            variants[dtype] = self._cast_copy(dtype)
        return variants[dtype]

    def _cast_copy(self, dtype) -> Whisper:
        copy = Whisper(self.dims, dtype)
        quantized = {
            path: module
            for path, module in self.named_modules()
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        }
        if quantized:
            first = next(iter(quantized.values()))
            nn.quantize(
                copy,
                group_size=first.group_size,
                bits=first.bits,
                mode=getattr(first, "mode", "affine"),
                class_predicate=lambda path, _: path in quantized,
            )
        floating = (mx.float16, mx.bfloat16, mx.float32)
        copy.update(tree_map(lambda a: a.astype(dtype) if a.dtype in floating else a, self.parameters()))
        copy.alignment_heads = self.alignment_heads
        mx.eval(copy.parameters())
        return copy

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual

    @property
    def num_languages(self) -> int:
        return self.dims.num_languages

    def embed_audio(self, mel: mx.array) -> mx.array:
        return self.encoder(mel.astype(self.dtype))

    def new_state(
        self, audio_features: mx.array, pad: mx.array | None = None, rows_per_window: int = 1
    ) -> DecoderState:
        if pad is None:
            pad = mx.zeros((audio_features.shape[0],), mx.int32)
        return DecoderState(self.decoder, audio_features, pad, self.dims.n_text_ctx, rows_per_window)

    def step(self, tokens: mx.array, state: DecoderState, keep: int = 1) -> tuple[Any, mx.array]:
        """Feed new tokens (B, L) and return (logits of the last `keep` positions, or None when keep
        is 0, and all hidden states)."""
        length = tokens.shape[1]
        offset = state.offset
        positions = mx.arange(offset, offset + length)[None, :] - state.pad[:, None]
        positions = mx.maximum(positions, 0)
        mask = self._self_attention_mask(state, length)
        hidden = self.decoder.hidden(tokens, positions, mask, state)
        return (self.decoder.logits(hidden[:, -keep:]) if keep else None), hidden

    def _self_attention_mask(self, state: DecoderState, length: int) -> mx.array | None:
        mask = decoder_mask(state.offset, length, state.pad if state.has_padding else None)
        return None if mask is None else mask.astype(self.dtype)

    def first_token_logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        """Logits (B, n_vocab) of one token per window at position 0 (<|startoftranscript|>, for language
        detection) without building the cross-attention keys/values of every layer; quantized models take
        the cached path."""
        decoder = self.decoder
        if any(isinstance(m, nn.QuantizedLinear) for m in decoder.modules()):
            return self.logits(tokens, audio_features)[:, 0]
        x = decoder.embed(tokens, mx.zeros((1, 1), mx.int32))
        for block in decoder.blocks:
            attn, cross_attn = block.attn, cast(MultiHeadAttention, block.cross_attn)
            x = x + attn.out(attn.value(block.attn_ln(x)))  # a lone token attends to itself only
            x = x + cross_attn.cross_from_features(cast(nn.LayerNorm, block.cross_attn_ln)(x), audio_features)
            x = x + block.mlp(x)
        return decoder.logits(decoder.ln(x))[:, 0]

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        """Full-sequence logits (B, L, n_vocab), no cache kept."""
        state = self.new_state(audio_features)
        _, hidden = self.step(tokens, state)
        return self.decoder.logits(hidden)

    def __call__(self, mel: mx.array, tokens: mx.array) -> mx.array:
        return self.logits(tokens, self.embed_audio(mel))

    def forward_with_cross_qk(self, tokens: mx.array, audio_features: mx.array):
        """Logits (B, L, V) and each decoder layer's cross-attention weights (B, H, L, T)."""
        decoder = self.decoder
        length = tokens.shape[1]
        x = decoder.embed(tokens, mx.arange(length)[None, :])
        causal = mx.arange(length)[None, :] > mx.arange(length)[:, None]
        mask = mx.where(causal, -mx.inf, 0.0).astype(self.dtype)
        weights = []
        for block in decoder.blocks:
            x = x + block.attn(block.attn_ln(x), mask)
            cross_attn = cast(MultiHeadAttention, block.cross_attn)  # decoder blocks always have cross-attention
            cross_ln = cast(nn.LayerNorm, block.cross_attn_ln)
            attended, w = cross_attn.cross_with_weights(cross_ln(x), audio_features)
            x = x + attended
            x = x + block.mlp(x)
            weights.append(w)
        return decoder.logits(decoder.ln(x)), weights
