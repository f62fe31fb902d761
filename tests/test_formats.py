"""Checkpoint readers/writers: lossless round trips with the real tiny.en weights, safety of the torch
reader, and clear errors for truncated or corrupt files."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import whisper_mlx  # noqa: F401  (BLAS preload before mlx)
from whisper_mlx.errors import ModelFormatError
from whisper_mlx.formats.ct2 import read_ct2_checkpoint
from whisper_mlx.formats.hf import read_hf_checkpoint, write_hf_checkpoint
from whisper_mlx.formats.mlx import dequantize_weights, read_mlx_checkpoint, write_mlx_checkpoint
from whisper_mlx.formats.openai_pt import (
    parse_alignment_heads,
    read_openai_checkpoint,
    read_torch_zip,
    write_openai_pt,
)
from whisper_mlx.formats.safetensors import read_safetensors, write_safetensors
from whisper_mlx.formats.torch_pickle import torch_pickle, write_torch_zip


@pytest.fixture(scope="module")
def tiny(tiny_en_dir):
    return read_ct2_checkpoint(tiny_en_dir)


def assert_same_checkpoint(a, b):
    assert a.dims == b.dims
    assert sorted(a.weights) == sorted(b.weights)
    for name, value in a.weights.items():
        other = b.weights[name]
        assert other.shape == value.shape and other.dtype == value.dtype, name
        np.testing.assert_array_equal(other, value, err_msg=name)
    np.testing.assert_array_equal(a.alignment_heads, b.alignment_heads)


def test_ct2_reader_gives_mlx_names_and_heads(tiny):
    assert tiny.dims.n_audio_layer == 4 and tiny.dims.n_vocab == 51864
    assert tiny.weights["encoder.conv1.weight"].shape == (384, 3, 80)  # (out, kernel, in)
    assert "encoder.blocks.0.attn.key.bias" not in tiny.weights
    assert tiny.alignment_heads.shape[1] == 2


@pytest.mark.parametrize("files", [("weights.safetensors",), ("weights.npz",)])
def test_mlx_round_trip(tiny, tmp_path, files):
    write_mlx_checkpoint(tiny, tmp_path, files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "whisper" and "quantization" not in config
    assert set(config) == set(tiny.dims.to_dict()) | {"model_type"}  # mlx-whisper does ModelDimensions(**config)
    assert_same_checkpoint(tiny, read_mlx_checkpoint(tmp_path))


def test_mlx_reader_prefers_safetensors(tiny, tmp_path):
    write_mlx_checkpoint(tiny, tmp_path)
    assert read_mlx_checkpoint(tmp_path).extras["weights_file"] == "weights.safetensors"


def test_openai_pt_round_trip(tiny, tmp_path):
    write_openai_pt(tiny, tmp_path / "tiny.en.pt")
    assert_same_checkpoint(tiny, read_openai_checkpoint(tmp_path / "tiny.en.pt"))


def test_openai_pt_uses_openai_names_and_layout(tiny, tmp_path):
    write_openai_pt(tiny, tmp_path / "m.pt")
    obj = read_torch_zip(tmp_path / "m.pt")
    assert set(obj) == {"dims", "model_state_dict", "alignment_heads"}
    state = obj["model_state_dict"]
    assert isinstance(state, OrderedDict)
    assert state["encoder.conv1.weight"].shape == (384, 80, 3)  # (out, in, kernel)
    assert "encoder.blocks.0.mlp.0.weight" in state and "encoder.blocks.0.mlp.2.bias" in state
    assert state["encoder.positional_embedding"].shape == (1500, 384)
    names = zipfile.ZipFile(tmp_path / "m.pt").namelist()
    assert names[0] == "archive/data.pkl" and "archive/version" in names and "archive/data/0" in names


def test_hf_round_trip(tiny, tmp_path):
    write_hf_checkpoint(tiny, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["d_model"] == 384 and config["decoder_layers"] == 4 and config["vocab_size"] == 51864
    names = read_safetensors(tmp_path / "model.safetensors")
    assert "model.decoder.layers.0.encoder_attn.k_proj.weight" in names
    assert "model.encoder.layers.3.final_layer_norm.bias" in names
    assert_same_checkpoint(tiny, read_hf_checkpoint(tmp_path))


def test_hf_reader_accepts_unprefixed_names_and_tied_proj_out(tiny, tmp_path):
    write_hf_checkpoint(tiny, tmp_path)
    tensors = dict(read_safetensors(tmp_path / "model.safetensors"))
    tensors = {name.removeprefix("model."): value for name, value in tensors.items()}  # WhisperModel style
    tensors["proj_out.weight"] = tensors["decoder.embed_tokens.weight"]
    write_safetensors(tensors, tmp_path / "model.safetensors")
    assert_same_checkpoint(tiny, read_hf_checkpoint(tmp_path))


def test_safetensors_bfloat16_and_dtypes(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    write_safetensors({"x": bf16, "i": np.arange(3, dtype=np.int64)}, tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    header["x"]["dtype"] = "BF16"  # relabel the uint16 bits as bfloat16
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    (tmp_path / "b.safetensors").write_bytes(raw[:8] + encoded + raw[8 + header_len :])
    loaded = read_safetensors(tmp_path / "b.safetensors")
    np.testing.assert_array_equal(loaded["x"], values)
    np.testing.assert_array_equal(loaded["i"], np.arange(3))


def test_parse_alignment_heads_forms(tiny):
    dims = tiny.dims
    mask = np.zeros((dims.n_text_layer, dims.n_text_head), bool)
    mask[2, 5] = mask[3, 0] = True
    expected = np.array([[2, 5], [3, 0]])
    np.testing.assert_array_equal(parse_alignment_heads(mask, dims), expected)
    np.testing.assert_array_equal(parse_alignment_heads(expected, dims), expected)
    import base64
    import gzip

    encoded = base64.b85encode(gzip.compress(mask.tobytes()))  # openai's _ALIGNMENT_HEADS form
    np.testing.assert_array_equal(parse_alignment_heads(encoded, dims), expected)
    assert parse_alignment_heads(None, dims) is None


def test_rebuild_tensor_handles_offsets_strides_and_bounds():
    from whisper_mlx.formats.openai_pt import _rebuild_tensor

    storage = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(_rebuild_tensor(storage, 1, (2, 3), (1, 2)), [[1, 3, 5], [2, 4, 6]])
    with pytest.raises(ModelFormatError):
        _rebuild_tensor(storage, 4, (3, 4), (4, 1))  # would read past the storage


def test_torch_pickle_round_trips_containers_and_scalars(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {
        "a": base,
        "nested": OrderedDict(b=np.ones((2,), np.float16), c=np.array(True)),
        "n": 7,
        "big": 2**40,
        "s": "x",
        "f": 0.5,
        "t": (1, 2),
        "l": [None, False],
    }
    write_torch_zip(obj, tmp_path / "t.pt")
    back = read_torch_zip(tmp_path / "t.pt")
    np.testing.assert_array_equal(back["a"], base)
    assert back["nested"]["b"].dtype == np.float16 and back["nested"]["c"].shape == ()
    assert (back["n"], back["big"], back["s"], back["f"], back["t"], back["l"]) == (
        7,
        2**40,
        "x",
        0.5,
        (1, 2),
        [None, False],
    )


def _malicious_pickle(payload: bytes) -> bytes:
    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (payload.decode(),))

    return pickle.dumps({"dims": {}, "model_state_dict": Exploit()}, protocol=2)


def _zip_with_pickle(path: Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("kind", ["reduce", "eval"])
def test_malicious_pt_is_refused_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "reduce":
        data = _malicious_pickle(f"touch {marker}".encode())
    else:  # a GLOBAL builtins.eval called through REDUCE
        data = (
            b"\x80\x02cbuiltins\neval\nX"
            + len(f"open('{marker}','w')").to_bytes(4, "little")
            + f"open('{marker}','w')".encode()
            + b"\x85R."
        )
    _zip_with_pickle(tmp_path / "evil.pt", data)
    with pytest.raises(ModelFormatError, match="refusing"):
        read_openai_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_non_tensor_state_dict_entry_is_rejected(tmp_path):
    write_torch_zip({"dims": {}, "model_state_dict": {"x": 3}}, tmp_path / "m.pt")
    with pytest.raises(ModelFormatError):
        read_openai_checkpoint(tmp_path / "m.pt")


def test_legacy_and_non_zip_pt_errors(tmp_path):
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(119547037146038801333356, protocol=2))
    with pytest.raises(ModelFormatError, match="legacy"):
        read_openai_checkpoint(tmp_path / "legacy.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelFormatError, match="not a torch checkpoint"):
        read_openai_checkpoint(tmp_path / "text.pt")


def test_pt_storage_bounds_are_checked(tmp_path):
    pickled, storages = torch_pickle({"x": np.zeros(4, np.float32)})
    with zipfile.ZipFile(tmp_path / "short.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/data/0", storages[0][1][:8])  # half the bytes
    with pytest.raises(ModelFormatError, match="truncated"):
        read_torch_zip(tmp_path / "short.pt")


def _truncate(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_files_raise_model_format_error(tiny, tiny_en_dir, tmp_path):
    ct2 = tmp_path / "ct2"
    shutil.copytree(tiny_en_dir, ct2)
    _truncate(ct2 / "model.bin")
    with pytest.raises(ModelFormatError, match="truncated"):
        read_ct2_checkpoint(ct2)
    for files in (("weights.npz",), ("weights.safetensors",)):
        out = tmp_path / files[0]
        write_mlx_checkpoint(tiny, out, files)
        _truncate(out / files[0])
        with pytest.raises(ModelFormatError, match="truncated"):
            read_mlx_checkpoint(out)
    write_openai_pt(tiny, tmp_path / "m.pt")
    _truncate(tmp_path / "m.pt")
    with pytest.raises(ModelFormatError, match="truncated"):
        read_openai_checkpoint(tmp_path / "m.pt")
    write_hf_checkpoint(tiny, tmp_path / "hf")
    _truncate(tmp_path / "hf" / "model.safetensors", 0.99)
    with pytest.raises(ModelFormatError, match="truncated"):
        read_hf_checkpoint(tmp_path / "hf")


def test_corrupt_configs(tiny, tmp_path):
    write_mlx_checkpoint(tiny, tmp_path, ("weights.npz",))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"config\.json"):
        read_mlx_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper", "n_mels": 80}))
    with pytest.raises(ModelFormatError, match="n_audio_ctx"):
        read_mlx_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny.dims.to_dict(), "quantization": {"bits": 4}}))
    with pytest.raises(ModelFormatError, match="group_size"):
        read_mlx_checkpoint(tmp_path)


def test_dequantize_weights_inverts_mlx_quantize():
    import mlx.core as mx

    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    q, scales, biases = mx.quantize(mx.array(w), group_size=64, bits=8)
    weights = {"l.weight": np.array(q), "l.scales": np.array(scales), "l.biases": np.array(biases), "l.bias": w[0]}
    out = dequantize_weights(weights, {"group_size": 64, "bits": 8})
    assert set(out) == {"l.weight", "l.bias"}
    np.testing.assert_allclose(out["l.weight"], w, atol=0.05)


def test_torch_load_reads_our_pt(tiny, tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch")
    write_openai_pt(tiny, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    state = obj["model_state_dict"]
    assert obj["dims"] == tiny.dims.to_dict()
    np.testing.assert_array_equal(
        state["decoder.token_embedding.weight"].numpy(), tiny.weights["decoder.token_embedding.weight"]
    )
    np.testing.assert_array_equal(
        state["encoder.conv1.weight"].numpy(), tiny.weights["encoder.conv1.weight"].transpose(0, 2, 1)
    )
    buffer = io.BytesIO()
    torch.save({"dims": obj["dims"], "model_state_dict": state}, buffer)  # and torch's own files read back
    (tmp_path / "torch.pt").write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(
        read_openai_checkpoint(tmp_path / "torch.pt").weights["decoder.ln.weight"], tiny.weights["decoder.ln.weight"]
    )
