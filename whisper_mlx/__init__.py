"""whisper_mlx: OpenAI Whisper on MLX, fast (batched) and faithful to openai-whisper's semantics."""

from .runtime import preload_blas as _preload_blas

_preload_blas()  # before anything imports mlx.core

from . import model_methods  # noqa: E402, F401  (binds openai's model.transcribe/decode/detect_language)
from ._version import __version__  # noqa: E402
from .audio import load_audio, log_mel_spectrogram, pad_or_trim  # noqa: E402
from .backends import backend_info  # noqa: E402
from .decoding import DecodingOptions, DecodingResult, decode, detect_language  # noqa: E402
from .load_models import load_model  # noqa: E402
from .many import BatchEngine, transcribe_many  # noqa: E402
from .transcribe import transcribe  # noqa: E402

__all__ = [
    "BatchEngine",
    "DecodingOptions",
    "DecodingResult",
    "LightningWhisperMLX",
    "__version__",
    "available_models",
    "backend_info",
    "decode",
    "detect_language",
    "load_audio",
    "load_model",
    "log_mel_spectrogram",
    "pad_or_trim",
    "transcribe",
    "transcribe_many",
]


def __getattr__(name):
    # imported lazily: lightning pulls in the hub helpers, which most users never need
    if name == "LightningWhisperMLX":
        from .lightning import LightningWhisperMLX

        return LightningWhisperMLX
    if name == "available_models":
        from .hub import available_models

        return available_models
    raise AttributeError(f"module 'whisper_mlx' has no attribute {name!r}")
