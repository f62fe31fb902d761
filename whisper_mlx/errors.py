"""Exceptions raised by whisper_mlx. Each also derives from the builtin a caller would expect."""


class WhisperMLXError(Exception):
    """Base class for every error whisper_mlx raises on purpose."""


class AudioError(WhisperMLXError, ValueError):
    """The audio input cannot be used: missing, unreadable, empty, non-finite, wrong shape or dtype."""


class ModelNotFoundError(WhisperMLXError, FileNotFoundError):
    """A model name, hub id or path that resolves to nothing usable."""


class ModelFormatError(WhisperMLXError, ValueError):
    """A model directory or weights file that is incomplete, truncated, unsafe or inconsistent."""


class DecodingError(WhisperMLXError, ValueError):
    """Invalid decoding or transcription options."""


class WhisperMLXWarning(UserWarning):
    """Base class for the warnings whisper_mlx issues."""


class AudioTruncatedWarning(WhisperMLXWarning):
    """The audio file decoded to much less than the duration it declares (likely truncated)."""


class BackendError(WhisperMLXError, ValueError):
    """A backend that does not exist, or cannot run the model on this machine."""
