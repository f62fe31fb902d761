"""The one interface between the algorithms (decoding, long-form, word timing) and the hardware.

openai-whisper's `Inference` and mlx-lm's cache protocol are the models: a backend encodes windows,
starts a decoder state for a batch of rows (left-padded prompts), feeds a prompt or one step of tokens
and hands back logits, keeps a subset of rows, and gives the alignment heads' cross-attention weights.
Arrays that stay on the backend (encoder outputs, logits, per-row flags) are of its array module `xp`
(`mlx.core` or `numpy`); the decoding code is written once over `xp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class DecoderState(Protocol):
    """Caches of one batch of windows: cross-attention keys/values (one per window), and per row
    self-attention keys/values and padding. A window has `rows_per_window` consecutive rows (its beams;
    1 for greedy and sampled decoding), which share its cross-attention keys/values."""

    @property
    def offset(self) -> int: ...

    def take(self, windows: Any) -> None:
        """Keep only `windows` (an xp index array), with their rows, in that order."""

    def rearrange(self, rows: Any) -> None:
        """Row i continues row rows[i] (an xp index array, a row of the same window): its self-attention
        keys/values after the prompt become that row's (beams reordered after a step)."""


class Backend(Protocol):
    name: str  # "mlx" or "numpy"

    @property
    def xp(self) -> Any:
        """The array module of features, logits and per-row state."""

    def encode(self, mels: Any) -> Any:
        """Encoder outputs (B, n_audio_ctx, n_state) of log-mel windows (B, n_frames, n_mels), numpy or
        mlx, evaluated."""

    def stack(self, features: list) -> Any:
        """Encoder outputs of single windows (n_audio_ctx, n_state) stacked into a batch."""

    def new_state(self, features: Any, pad: np.ndarray, rows_per_window: int = 1) -> DecoderState:
        """A decoder state for the windows of `features` (W, T, D), window i's prompt left-padded by pad[i]
        tokens, with `rows_per_window` rows per window."""

    # `state: Any` below: a backend takes only the DecoderState its own new_state made
    def prefill(self, state: Any, tokens: np.ndarray, sot_index: int) -> tuple[Any, Any]:
        """Feed the prompts (W, L), one per window; logits (W, n_vocab) at the last position and at
        `sot_index`. Afterwards every row of a window holds its prompt."""

    def first_token_logits(self, features: Any, tokens: np.ndarray) -> Any:
        """Logits (W, n_vocab) of one token per window (W, 1) at position 0, keeping no decoder state
        (language detection reads <|startoftranscript|>'s)."""

    def step(self, state: Any, tokens: Any) -> Any:
        """Feed one token per row (W·rows_per_window,); logits (rows, n_vocab) of the next position."""

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
