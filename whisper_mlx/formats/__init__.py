"""Readers (and writers) for the Whisper checkpoint formats whisper_mlx understands.

Every reader returns a `Checkpoint`: model dimensions, weights as numpy arrays under mlx-whisper's
parameter names (conv weights laid out (out, kernel, in) as MLX wants), and optional extras.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..dims import ModelDimensions


@dataclass
class Checkpoint:
    dims: ModelDimensions
    weights: dict[str, np.ndarray]
    alignment_heads: np.ndarray | None = None  # (n, 2) rows of (layer, head)
    quantization: dict | None = None  # {"group_size": int, "bits": int} for MLX-quantized weights
    source_format: str = ""
    extras: dict = field(default_factory=dict)
