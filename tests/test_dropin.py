"""openai-whisper's and mlx-whisper's users' own idioms, as their READMEs and test suites write them,
with whisper_mlx in place of `whisper` / `mlx_whisper`."""

import base64
import gzip

import mlx.core as mx
import numpy as np
import pytest

import whisper_mlx
import whisper_mlx as whisper  # openai: import whisper
from whisper_mlx import audio, decoding, load_models, runtime  # mlx-whisper: from mlx_whisper import ...
from whisper_mlx.tokenizer import get_tokenizer

JFK_BEAM5 = (
    " And so, my fellow Americans ask not what your country can do for you ask what you can do for your country."
)
LS_GREEDY = (
    "Then the goods sold openly, shorted the burden she had borne so long in secret and bravely trudged on alone."
)


@pytest.fixture(scope="module")
def loaded(tiny_en_dir):
    return whisper.load_model(str(tiny_en_dir))  # openai: whisper.load_model("tiny.en")


def test_openai_model_transcribe(loaded, data_dir):
    """openai's tests/test_transcribe.py, on tiny.en."""
    result = loaded.transcribe(str(data_dir / "jfk.flac"), language="en", temperature=0.0, word_timestamps=True)
    assert result["language"] == "en"
    assert result["text"] == "".join([s["text"] for s in result["segments"]])
    transcription = result["text"].lower()
    assert "my fellow americans" in transcription
    assert "your country" in transcription
    assert "do for you" in transcription
    tokenizer = get_tokenizer(loaded.is_multilingual, num_languages=loaded.num_languages)
    all_tokens = [t for s in result["segments"] for t in s["tokens"]]
    assert tokenizer.decode(all_tokens) == result["text"]
    assert tokenizer.decode_with_timestamps(all_tokens).startswith("<|0.00|>")
    timing_checked = False
    for segment in result["segments"]:
        for timing in segment["words"]:
            assert timing["start"] < timing["end"]
            if timing["word"].strip(" ,") == "Americans":
                assert timing["start"] <= 1.8
                assert timing["end"] >= 1.8
                timing_checked = True
    assert timing_checked


def test_model_transcribe_takes_transcribes_options(loaded, data_dir):
    import inspect

    method = inspect.signature(loaded.transcribe).parameters
    function = inspect.signature(whisper_mlx.transcribe).parameters
    assert list(method) == [p for p in function if p not in ("model", "path_or_hf_repo")]
    path = str(data_dir / "jfk.flac")
    assert loaded.transcribe(path, beam_size=5, best_of=5) == whisper_mlx.transcribe(
        path, model=loaded, beam_size=5, best_of=5
    )


def test_openai_readme_lower_level_access(base_model, data_dir):
    """openai's README: load_audio, pad_or_trim, log_mel_spectrogram, model.detect_language, decode."""
    model = base_model
    samples = whisper.load_audio(str(data_dir / "jfk.flac"))
    samples = whisper.pad_or_trim(samples)
    mel = whisper.log_mel_spectrogram(samples, n_mels=model.dims.n_mels)
    _, probs = model.detect_language(mel)
    assert max(probs, key=probs.get) == "en"
    options = whisper.DecodingOptions()
    result = whisper.decode(model, mel, options)
    assert "fellow Americans" in result.text
    beams = model.decode(mel, whisper.DecodingOptions(beam_size=5, patience=1.0))
    assert "fellow Americans" in beams.text and beams.language == "en"


def test_mlx_whisper_decode_idioms(base_model, data_dir):
    """mlx-whisper's test.py: lang_id, greedy, a tiny temperature, fp16=False."""
    data = audio.pad_or_trim(audio.load_audio(str(data_dir / "ls_test.flac")))
    mels = audio.log_mel_spectrogram(data)
    options = decoding.DecodingOptions(task="lang_id", fp16=False)
    result = decoding.decode(base_model, mels, options)
    assert result.language == "en"
    assert len(result.language_probs) == 99
    assert result.language_probs["en"] == pytest.approx(max(result.language_probs.values()))
    assert result.tokens == [] and result.text == ""  # no text decoded
    greedy = decoding.decode(base_model, mels, fp16=False)
    assert greedy.language == "en" and "so long in secret and bravely" in greedy.text
    tiny_temperature = decoding.decode(base_model, mels, temperature=1e-8, fp16=False)
    assert tiny_temperature.text == greedy.text


