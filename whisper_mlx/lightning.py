"""lightning-whisper-mlx's entry point, kept for its users, with openai's result schema.

Unlike lightning 0.0.10 it loads through the Hugging Face cache (never into the working directory),
loads quantized models correctly, and batches windows cut at silences so no text is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .load_models import default_model_path, get_cached_model
from .many import BatchEngine, transcribe_many
from .transcribe import transcribe


class LightningWhisperMLX:
    """LightningWhisperMLX(model, batch_size=12, quant=None).transcribe(audio_path, language=None)

    model: a short name ("tiny", "base.en", "large-v3", "distil-medium.en", "turbo", ...), a Hugging Face
    repo id or a local path (any supported format); None uses the installed tiny.en package.
    quant: None, "4bit" or "8bit" (picks mlx-community's quantized repos for short names).
    """

    def __init__(self, model: str | None = None, batch_size: int = 12, quant: str | None = None, dtype=None):
        if quant not in (None, "4bit", "8bit"):
            raise ValueError(f"quant must be None, '4bit' or '8bit', got {quant!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.name = str(model) if model is not None else str(default_model_path())
        self.batch_size = batch_size
        self.quant = quant
        self.model = get_cached_model(self.name, dtype, quant=quant)

    def transcribe(self, audio_path, language: str | None = None, beam_size: int | None = None, **options):
        """openai's result dict: {"text", "segments": [{"id", "start", "end", "text", ...}], "language"}.
        beam_size: beams searched per window (None: greedy); other options as whisper_mlx.transcribe's.
        A list of inputs gives a list of result dicts in input order, the inputs decoded together in
        shared batches; the first input (in list order) that fails raises its error and the inputs not
        yet finished are cancelled (transcribe_many reports errors per input instead)."""
        options.setdefault("batch_size", self.batch_size)
        if isinstance(audio_path, list):
            return self._transcribe_list(audio_path, language=language, beam_size=beam_size, **options)
        return transcribe(audio_path, model=self.model, language=language, beam_size=beam_size, **options)

    def transcribe_many(self, inputs: Iterable, **options) -> Iterator[tuple[object, dict | BaseException]]:
        """(input, result dict or its exception) as each input completes; see whisper_mlx.transcribe_many."""
        options.setdefault("batch_size", self.batch_size)
        return transcribe_many(inputs, model=self.model, **options)

    def _transcribe_list(self, inputs: list, **options) -> list[dict]:
        with BatchEngine(self.model, batch_size=max(self.batch_size, options["batch_size"])) as engine:
            futures = [engine.submit(audio, **options) for audio in inputs]
            return [future.result() for future in futures]
