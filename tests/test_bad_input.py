"""Bad inputs give a clear WhisperMLXError (Python API) or a one-line message and exit status 1 (CLI).

Behaviour, case by case:

* missing file, directory, empty file, WAV header with 0 samples, text file named .wav, MP3 cut to
  its header: AudioError naming the file and the problem; CLI exit 1, no traceback. The last two
  read the same, one line without ffmpeg's banner, whether PyAV alone decodes or the ffmpeg
  command is installed (then it is the fallback).
* MP3 cut in half: the decodable half is transcribed, with an AudioTruncatedWarning (the MP3's
  Xing/Info header declares 11 s) that the CLI prints as a warning line; exit 0.
* 20 s of digital silence (file or array): no text, or only segments with no_speech_prob > 0.6.
* arrays with NaN/inf, int16, complex or 2-D (stereo) samples, or no samples: AudioError.
* unknown model name: ModelNotFoundError; directory without weights, or weights whose shapes do not
  fit config.json (another model size): ModelFormatError; CLI "cannot load the model", exit 1.
"""

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

import whisper_mlx
from whisper_mlx.audio import SAMPLE_RATE
from whisper_mlx.errors import (
    AudioError,
    AudioTruncatedWarning,
    ModelFormatError,
    ModelNotFoundError,
)
from whisper_mlx.load_models import load_model

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CLI_TIMEOUT = 180
# whisper base's dimensions: tiny.en's weights cannot fill them
BASE_DIMS = {
    "n_audio_state": 512,
    "n_text_state": 512,
    "n_audio_head": 8,
    "n_text_head": 8,
    "n_audio_layer": 6,
    "n_text_layer": 6,
}


@pytest.fixture(scope="module")
def model(tiny_en_dir, tiny_en):
    return tiny_en


