"""The MLX backend end to end with the real tiny.en weights, whatever the suite's default backend: float16,
8-bit and 4-bit quantized weights (quantized here from the float weights) decoding real audio, the
batched encoder, and row compaction on the device."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import whisper_mlx
from whisper_mlx.audio import load_audio, log_mel_spectrogram, pad_or_trim
from whisper_mlx.backends import backend_for
from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.load_models import default_model_path, load_model

JFK = " And so my fellow Americans ask not what your country can do for you ask what you can do for your country"


def quantized_tiny_en(bits: int):
    model = load_model(default_model_path(), backend="mlx")
    nn.quantize(
        model, group_size=64, bits=bits, class_predicate=lambda _, module: isinstance(module, (nn.Linear, nn.Embedding))
    )
    return model


@pytest.fixture(scope="module")
def tiny_en_fp16():
    return load_model(default_model_path(), dtype=mx.float16)


def test_float16_model_runs_on_mlx_and_keeps_the_golden(tiny_en_fp16, data_dir):
    assert backend_for(tiny_en_fp16).name == "mlx"  # auto: numpy never takes float16
    result = whisper_mlx.transcribe(str(data_dir / "jfk.flac"), model=tiny_en_fp16, word_timestamps=True)
    assert result["text"] == JFK
    words = [w for s in result["segments"] for w in s["words"]]
    assert "".join(w["word"] for w in words) == JFK
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and starts[0] >= 0 and words[-1]["end"] <= 11.1


@pytest.mark.parametrize(
    "bits, text",
    [
        (8, JFK),
        (
            4,
            " And so my fellow Americans ask not what your country can do for you Ask what you can do for your country",
        ),
    ],
)
def test_quantized_models_decode_real_audio(bits, text, data_dir):
    model = quantized_tiny_en(bits)
    assert any("Quantized" in type(m).__name__ for _, m in model.named_modules())
    assert whisper_mlx.backend_info(model)["backend"] == "mlx"
    assert whisper_mlx.transcribe(str(data_dir / "jfk.flac"), model=model)["text"] == text


def test_batched_encoder_equals_one_window_at_a_time(tiny_en, data_dir):
    audio = load_audio(str(data_dir / "ls_test.flac"))
    mels = np.stack([pad_or_trim(np.array(log_mel_spectrogram(a)), 3000, axis=0) for a in (audio, audio[16000:])])
    backend = MLXBackend(tiny_en)
    together = np.array(backend.encode(mels))
    for i in range(2):
        np.testing.assert_allclose(together[i], np.array(backend.encode(mels[i : i + 1]))[0], rtol=1e-4, atol=1e-4)


def test_rows_dropped_on_the_device_decode_as_alone(tiny_en, data_dir):
    """Rows of different lengths in one batch: finished rows are compacted away (self-attention caches and
    cross-attention keys/values gathered on the device), and every row decodes as it does alone."""
    from whisper_mlx.decoding import DecodingOptions, DecodingTask

    backend = MLXBackend(tiny_en)
    clips = [load_audio(str(data_dir / f)) for f in ("jfk.flac", "ls_test.flac")]
    clips += [clips[0][: 16000 * 3], clips[1][: 16000 * 2]]
    features = backend.encode(np.stack([pad_or_trim(np.array(log_mel_spectrogram(c)), 3000, axis=0) for c in clips]))
    task = DecodingTask(tiny_en, DecodingOptions(language="en"), backend=backend)
    together = task.run(features)
    lengths = [len(r.tokens) for r in together]
    assert max(lengths) > 2 * min(lengths), lengths  # short rows finish first and are dropped
    for i, result in enumerate(together):
        alone = task.run(features[i : i + 1])[0]
        assert result.tokens == alone.tokens
        assert result.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