def test_lang_id_of_a_batch_and_of_an_english_only_model(base_model, tiny_en, data_dir):
    mels = np.stack(
        [
            audio.pad_or_trim(audio.log_mel_spectrogram(str(data_dir / f)), 3000, axis=0)
            for f in ("jfk.flac", "french_tts.flac")
        ]
    )
    results = whisper.decode(base_model, mels, whisper.DecodingOptions(task="lang_id"))
    assert [r.language for r in results] == ["en", "fr"]
    with pytest.raises(whisper_mlx.errors.DecodingError):  # openai: no language tokens, no lang id
        whisper.decode(tiny_en, mels[0], whisper.DecodingOptions(task="lang_id"))
    with pytest.raises(whisper_mlx.errors.DecodingError):
        whisper.transcribe(str(data_dir / "jfk.flac"), model=tiny_en, task="lang_id")


def test_mlx_whisper_load_model_and_transcribe(tiny_en_dir, data_dir):
    model = load_models.load_model(str(tiny_en_dir), dtype=mx.float32)
    assert model.dims.n_vocab == 51864
    result = whisper_mlx.transcribe(str(data_dir / "ls_test.flac"), fp16=False)  # the default (tiny.en) model
    assert result["text"] == " " + LS_GREEDY


@pytest.fixture
def default_device():
    """MLX's default device, restored after the test (load_model(device=...) sets it for the process)."""
    before = mx.default_device()
    yield before
    mx.set_default_device(before)


def test_openai_load_model_keywords(tiny_en_dir, tmp_path, monkeypatch, default_device):
    """openai: whisper.load_model(name, device=..., download_root=..., in_memory=...)."""
    model = whisper.load_model(str(tiny_en_dir), device="cpu", download_root=str(tmp_path), in_memory=True)
    assert model.dims.n_vocab == 51864 and mx.default_device() == mx.cpu
    with pytest.raises(ValueError, match="device must be"):
        whisper.load_model(str(tiny_en_dir), device="tpu")
    if runtime.gpu_available():
        whisper.load_model(str(tiny_en_dir), device="cuda:0")
        assert mx.default_device() == mx.gpu
    else:
        with pytest.raises(ValueError, match="no GPU"):
            whisper.load_model(str(tiny_en_dir), device="cuda")
    asked = []
    monkeypatch.setattr(
        load_models.hub, "download", lambda repo, subfolder=None, cache_dir=None: asked.append(cache_dir) or tiny_en_dir
    )
    whisper.load_model("tiny.en", download_root=str(tmp_path / "models"))  # openai's download_root: where models go
    assert asked == [str(tmp_path / "models")]


def test_beam_search_where_the_mlx_runtimes_raise(tiny_en, data_dir):
    """mlx-whisper 0.4.3 and lightning raise NotImplementedError for any beam_size, even 1."""
    from whisper_mlx import LightningWhisperMLX

    path = str(data_dir / "ls_test.flac")
    assert whisper_mlx.transcribe(path, model=tiny_en, beam_size=1)["text"] == " " + LS_GREEDY
    assert "trudged on alone" in whisper_mlx.transcribe(path, model=tiny_en, beam_size=5, patience=1.0)["text"]
    lightning = LightningWhisperMLX(batch_size=4)
    assert (
        lightning.transcribe(path, beam_size=5)["text"]
        == whisper_mlx.transcribe(path, model=tiny_en, beam_size=5)["text"]
    )


def test_openai_alignment_heads_dump(tiny_en):
    """openai's set_alignment_heads takes its base85 dump of a gzipped boolean mask."""
    mask = np.zeros((tiny_en.dims.n_text_layer, tiny_en.dims.n_text_head), bool)
    mask[2, 3] = mask[3, 0] = True
    previous = tiny_en.alignment_heads
    try:
        tiny_en.set_alignment_heads(base64.b85encode(gzip.compress(mask.tobytes())))
        assert tiny_en.alignment_heads.tolist() == [[2, 3], [3, 0]]
    finally:
        tiny_en.set_alignment_heads(previous)


def test_cli_beam_flags(data_dir, tmp_path):
    """openai's CLI flags --beam_size/--patience/--length_penalty, in mlx-whisper's kebab-case spelling."""
    from whisper_mlx import cli

    args = cli.build_parser().parse_args(["a.flac", "--beam-size", "5", "--patience", "2", "--length-penalty", "0.5"])
    options = cli.build_transcribe_options(args)
    assert (options["beam_size"], options["patience"], options["length_penalty"], options["best_of"]) == (
        5,
        2.0,
        0.5,
        5,
    )
    defaults = cli.build_transcribe_options(cli.build_parser().parse_args(["a.flac"]))
    assert defaults["beam_size"] is None and defaults["patience"] is None and defaults["length_penalty"] is None
    status = cli.main([str(data_dir / "jfk.flac"), "--beam-size", "5", "-o", str(tmp_path), "--quiet"])
    assert status == 0
    written = " ".join((tmp_path / "jfk.txt").read_text().split())  # one line per segment
    assert written == JFK_BEAM5.strip()
