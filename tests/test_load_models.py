"""load_model across formats (real tiny.en weights converted from CTranslate2), Hub names through a
fake offline Hugging Face cache, the converter, the thread-safe model cache, and error messages."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import zipfile
from pathlib import Path

import whisper_mlx  # noqa: F401  (BLAS preload before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from whisper_mlx import hub, load_models
from whisper_mlx.audio import N_SAMPLES, log_mel_spectrogram
from whisper_mlx.convert import convert
from whisper_mlx.convert import main as convert_main
from whisper_mlx.errors import ModelFormatError, ModelNotFoundError
from whisper_mlx.load_models import get_cached_model, load_model

DATA = Path(__file__).parent / "data"
TOKENS = [50257, 50362, 843, 5891, 3399, 1222, 766]  # <|startoftranscript|><|notimestamps|> + some text


@pytest.fixture(scope="module")
def mel() -> mx.array:
    """The first 30 s window of jfk.flac, (1, 3000, 80)."""
    return log_mel_spectrogram(str(DATA / "jfk.flac"), padding=N_SAMPLES)[None, :3000]


def logits_of(model, mel) -> np.ndarray:
    return np.array(model(mel, mx.array([TOKENS])))


def decoder_logits(model, features) -> np.ndarray:
    return np.array(model.logits(mx.array([TOKENS]), features))


@pytest.fixture(scope="module")
def reference(tiny_en_dir, mel):
    """The CTranslate2 model in float32, its audio features for the jfk window, and its logits."""
    model = load_model(tiny_en_dir, dtype=mx.float32)
    features = model.embed_audio(mel)
    mx.eval(features)
    return model, features, decoder_logits(model, features)


def assert_same_parameters(model, other):
    from mlx.utils import tree_flatten

    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(other.parameters()))
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        assert value.dtype == theirs[name].dtype, name
        np.testing.assert_array_equal(np.array(value), np.array(theirs[name]), err_msg=name)


@pytest.fixture(scope="module")
def converted(tiny_en_dir, tmp_path_factory) -> dict[str, Path]:
    """tiny.en converted from CTranslate2 to every other format."""
    root = tmp_path_factory.mktemp("converted")
    out = {
        "mlx": convert(tiny_en_dir, root / "mlx", dtype="float32"),
        "mlx-q8": convert(tiny_en_dir, root / "mlx-q8", quantize=True, q_bits=8),
        "mlx-q4": convert(tiny_en_dir, root / "mlx-q4", quantize=True, q_bits=4),
        "openai": convert(tiny_en_dir, root / "openai", to="openai"),
        "hf": convert(tiny_en_dir, root / "hf", to="hf"),
    }
    out["mlx-npz"] = root / "mlx-npz"
    out["mlx-npz"].mkdir()
    for name in ("config.json", "weights.npz"):
        shutil.copy(out["mlx"] / name, out["mlx-npz"] / name)
    out["mlx-safetensors"] = root / "mlx-safetensors"
    out["mlx-safetensors"].mkdir()
    for name in ("config.json", "weights.safetensors"):
        shutil.copy(out["mlx"] / name, out["mlx-safetensors"] / name)
    return out


@pytest.mark.parametrize("fmt", ["mlx-npz", "mlx-safetensors", "openai", "openai-file", "hf"])
def test_lossless_formats_give_identical_models(converted, reference, fmt):
    # identical parameters make the encoder identical; the decoder is checked on the shared features
    path = converted["openai"] / "model.pt" if fmt == "openai-file" else converted[fmt]
    model = load_model(path, dtype=mx.float32)
    ref_model, features, ref_logits = reference
    assert model.dims == ref_model.dims
    assert_same_parameters(model, ref_model)
    np.testing.assert_array_equal(decoder_logits(model, features), ref_logits)
    np.testing.assert_array_equal(model.alignment_heads, ref_model.alignment_heads)


def test_full_forward_from_pt_matches_ctranslate2(converted, reference, mel):
    model = load_model(converted["openai"], dtype=mx.float32)
    np.testing.assert_array_equal(logits_of(model, mel), logits_of(reference[0], mel))


def test_mlx_layout_files(converted):
    config = json.loads((converted["mlx"] / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["n_text_layer"] == 4 and "quantization" not in config
    weights = mx.load(str(converted["mlx"] / "weights.npz"))  # what lightning 0.0.10 reads
    assert weights["alignment_heads"].shape[1] == 2
    assert weights["encoder.conv1.weight"].shape == (384, 3, 80)
    assert set(mx.load(str(converted["mlx"] / "weights.safetensors"))) == set(weights)


@pytest.mark.parametrize("bits, min_agreement, max_rel_err", [(8, 1.0, 0.06), (4, 0.7, 0.4)])
def test_quantized_models(converted, reference, mel, bits, min_agreement, max_rel_err):
    path = converted[f"mlx-q{bits}"]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits}
    model = load_model(path, dtype=mx.float32)
    query = model.decoder.blocks[0].cross_attn.query
    assert isinstance(query, nn.QuantizedLinear) and query.bits == bits and query.group_size == 64
    assert isinstance(model.encoder.blocks[0].mlp2, nn.QuantizedLinear)
    assert isinstance(model.decoder.token_embedding, nn.QuantizedEmbedding)
    assert query.weight.dtype == mx.uint32 and query.scales.dtype == mx.float32
    assert isinstance(model.encoder.conv1, nn.Conv1d)
    ref_model, features, ref_logits = reference
    # quantized matmuls are slow on the CPU: run the whole mel window through the 8-bit model only
    logits = logits_of(model, mel) if bits == 8 else decoder_logits(model, features)
    assert logits.shape == ref_logits.shape and np.isfinite(logits).all()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).mean() >= min_agreement
    relative_error = np.abs(logits - ref_logits).mean() / ref_logits.std()
    print(f"{bits}-bit: relative logit error {relative_error:.3f}")
    assert relative_error < max_rel_err
    np.testing.assert_array_equal(model.alignment_heads, ref_model.alignment_heads)
    half = load_model(path, dtype=mx.float16)
    assert half.decoder.blocks[0].cross_attn.query.scales.dtype == mx.float16


def test_float16_load_and_default_dtype(converted):
    model = load_model(converted["mlx"], dtype="float16")
    assert model.decoder.token_embedding.weight.dtype == mx.float16
    assert load_model(converted["mlx"]).decoder.ln.weight.dtype == mx.float32  # CPU default


def test_weights_file_path_loads_its_directory(converted, reference):
    assert_same_parameters(load_model(converted["mlx"] / "weights.npz", dtype=mx.float32), reference[0])


# ---- errors -----------------------------------------------------------------------------------------


def test_unknown_name_lists_available_models():
    with pytest.raises(ModelNotFoundError, match=r"tiny.*large-v3") as info:
        load_model("tiny-extra-large")
    assert "distil-large-v3" in str(info.value) and "turbo" in str(info.value)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "nope")
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(ModelFormatError, match=r"no Whisper weights.*README\.md"):
        load_model(tmp_path)


def _truncated_copy(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize(
    "fmt, name",
    [
        ("ct2", "model.bin"),
        ("mlx-npz", "weights.npz"),
        ("mlx-safetensors", "weights.safetensors"),
        ("openai", "model.pt"),
        ("hf", "model.safetensors"),
    ],
)
def test_truncated_weights(converted, tiny_en_dir, tmp_path, fmt, name):
    src = tiny_en_dir if fmt == "ct2" else converted[fmt]
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(_truncated_copy(src, tmp_path / fmt, name))


def test_malicious_pt_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}".encode()
    # GLOBAL posix.system called through REDUCE: what a __reduce__ exploit pickles to
    data = b"\x80\x02cposix\nsystem\nX" + len(payload).to_bytes(4, "little") + payload + b"\x85R."
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
    with pytest.raises(ModelFormatError, match=r"posix\.system"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_weights_of_another_model_size_are_rejected(converted, tmp_path):
    shutil.copytree(converted["mlx-npz"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_audio_state": 512, "n_text_state": 512}))
    with pytest.raises(ModelFormatError, match="shape"):
        load_model(tmp_path / "m")


# ---- hub names through a fake, offline Hugging Face cache ------------------------------------------


def _add_to_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """The real cache layout: blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>, refs/main."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision


