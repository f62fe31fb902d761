"""The MLX backend: the pure-MLX model on whatever device MLX computes on (Metal, CUDA, CPU), in any
dtype, quantized or not."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..whisper import DecoderState, Whisper

CACHE_FLOOR_BYTES = 256 * 2**20  # a cache this small is always kept


class MLXBackend:
    name = "mlx"
    xp = mx

    def __init__(self, model: Whisper):
        self.model = model

    def encode(self, mels) -> mx.array:
        features = self.model.embed_audio(mx.array(mels))
        mx.eval(features)
        return features

    def stack(self, features: list) -> mx.array:
        return mx.stack(features)

    def new_state(self, features: mx.array, pad: np.ndarray, rows_per_window: int = 1) -> DecoderState:
        return self.model.new_state(features, mx.array(pad, dtype=mx.int32), rows_per_window)

    def prefill(self, state: DecoderState, tokens: np.ndarray, sot_index: int) -> tuple[mx.array, mx.array]:
        logits, hidden = self.model.step(mx.array(tokens, dtype=mx.int32), state)
        state.expand()
        return logits[:, -1], self.model.decoder.logits(hidden[:, sot_index])

    def first_token_logits(self, features: mx.array, tokens: np.ndarray) -> mx.array:
        return self.model.first_token_logits(mx.array(tokens, dtype=mx.int32), features)

    def step(self, state: DecoderState, tokens: mx.array) -> mx.array:
        return self.model.step(tokens[:, None], state)[0][:, -1]

    def submit(self, *arrays) -> None:
        mx.async_eval(*arrays)

    def to_host(self, array) -> np.ndarray:
        return np.array(array)

    def alignment_weights(
        self, tokens: np.ndarray, features, heads: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        logits, cross_weights = self.model.forward_with_cross_qk(mx.array(tokens), mx.array(features))
        picked = mx.stack([cross_weights[layer][0, head] for layer, head in heads])
        return np.array(logits[0]), np.array(picked.astype(mx.float32))

    def free_cached_buffers(self) -> None:
        """Between batches: MLX keeps freed buffers to reuse them; the next batch of the same shape reuses
        them, so they are released only once the cache outgrows the memory in use (batch shapes vary)."""
        if mx.get_cache_memory() > max(mx.get_active_memory(), CACHE_FLOOR_BYTES):
            mx.clear_cache()
