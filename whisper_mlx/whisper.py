"""The Whisper encoder-decoder in MLX, with a preallocated self-attention cache and a once-per-window
cross-attention cache kept in the layout attention needs.

Parameter names follow mlx-whisper, so mlx-community checkpoints load unchanged.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels, host_blas
from .backend import on_cpu


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @classmethod
    def from_dict(cls, config: dict) -> "ModelDimensions":
        fields = inspect.signature(cls).parameters
        missing = [name for name in fields if name not in config]
        if missing:
            raise KeyError(f"model config lacks {', '.join(missing)}")
        return cls(**{name: int(config[name]) for name in fields})

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> mx.array:
    """Sinusoidal position embedding of the audio encoder, (length, channels)."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_timescale_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return mx.array(np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32))


def use_fused_attention() -> bool:
    """mx.fast SDPA has fused kernels on Metal and CUDA only; on the CPU the explicit path is faster."""
    return not on_cpu()


def split_heads(x: mx.array, n_head: int) -> mx.array:
    """(B, L, H·D) -> (B, H, L, D); reshapes only, so numpy arrays work too (host_model)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, n_head, width // n_head).transpose(0, 2, 1, 3)  # (B, H, L, D)


def merge_heads(x: mx.array) -> mx.array:
    batch, n_head, length, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, n_head * head_dim)


CPU_KERNEL_MIN_ELEMENTS = 1 << 18  # encoder-sized arrays; the decoder's are too small for the round trip


def use_cpu_kernels(x: mx.array, size: int | None = None) -> bool:
    """Large float32 work on MLX's CPU backend goes to the numpy kernels (see cpu_kernels); `size` is
    the work's element count when it is not x's (e.g. attention scores)."""
    return on_cpu() and x.dtype == mx.float32 and (x.size if size is None else size) >= CPU_KERNEL_MIN_ELEMENTS


def gelu(x: mx.array) -> mx.array:
    if use_cpu_kernels(x):
        return mx.array(cpu_kernels.gelu(np.asarray(x)))
    return nn.gelu(x)


def attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    """softmax(q kᵀ / √d + mask) v over (B, H, L, D) inputs."""
    scale = q.shape[-1] ** -0.5
    if use_fused_attention():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    batch, n_head, length, _ = q.shape
    if length > 1 and use_cpu_kernels(q, size=batch * n_head * length * k.shape[2]):  # the scores
        masks = None if mask is None else np.asarray(mask.astype(mx.float32))
        return mx.array(cpu_kernels.masked_attention(np.asarray(q), np.asarray(k), np.asarray(v), masks))
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype) @ v


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: "KVCache | None" = None) -> mx.array:
        """Self-attention; with a cache, the new keys/values are appended to it first."""
        if cache is None and mask is None and use_cpu_kernels(x):
            q, k, v = self.query(x), self.key(x), self.value(x)
            mx.eval(q, k, v)  # one evaluation for the three projections
            return self.out(mx.array(cpu_kernels.attention(np.asarray(q), np.asarray(k), np.asarray(v), self.n_head)))
        q = split_heads(self.query(x), self.n_head)
        k = split_heads(self.key(x), self.n_head)
        v = split_heads(self.value(x), self.n_head)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.out(merge_heads(attend(q, k, v, mask)))

    def cross_kv(self, xa: mx.array) -> "CrossKV":
        if use_cpu_kernels(xa) and type(self.key) is nn.Linear and type(self.value) is nn.Linear:
            bias = np.asarray(self.value.bias) if "bias" in self.value else None
            keys_t, values = cpu_kernels.cross_keys_values(np.asarray(xa), np.asarray(self.key.weight),
                                                           np.asarray(self.value.weight), bias, self.n_head)
            return CrossKV.on_host(keys_t, values)
        return CrossKV(split_heads(self.key(xa), self.n_head), split_heads(self.value(xa), self.n_head))

    def cross(self, x: mx.array, kv: "CrossKV") -> mx.array:
        q = split_heads(self.query(x), self.n_head)
        return self.out(merge_heads(kv.attend(q)))

    def cross_with_weights(self, x: mx.array, xa: mx.array) -> tuple[mx.array, mx.array]:
        """Cross-attention that also returns the (B, H, L, T) attention weights (for word timing)."""
        q = split_heads(self.query(x), self.n_head)
        keys, values = split_heads(self.key(xa), self.n_head), split_heads(self.value(xa), self.n_head)
        scale = q.shape[-1] ** -0.5
        weights = mx.softmax(((q * scale) @ keys.swapaxes(-1, -2)).astype(mx.float32), axis=-1)
        return self.out(merge_heads(weights.astype(values.dtype) @ values)), weights


class CrossKV:
    """Cross-attention keys/values of one layer for a batch of windows, computed once per window.

    Keys are also kept pre-transposed and pre-scaled for the explicit (CPU) path so no decoding
    step re-transposes or re-scales the 1500-frame cache. On MLX's CPU backend in float32 that
    explicit layout is made and kept in numpy (`host`) and read by the numpy kernel. Each step then
    waits for its query once per layer, which still pays (tiny, MLX ops -> numpy, ms: one step at
    3 windows in a loop 21.1 -> 18.7; whole greedy steps in a real run, the two taking turns, median:
    2 windows 21.7 -> 21.1, 1 window 19.9 -> 19.7).
    """

    def __init__(self, keys: mx.array, values: mx.array):
        # contiguous once here: a strided operand is copied by every matmul, i.e. at every step.
        # The explicit (CPU) path keeps only the pre-transposed, pre-scaled keys.
        self.values = mx.contiguous(values)  # (B, H, T, D)
        self.keys = self.scaled_keys_t = self.host = None
        if use_fused_attention():
            self.keys = mx.contiguous(keys)  # (B, H, T, D)
        else:
            self.scaled_keys_t = mx.contiguous(keys.swapaxes(-1, -2) * keys.shape[-1] ** -0.5)  # (B, H, D, T)

    @classmethod
    def on_host(cls, scaled_keys_t: np.ndarray, values: np.ndarray) -> "CrossKV":
        """From float32 numpy keys already scaled and transposed (B, H, D, T) and values (B, H, T, D)."""
        made = cls.__new__(cls)
        made.keys = made.scaled_keys_t = made.values = None
        made.host = (scaled_keys_t, values)
        return made

    def attend(self, q: mx.array) -> mx.array:
        if self.keys is not None:
            return mx.fast.scaled_dot_product_attention(q, self.keys, self.values, scale=q.shape[-1] ** -0.5)
        if self.host is not None:
            return mx.array(cpu_kernels.cross_attention(np.asarray(q), *self.host))  # waits for q
        scores = (q @ self.scaled_keys_t).astype(mx.float32)
        return mx.softmax(scores, axis=-1).astype(self.values.dtype) @ self.values

    def take(self, rows: mx.array) -> "CrossKV":
        if self.host is not None:
            index = np.asarray(rows)
            return CrossKV.on_host(self.host[0][index], self.host[1][index])
        taken = CrossKV.__new__(CrossKV)
        taken.values, taken.host = self.values[rows], None
        taken.keys = None if self.keys is None else self.keys[rows]
        taken.scaled_keys_t = None if self.scaled_keys_t is None else self.scaled_keys_t[rows]
        return taken


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
        x = self.mlp_ln(x)
        if use_cpu_kernels(x) and type(self.mlp1) is nn.Linear and type(self.mlp2) is nn.Linear:
            weights = (np.asarray(p) for p in (self.mlp1.weight, self.mlp1.bias, self.mlp2.weight, self.mlp2.bias))
            return mx.array(cpu_kernels.mlp(np.asarray(x), *weights))
        return self.mlp2(gelu(self.mlp1(x)))

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
        x = gelu(self.conv1(mel))
        x = gelu(self.conv2(x))
        if x.shape[1] != self._positional_embedding.shape[0]:
            raise ValueError(f"incorrect audio shape: {x.shape[1]} frames after conv, expected "
                             f"{self._positional_embedding.shape[0]}")
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
        self._logits_cache: tuple[mx.array, mx.array] | None = None  # (embedding, its transpose)

    def embed(self, tokens: mx.array, positions: mx.array) -> mx.array:
        return self.token_embedding(tokens) + self.positional_embedding[positions]

    def hidden(self, tokens, positions, mask, state: "DecoderState") -> mx.array:
        """Final-layer-normed hidden states (B, L, n_state) of new tokens, updating the caches."""
        x = self.embed(tokens, positions)
        for block, cache, cross_kv in zip(self.blocks, state.caches, state.cross_kv):
            x = block(x, mask, cache, cross_kv)
        return self.ln(x)

    def _cpu_float32_embedding(self) -> bool:
        weight = self.token_embedding.weight
        return on_cpu() and type(self.token_embedding) is nn.Embedding and weight.dtype == mx.float32

    def logits(self, hidden: mx.array) -> mx.array:
        if not self._cpu_float32_embedding():
            return self.token_embedding.as_linear(hidden).astype(mx.float32)
        # On the CPU the logits are the largest read of a decoding step (the whole embedding); the BLAS
        # streams it fastest transposed and contiguous (tiny, ms: 1 row x @ Wᵀ 10.8, x @ contiguous(Wᵀ)
        # 4.3; 3 rows on a Xeon with MKL: (W @ xᵀ)ᵀ 6.7, x @ contiguous(Wᵀ) 3.2).
        rows = hidden.reshape(-1, hidden.shape[-1])
        return (rows @ self.transposed_embedding()).reshape(*hidden.shape[:-1], -1)

    def host_logits(self, hidden: mx.array) -> np.ndarray:
        """Logits (rows, n_vocab) of final hidden states (rows, n_state) as a numpy array, evaluated now
        (one wait), for greedy steps on the CPU (see host_blas for why it calls the BLAS directly)."""
        if not self._cpu_float32_embedding():
            return np.asarray(self.logits(hidden))
        return host_blas.matmul(np.asarray(hidden, dtype=np.float32), np.asarray(self.transposed_embedding()))

    def transposed_embedding(self) -> mx.array:
        """The token embedding transposed, contiguous (n_state, n_vocab): made once, for the CPU logits."""
        weight = self.token_embedding.weight
        if self._logits_cache is None or self._logits_cache[0] is not weight:  # weights replaced: redo
            self._logits_cache = (weight, mx.contiguous(weight.T))
        return self._logits_cache[1]


class DecoderState:
    """Everything the decoder keeps per batch of windows: self-attention caches, cross-attention K/V,
    and the left padding of each row's prompt (rows may have prompts of different lengths)."""

    def __init__(self, decoder: TextDecoder, audio_features: mx.array, pad: mx.array, max_len: int):
        block = decoder.blocks[0]
        n_head, width = block.attn.n_head, block.attn.query.weight.shape[0]
        batch, dtype = audio_features.shape[0], audio_features.dtype
        self.caches = [KVCache(batch, n_head, width // n_head, max_len, dtype) for _ in decoder.blocks]
        self.cross_kv = [b.cross_attn.cross_kv(audio_features) for b in decoder.blocks]
        self.pad = pad  # (B,) int32: padding tokens before each row's prompt
        self.has_padding = bool(mx.any(pad > 0).item())

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def take(self, rows: mx.array) -> None:
        """Keep only `rows` (compaction after rows finish)."""
        for cache in self.caches:
            cache.take(rows)
        self.cross_kv = [kv.take(rows) for kv in self.cross_kv]
        self.pad = self.pad[rows]


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions, dtype=mx.float32):
        super().__init__()
        self.dims = dims
        self.dtype = dtype
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer, dtype)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer, dtype)
        # openai's default: all heads of the second half of the decoder layers
        heads = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
        heads[dims.n_text_layer // 2 :] = True
        self.alignment_heads = np.argwhere(heads)

    def set_alignment_heads(self, heads) -> None:
        heads = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
        if heads.size and (heads[:, 0].max() >= self.dims.n_text_layer or heads[:, 1].max() >= self.dims.n_text_head):
            raise ValueError("alignment heads outside the decoder's layers/heads")
        self.alignment_heads = heads

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)

    def embed_audio(self, mel: mx.array) -> mx.array:
        from .host_model import host_encoder_for  # it builds on this module

        host = host_encoder_for(self)
        if host is not None:  # MLX's CPU backend, float32, plain layers: the numpy encoder
            return mx.array(host(np.asarray(mel, dtype=np.float32)))
        return self.encoder(mel.astype(self.dtype))

    def new_state(self, audio_features: mx.array, pad: mx.array | None = None) -> DecoderState:
        if pad is None:
            pad = mx.zeros((audio_features.shape[0],), mx.int32)
        return DecoderState(self.decoder, audio_features, pad, self.dims.n_text_ctx)

    def step(self, tokens: mx.array, state: DecoderState, keep: int = 1) -> tuple[mx.array, mx.array]:
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
        total = state.offset + length
        mask = None
        if length > 1:  # causal within the new tokens
            causal = mx.arange(total)[None, :] > (mx.arange(length) + state.offset)[:, None]
            mask = mx.where(causal, -mx.inf, 0.0)[None, None]
        if state.has_padding:  # real tokens never attend to a row's left padding
            queries = mx.arange(state.offset, total)
            padded_key = mx.arange(total)[None, None, :] < state.pad[:, None, None]
            real_query = queries[None, :, None] >= state.pad[:, None, None]
            # padding positions still see themselves, so no softmax row is all -inf (0 * NaN = NaN)
            pad_mask = mx.where(padded_key & real_query, -mx.inf, 0.0)[:, None]
            mask = pad_mask if mask is None else mask + pad_mask
        return None if mask is None else mask.astype(self.dtype)

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
            attended, w = block.cross_attn.cross_with_weights(block.cross_attn_ln(x), audio_features)
            x = x + attended
            x = x + block.mlp(x)
            weights.append(w)
        return decoder.logits(decoder.ln(x)), weights