def write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.astype(np.int16).tobytes())
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    """Every bad audio file, written once."""
    from test_audio import write_mp3

    root = tmp_path_factory.mktemp("bad_audio")
    (root / "a_directory.wav").mkdir()
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("these are meeting notes, not audio\n" * 20)
    write_mp3(whisper_mlx.load_audio(DATA / "jfk.flac"), root / "jfk.mp3")
    mp3 = (root / "jfk.mp3").read_bytes()
    (root / "header_only.mp3").write_bytes(mp3[:200])  # the ID3 tag and part of the first frame
    (root / "half.mp3").write_bytes(mp3[: len(mp3) // 2])
    write_wav(root / "zero_samples.wav", np.zeros(0, np.int16))
    write_wav(root / "silence.wav", np.zeros(20 * SAMPLE_RATE, np.int16))
    return {path.name: path for path in root.iterdir()} | {"missing.wav": root / "missing.wav"}


# (file name, text the error must contain)
FILE_CASES = [
    ("missing.wav", "no such"),
    ("a_directory.wav", "is a directory"),
    ("empty.wav", "is empty"),
    ("zero_samples.wav", "no audio samples"),
    ("notes.wav", "not a readable audio file"),
    ("header_only.mp3", "not a readable audio file"),
]


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "whisper_mlx", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.parametrize(("name", "problem"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_python_api(name, problem, bad_files, model):
    with pytest.raises(AudioError, match=problem) as caught:
        whisper_mlx.transcribe(str(bad_files[name]), model=model)
    assert name in str(caught.value)


@pytest.mark.parametrize(("name", "problem"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_cli(name, problem, bad_files, tiny_en_dir, tmp_path):
    done = run_cli(str(bad_files[name]), "--model", str(tiny_en_dir), "-o", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert f"whisper_mlx: error: {bad_files[name]}: " in done.stderr
    assert problem in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


UNDECODABLE = ["notes.wav", "header_only.mp3"]


def assert_one_line_unreadable(message: str, path: Path) -> None:
    assert message.startswith(f"{path}: not a readable audio file (") and message.endswith(")"), message
    assert "\n" not in message and "libav" not in message and "ffmpeg version" not in message, message


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_file_python_api_is_one_line(name, bad_files, model, ffmpeg_command):
    with pytest.raises(AudioError) as caught:
        whisper_mlx.transcribe(str(bad_files[name]), model=model)
    assert_one_line_unreadable(str(caught.value), bad_files[name])


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_file_cli_is_one_line(name, bad_files, tiny_en_dir, tmp_path, ffmpeg_command):
    done = run_cli(str(bad_files[name]), "--model", str(tiny_en_dir), "-o", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    prefix = "whisper_mlx: error: "
    assert line.startswith(prefix), line
    assert_one_line_unreadable(line[len(prefix) :], bad_files[name])


def test_half_mp3_transcribes_the_decodable_part_with_a_warning(bad_files, model):
    with pytest.warns(AudioTruncatedWarning, match="probably truncated"):
        result = whisper_mlx.transcribe(str(bad_files["half.mp3"]), model=model)
    text = result["text"].lower()
    assert "fellow americans" in text and "your country" not in text
    assert result["segments"] and result["segments"][-1]["end"] <= 6.0


def test_half_mp3_cli_warns_and_succeeds(bad_files, tiny_en_dir, tmp_path):
    done = run_cli(str(bad_files["half.mp3"]), "--model", str(tiny_en_dir), "-o", str(tmp_path), "-f", "json")
    assert done.returncode == 0, done.stderr
    assert f"whisper_mlx: warning: {bad_files['half.mp3']}: decoded only" in done.stderr
    assert "fellow americans" in json.loads((tmp_path / "half.json").read_text())["text"].lower()


def assert_silence_result(result: dict) -> None:
    """Nothing transcribed, or only segments the model itself flags as probably not speech."""
    for segment in result["segments"]:
        assert segment["no_speech_prob"] > 0.6, f"hallucinated speech in silence: {segment}"
    if not result["segments"]:
        assert result["text"].strip() == ""


def test_silence_file(bad_files, model):
    assert_silence_result(whisper_mlx.transcribe(str(bad_files["silence.wav"]), model=model))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_silence_array(batch_size, model):
    silence = np.zeros(20 * SAMPLE_RATE, np.float32)
    assert_silence_result(whisper_mlx.transcribe(silence, model=model, batch_size=batch_size))


ARRAY_CASES = [
    ("nan", np.array([0.0, np.nan, 0.1] * SAMPLE_RATE, np.float32), "NaN or infinite"),
    ("inf", np.array([0.0, np.inf, -np.inf] * SAMPLE_RATE, np.float32), "NaN or infinite"),
    ("int16", np.zeros(SAMPLE_RATE, np.int16), "dtype int16"),
    ("complex", np.zeros(SAMPLE_RATE, np.complex64), "dtype complex64"),
    ("stereo", np.zeros((2, SAMPLE_RATE), np.float32), r"1-D mono.*shape \(2, 16000\)"),
    ("stereo-interleaved", np.zeros((SAMPLE_RATE, 2), np.float32), r"1-D mono.*shape \(16000, 2\)"),
    ("empty", np.zeros(0, np.float32), "empty"),
]


@pytest.mark.parametrize(("name", "samples", "problem"), ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_bad_array(name, samples, problem, model):
    with pytest.raises(AudioError, match=problem):
        whisper_mlx.transcribe(samples, model=model)


def test_bad_mlx_array(model):
    import mlx.core as mx

    with pytest.raises(AudioError, match="NaN or infinite"):
        whisper_mlx.transcribe(mx.array([0.0, float("nan")] * SAMPLE_RATE), model=model)


# ---- models ----


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_en_dir) -> dict:
    """A directory without weights, and tiny.en weights under configs of other sizes."""
    root = tmp_path_factory.mktemp("bad_models")
    converted = root / "tiny_en_mlx"
    done = subprocess.run(
        [sys.executable, "-m", "whisper_mlx.convert", str(tiny_en_dir), str(converted)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((converted / "config.json").read_text())
    no_weights = root / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    models = {"no_weights": no_weights}
    for name, dims in [
        ("base_dims", BASE_DIMS),
        ("wider", {"n_audio_state": 512, "n_text_state": 512, "n_audio_head": 8, "n_text_head": 8}),
    ]:
        target = root / name
        target.mkdir()
        (target / "config.json").write_text(json.dumps({**config, **dims}))
        for weights in ("weights.safetensors", "weights.npz"):
            (target / weights).symlink_to(converted / weights)
        models[name] = target
    return models


MODEL_CASES = [
    ("giant-v9", ModelNotFoundError, "'giant-v9' not found"),
    ("no_weights", ModelFormatError, "no Whisper weights found"),
    ("base_dims", ModelFormatError, "weights do not match the model"),
    ("wider", ModelFormatError, "different model size"),
]


def model_argument(name: str, bad_models: dict) -> str:
    return str(bad_models[name]) if name in bad_models else name


@pytest.mark.parametrize(("name", "error", "problem"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_python_api(name, error, problem, bad_models):
    with pytest.raises(error, match=problem):
        load_model(model_argument(name, bad_models))


@pytest.mark.parametrize(("name", "error", "problem"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_cli(name, error, problem, bad_models, tmp_path):
    done = run_cli(str(DATA / "jfk.flac"), "--model", model_argument(name, bad_models), "-o", str(tmp_path))
    assert done.returncode == 1
    assert "whisper_mlx: error: cannot load the model: " in done.stderr and problem in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_bad_model_by_transcribe_path_argument(bad_models):
    with pytest.raises(ModelFormatError, match="no Whisper weights found"):
        whisper_mlx.transcribe(str(DATA / "jfk.flac"), path_or_hf_repo=str(bad_models["no_weights"]))
