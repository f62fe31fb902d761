"""Models users actually run, at their real shapes but narrow widths and random weights: large-v3 and
large-v3-turbo (128 mel bins, a 51866-token vocabulary with 100 languages, 32 or 4 decoder layers cut to
2-4) and distil-large-v3 (2 decoder layers), through transcribe and LightningWhisperMLX, sequential and
batched; float16 and mlx-community's quantized layout (4/8-bit with float16 scales) on the MLX backend."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import whisper_mlx
from whisper_mlx.backends import backend_for
from whisper_mlx.dims import ModelDimensions
from whisper_mlx.formats import Checkpoint
from whisper_mlx.formats.mlx import write_mlx_checkpoint
from whisper_mlx.tokenizer import LANGUAGES, get_tokenizer
from whisper_mlx.whisper import Whisper

SHAPES = {  # narrow widths, the real vocabulary, mel bins and layer pattern
    "large-v3": {"n_text_layer": 4},
    "large-v3-turbo": {"n_text_layer": 4},
    "distil-large-v3": {"n_text_layer": 2},
}
AUDIO_SECONDS = 40  # two windows: batched mode has two lanes at most, sequential seeks once


def dims_of(name: str) -> ModelDimensions:
    return ModelDimensions(
        n_mels=128,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=51866,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        **SHAPES[name],
    )


def random_model(name: str, dtype=mx.float32, seed: int = 0) -> Whisper:
    mx.random.seed(seed)
    model = Whisper(dims_of(name), dtype)
    model.update(tree_map(lambda a: (mx.random.normal(a.shape) * 0.05).astype(dtype), model.parameters()))
    return model


def audio() -> np.ndarray:
    t = np.arange(16000 * AUDIO_SECONDS) / 16000
    return (0.1 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.3 * t) > 0)).astype(np.float32)


def check_result(result: dict) -> None:
    segments = result["segments"]
    assert result["text"] == "".join(s["text"] for s in segments)
    assert result["language"] in LANGUAGES
    previous = 0.0
    for s in segments:
        assert previous - 1e-6 <= s["start"] <= s["end"] <= AUDIO_SECONDS + 0.02
        previous = s["end"]


def test_the_large_v3_vocabulary_has_100_languages():
    model = random_model("large-v3")
    assert model.is_multilingual and model.num_languages == 100
    assert len(get_tokenizer(True, num_languages=model.num_languages).all_language_codes) == 100


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("batch_size", [1, 4])
def test_transcribe_at_large_model_shapes(name, batch_size):
    model = random_model(name)
    result = whisper_mlx.transcribe(
        audio(), model=model, batch_size=batch_size, sample_len=12, temperature=0.0, word_timestamps=batch_size == 1
    )
    check_result(result)


@pytest.mark.parametrize("layout", ["float16", "q4-float16-scales", "q8-float16-scales"])
def test_half_and_quantized_layouts_on_the_mlx_backend(layout):
    model = random_model("large-v3-turbo", mx.float16)
    if layout.startswith("q"):
        nn.quantize(
            model,
            group_size=32,
            bits=int(layout[1]),
            class_predicate=lambda _, m: isinstance(m, (nn.Linear, nn.Embedding)),
        )
        scales = [a for k, a in tree_flatten(model.parameters()) if k.endswith(".scales")]
        assert scales and all(s.dtype == mx.float16 for s in scales)  # mlx-community's layout
    assert backend_for(model).name == "mlx"
    # quantized matmuls in float16 are slow on MLX's CPU device: one window, batched, for those
    runs = [(audio(), 1), (audio(), 4)] if layout == "float16" else [(audio()[: 16000 * 20], 4)]
    for samples, batch_size in runs:
        check_result(
            whisper_mlx.transcribe(samples, model=model, batch_size=batch_size, sample_len=12, temperature=0.0)
        )


def test_lightning_loads_a_large_v3_turbo_shaped_checkpoint(tmp_path):
    model = random_model("large-v3-turbo")
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    write_mlx_checkpoint(Checkpoint(model.dims, weights), tmp_path / "turbo")
    whisper = whisper_mlx.LightningWhisperMLX(model=str(tmp_path / "turbo"), batch_size=4)
    assert whisper.model.dims == model.dims
    check_result(whisper.transcribe(audio(), sample_len=12, temperature=0.0))
