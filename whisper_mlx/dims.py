"""Model dimensions and the encoder's fixed position table, without MLX: checkpoint readers and
converters use them without importing the model."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import numpy as np


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
    def from_dict(cls, config: dict) -> ModelDimensions:
        fields = inspect.signature(cls).parameters
        missing = [name for name in fields if name not in config]
        if missing:
            raise KeyError(f"model config lacks {', '.join(missing)}")
        return cls(**{name: int(config[name]) for name in fields})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.n_vocab - 51765 - int(self.is_multilingual)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> np.ndarray:
    """Sinusoidal position embedding of the audio encoder, (length, channels) float32."""
    if channels % 2:
        raise ValueError(f"sinusoids need an even channel count, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_timescale_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)
