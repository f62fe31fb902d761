"""openai-whisper's methods of a loaded model: `model.transcribe(audio, **options)`, `model.decode(mel,
options)`, `model.detect_language(mel)`.

openai's model class holds them as attributes; here the model module (whisper.py) is pure MLX and knows
none of the algorithms, so they are bound to the Whisper class from this module, which the package
imports.
"""

from __future__ import annotations

import inspect
from typing import Any

from .decoding import DecodingOptions, decode, detect_language
from .tokenizer import Tokenizer
from .transcribe import transcribe
from .whisper import Whisper

__all__ = ["bind_model_methods"]


def model_transcribe(self: Whisper, audio, **options) -> dict:
    """openai's model.transcribe: whisper_mlx.transcribe(audio, model=self, **options), same options."""
    return transcribe(audio, model=self, **options)


def model_decode(self: Whisper, mel, options: DecodingOptions | None = None, **kwargs) -> Any:
    """openai's model.decode: whisper_mlx.decode(self, mel, options, **kwargs)."""
    return decode(self, mel, options or DecodingOptions(), **kwargs)


def model_detect_language(self: Whisper, mel=None, tokenizer: Tokenizer | None = None) -> Any:
    """openai's model.detect_language: whisper_mlx.detect_language(self, mel, tokenizer)."""
    return detect_language(self, mel, tokenizer)


def _method_signature() -> inspect.Signature:
    """transcribe's signature as a method of the model: self, audio, then every option but the model."""
    parameters = list(inspect.signature(transcribe).parameters.values())
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    kept = [p for p in parameters if p.name not in ("model", "path_or_hf_repo")]
    return inspect.Signature([self_parameter, *kept], return_annotation=dict)


def bind_model_methods() -> None:
    model_transcribe.__signature__ = _method_signature()  # type: ignore[attr-defined]
    for name, method in (
        ("transcribe", model_transcribe),
        ("decode", model_decode),
        ("detect_language", model_detect_language),
    ):
        setattr(Whisper, name, method)


bind_model_methods()
