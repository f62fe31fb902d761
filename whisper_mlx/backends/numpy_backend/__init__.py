"""The numpy backend: float32 Whisper on a CPU with numpy, threaded kernels and direct BLAS calls.

It serves models with plain (not quantized) float32 layers while MLX computes on the CPU, where MLX's
scalar elementwise kernels are the bottleneck. Its weights are views of the MLX model's parameters,
rebuilt when those are replaced.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...errors import BackendError
from ...runtime import on_cpu
from ...whisper import Whisper
from ..mlx_backend import MLXBackend
from .model import HostDecoder, HostDecoderState, HostEncoder, parameter_arrays


def unsupported_reason(model: Whisper) -> str | None:
    """Why the numpy backend cannot run this model here, or None when it can."""
    if not on_cpu():
        return "MLX computes on a GPU here; the numpy backend runs on the CPU only"
    layers = (nn.Linear, nn.Conv1d, nn.Embedding)
    for name, module in model.named_modules():
        if "Quantized" in type(module).__name__:
            return f"the model is quantized ({name or 'model'}); the numpy backend needs plain float32 layers"
        if isinstance(module, layers) and module.weight.dtype != mx.float32:
            return f"the model is {module.weight.dtype}; the numpy backend computes in float32 only"
    return None


class NumpyBackend:
    name = "numpy"
    xp = np

    def __init__(self, model: Whisper):
        self.model = model
        self._encoder: HostEncoder | None = None
        self._decoder: HostDecoder | None = None
        self._alignment = MLXBackend(model)  # word timing's forced decode: one small pass per window

    @property
    def encoder(self) -> HostEncoder:
        if self._encoder is None or not _same_parameters(self.model.encoder, self._encoder.sources):
            self._check_model()
            self._encoder = HostEncoder(self.model.encoder)
        return self._encoder

    @property
    def decoder(self) -> HostDecoder:
        if self._decoder is None or not _same_parameters(self.model.decoder, self._decoder.sources):
            self._check_model()
            self._decoder = HostDecoder(self.model.decoder)
        return self._decoder

    def _check_model(self) -> None:
        """The weights were replaced (or are read the first time): still plain float32 on the CPU?"""
        reason = unsupported_reason(self.model)
        if reason is not None:
            raise BackendError(
                f"the numpy backend cannot run this model: {reason} "
                "(load it with backend='mlx', or choose the backend after quantizing)"
            )

    def encode(self, mels) -> np.ndarray:
        mels = np.asarray(mels, dtype=np.float32)
        if mels.shape[0] == 1:
            return self.encoder(mels)
        return self.encoder.encode_windows(mels)

    def stack(self, features: list) -> np.ndarray:
        return np.stack(features)

    def new_state(self, features: np.ndarray, pad: np.ndarray, rows_per_window: int = 1) -> HostDecoderState:
        return self.decoder.new_state(features, np.asarray(pad), self.model.dims.n_text_ctx, rows_per_window)

    def prefill(self, state: HostDecoderState, tokens: np.ndarray, sot_index: int) -> tuple[np.ndarray, np.ndarray]:
        # only the two positions whose logits are read go through the last layer's attention and MLP
        hidden = state.decoder.hidden(np.asarray(tokens), state, keep=[tokens.shape[1] - 1, sot_index])
        state.expand()
        logits = state.decoder.logits(hidden.swapaxes(0, 1).reshape(-1, hidden.shape[-1]))
        return logits[: len(tokens)], logits[len(tokens) :]

    def first_token_logits(self, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        state = self.new_state(features, np.zeros(len(tokens), np.int64))
        return self.prefill(state, tokens, 0)[0]

    def step(self, state: HostDecoderState, tokens: np.ndarray) -> np.ndarray:
        decoder = state.decoder
        return decoder.logits(decoder.hidden(np.asarray(tokens)[:, None], state)[:, -1])

    def submit(self, *arrays) -> None:
        pass  # computed eagerly

    def to_host(self, array) -> np.ndarray:
        return np.array(array)

    def alignment_weights(self, tokens: np.ndarray, features, heads) -> tuple[np.ndarray, np.ndarray]:
        return self._alignment.alignment_weights(tokens, features, heads)

    def free_cached_buffers(self) -> None:
        """Between batches: the decoder keeps its caches' buffers for the next batch, up to the memory
        in use (see buffers.BufferPool.trim)."""
        if self._decoder is not None:
            self._decoder.pool.trim()


def _same_parameters(module, sources: list) -> bool:
    current = parameter_arrays(module)
    return len(current) == len(sources) and all(a is b for a, b in zip(current, sources))