@pytest.fixture(scope="module")
def hf_cache(converted, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    mlx_files = {n: converted["mlx"] / n for n in ("config.json", "weights.npz", "weights.safetensors")}
    _add_to_hf_cache(cache, "mlx-community/whisper-tiny.en-mlx", mlx_files)
    _add_to_hf_cache(
        cache,
        "mlx-community/whisper-tiny.en-mlx-4bit",
        {n: converted["mlx-q4"] / n for n in ("config.json", "weights.npz")},
    )
    _add_to_hf_cache(
        cache,
        "mustafaaljadery/distil-whisper-mlx",
        {f"mlx_models/distil-small.en/{n}": p for n, p in mlx_files.items()},
    )
    return cache


@pytest.fixture
def offline_hub(hf_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return hf_cache


def test_short_name_loads_from_warm_offline_cache(offline_hub, reference, tmp_path):
    (tmp_path / "tiny.en").mkdir()  # a same-named folder in the CWD must not be used
    (tmp_path / "tiny.en" / "model.bin").write_bytes(b"garbage")
    path = load_models.resolve_model_path("tiny.en")
    assert str(path).startswith(str(offline_hub))
    assert_same_parameters(load_model("tiny.en", dtype=mx.float32), reference[0])


def test_repo_id_quant_and_subfolder_from_cache(offline_hub):
    model = load_model("mlx-community/whisper-tiny.en-mlx")
    assert model.dims.n_vocab == 51864
    quantized = load_model("tiny.en", quant="4bit")
    assert isinstance(quantized.decoder.blocks[0].mlp1, nn.QuantizedLinear)
    distil = load_models.resolve_model_path("distil-small.en")
    assert distil.name == "distil-small.en" and (distil / "weights.npz").exists()


def test_uncached_repo_offline_raises_model_not_found(offline_hub):
    with pytest.raises(ModelNotFoundError, match=r"mlx-community/whisper-base-mlx.*HF_HUB_OFFLINE"):
        load_model("base")
    with pytest.raises(ModelNotFoundError, match="someone/not-cached"):
        load_model("someone/not-cached")


def test_available_models_and_repo_names():
    names = hub.available_models()
    for name in (
        "tiny",
        "base",
        "small",
        "medium",
        "large-v2",
        "large-v3",
        "turbo",
        "tiny.en",
        "medium.en",
        "distil-small.en",
        "distil-medium.en",
        "distil-large-v2",
        "distil-large-v3",
    ):
        assert name in names
    assert hub.repo_for("tiny") == ("mlx-community/whisper-tiny", None)
    assert hub.repo_for("tiny", "4bit") == ("mlx-community/whisper-tiny-mlx-4bit", None)
    assert hub.repo_for("large-v3", "8bit") == ("mlx-community/whisper-large-v3-mlx-8bit", None)
    assert hub.repo_for("turbo") == ("mlx-community/whisper-large-v3-turbo", None)
    assert hub.repo_for("distil-large-v3", "4bit") == (
        "mustafaaljadery/distil-whisper-mlx",
        "mlx_models/distil-large-v3-4-bit",
    )
    with pytest.raises(ModelNotFoundError, match="convert"):
        hub.repo_for("turbo", "4bit")
    with pytest.raises(ValueError):
        hub.repo_for("tiny", "3bit")
    with pytest.raises(ValueError, match="short model names"):
        load_models.resolve_model_path("/some/dir", quant="4bit")


# ---- model cache ------------------------------------------------------------------------------------


def test_get_cached_model_loads_once_across_threads(converted, monkeypatch):
    load_models.clear_model_cache()
    calls = []
    real_build = load_models.build_model

    def counting_build(checkpoint, dtype=None, backend=None):
        calls.append(dtype)
        return real_build(checkpoint, dtype, backend)

    monkeypatch.setattr(load_models, "build_model", counting_build)
    barrier = threading.Barrier(4)
    results = []

    def worker():
        barrier.wait()
        results.append(get_cached_model(converted["mlx"], mx.float32))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and all(m is results[0] for m in results)
    assert get_cached_model(str(converted["mlx"]), mx.float32) is results[0]
    assert get_cached_model(converted["mlx"], mx.float16) is not results[0]
    assert len(calls) == 2
    load_models.clear_model_cache()


# ---- converter --------------------------------------------------------------------------------------


def test_convert_refuses_source_and_existing_weights(converted, tiny_en_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="source model directory"):
        convert(tiny_en_dir, tiny_en_dir)
    out = tmp_path / "out"
    assert convert_main([str(converted["openai"] / "model.pt"), str(out), "--dtype", "float16"]) == 0
    assert json.loads((out / "config.json").read_text())["n_vocab"] == 51864
    assert convert_main([str(converted["hf"]), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert convert_main([str(converted["hf"]), str(out), "--force", "-q", "--q-bits", "8"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert convert_main(["no-such-model", str(tmp_path / "x")]) == 1
    assert "available" in capsys.readouterr().err


def test_quantized_source_converts_back_to_float_formats(converted, reference, tmp_path):
    convert(converted["mlx-q8"], tmp_path / "pt", to="openai", dtype="float32")
    model = load_model(tmp_path / "pt", dtype=mx.float32)
    assert isinstance(model.decoder.blocks[0].mlp1, nn.Linear)
    _, features, ref_logits = reference
    assert (decoder_logits(model, features).argmax(-1) == ref_logits.argmax(-1)).all()


def test_convert_module_entry_point(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "whisper_mlx.convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--q-bits" in result.stdout
