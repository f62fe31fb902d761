"""The one interface between the algorithms (decoding, long-form, word timing) and the hardware.

openai-whisper's `Inference` and mlx-lm's cache protocol are the models: a backend encodes windows,
starts a decoder state for a batch of rows (left-padded prompts), feeds a prompt or one step of tokens
and hands back logits, keeps a subset of rows, and gives the alignment heads' cross-attention weights.
Arrays that stay on the backend (encoder outputs, logits, per-row flags) are of its array module `xp`
(`mlx.core` or `numpy`); the decoding code is written once over `xp`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np


class DecoderState(Protocol):
    """Caches of one batch of rows: self-attention keys/values, cross-attention keys/values, padding."""

    @property
    def offset(self) -> int: ...

    def take(self, rows: Any) -> None:
        """Keep only `rows` (an xp index array), in that order."""


class AheadEncoder(Protocol):
    """Windows being encoded in the background while the caller decodes."""

    def withdraw(self, keys: list) -> list:
        """The keys among `keys` not started yet: the caller encodes those itself."""

    def result(self, key: Hashable) -> Any:
        """The encoder output (n_audio_ctx, n_state) of a started window, once done."""

    def sharing_cores(self) -> AbstractContextManager:
        """A context for the caller's decoding while the background encoder runs."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # "mlx" or "numpy"

    @property
    def xp(self) -> Any:
        """The array module of features, logits and per-row state."""

    def encode(self, mels: Any) -> Any:
        """Encoder outputs (B, n_audio_ctx, n_state) of log-mel windows (B, n_frames, n_mels), numpy or
        mlx, evaluated."""

    def encode_ahead(self, mels: dict) -> AheadEncoder | None:
        """Start encoding keyed windows beside the caller's decoding, or None where that does not pay."""

    def stack(self, features: list) -> Any:
        """Encoder outputs of single windows (n_audio_ctx, n_state) stacked into a batch."""

    def new_state(self, features: Any, pad: np.ndarray) -> DecoderState:
        """A decoder state for the rows of `features`, row i's prompt left-padded by pad[i] tokens."""

    # `state: Any` below: a backend takes only the DecoderState its own new_state made
    def prefill(self, state: Any, tokens: np.ndarray, sot_index: int) -> tuple[Any, Any]:
        """Feed the prompts (B, L); logits (B, n_vocab) at the last position and at `sot_index`."""

    def step(self, state: Any, tokens: Any) -> Any:
        """Feed one token per row (B,); logits (B, n_vocab) of the next position."""

    def submit(self, *arrays: Any) -> None:
        """Start evaluating arrays without waiting (a no-op where arrays are computed eagerly)."""

    def to_host(self, array: Any) -> np.ndarray:
        """A numpy copy of a backend array: waits for it."""

    def alignment_weights(
        self, tokens: np.ndarray, features: Any, heads: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Forced decode of tokens (1, L): logits (L, n_vocab) and the (layer, head) pairs' cross-attention
        weights (n_heads, L, n_audio_ctx), softmaxed over all audio positions."""

    def free_cached_buffers(self) -> None:
        """Between batches of different shapes: release what the array library keeps for reuse."""
