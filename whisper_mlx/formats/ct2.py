"""Read CTranslate2 (faster-whisper) Whisper checkpoints with numpy alone.

model.bin layout: uint32 version, string spec name, uint32 revision, uint32 count, then per variable
(string name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 nbytes, raw bytes); then aliases.
Strings are a uint16 length (counting the trailing NUL) followed by the bytes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from ..dims import ModelDimensions
from ..errors import ModelFormatError

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class _Reader:
    def __init__(self, buffer: bytes, path: Path):
        self.buffer = buffer
        self.offset = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if self.offset + n > len(self.buffer):
            raise ModelFormatError(
                f"{self.path}: truncated CTranslate2 file (wanted {n} bytes at offset {self.offset})"
            )
        view = memoryview(self.buffer)[self.offset : self.offset + n]
        self.offset += n
        return view

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.uint("H")
        return bytes(self.take(length)).rstrip(b"\0").decode("utf-8")


def read_ct2_variables(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model.bin, aliases resolved, as numpy arrays."""
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    version = reader.uint("I")
    if version < 1 or version > 10:
        raise ModelFormatError(f"{path}: not a CTranslate2 model.bin (version field {version})")
    if version >= 2:
        reader.string()  # spec name
    if version >= 3:
        reader.uint("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.uint("I")):
        name = reader.string()
        rank = reader.uint("B")
        shape = [reader.uint("I") for _ in range(rank)]
        dtype_id = reader.uint("B") if version >= 4 else 0
        if dtype_id not in _CT2_DTYPES:
            raise ModelFormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        nbytes = reader.uint("I")
        data = np.frombuffer(reader.take(nbytes), dtype=_CT2_DTYPES[dtype_id])
        if data.size != int(np.prod(shape)):
            raise ModelFormatError(f"{path}: variable {name!r} holds {data.size} values for shape {shape}")
        variables[name] = data.reshape(shape)
    if version >= 3 and reader.offset < len(reader.buffer):
        for _ in range(reader.uint("I")):
            alias, target = reader.string(), reader.string()
            variables[alias] = variables[target]
    return variables


def _dequantize(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    weight = variables[name]
    scale = variables.get(name + "_scale")
    if scale is None or weight.dtype != np.int8:
        return weight
    return (weight.astype(np.float32) / np.asarray(scale, np.float32).reshape(-1, 1)).astype(np.float32)


def _linear(variables, src: str, dst: str, out: dict, parts: tuple[str, ...] = ("",)) -> None:
    """Copy a (possibly fused) CT2 linear into one or more mlx-whisper linears."""
    weight = _dequantize(variables, f"{src}/weight")
    bias = variables.get(f"{src}/bias")
    weights = np.split(weight, len(parts), axis=0)
    biases = np.split(bias, len(parts), axis=0) if bias is not None else [None] * len(parts)
    for part, w, b in zip(parts, weights, biases):
        name = f"{dst}.{part}" if part else dst
        out[f"{name}.weight"] = w
        if b is not None and part != "key":  # Whisper's key projection has no bias
            out[f"{name}.bias"] = b


def _layer_norm(variables, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = variables[f"{src}/gamma"]
    out[f"{dst}.bias"] = variables[f"{src}/beta"]


def _count_layers(variables, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    return len({m.group(1) for m in map(pattern.match, variables) if m})


def _map_block(variables, src: str, dst: str, out: dict, cross: bool) -> None:
    _layer_norm(variables, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", out)
    _linear(variables, f"{src}/self_attention/linear_0", f"{dst}.attn", out, ("query", "key", "value"))
    _linear(variables, f"{src}/self_attention/linear_1", f"{dst}.attn.out", out)
    if cross:
        _layer_norm(variables, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", out)
        _linear(variables, f"{src}/attention/linear_0", f"{dst}.cross_attn.query", out)
        _linear(variables, f"{src}/attention/linear_1", f"{dst}.cross_attn", out, ("key", "value"))
        _linear(variables, f"{src}/attention/linear_2", f"{dst}.cross_attn.out", out)
    _layer_norm(variables, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", out)
    _linear(variables, f"{src}/ffn/linear_0", f"{dst}.mlp1", out)
    _linear(variables, f"{src}/ffn/linear_1", f"{dst}.mlp2", out)


def ct2_to_mlx_weights(variables: dict[str, np.ndarray]) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        out[f"encoder.{conv}.weight"] = variables[f"encoder/{conv}/weight"].transpose(0, 2, 1)
        out[f"encoder.{conv}.bias"] = variables[f"encoder/{conv}/bias"]
    n_audio_layer = _count_layers(variables, "encoder")
    n_text_layer = _count_layers(variables, "decoder")
    for i in range(n_audio_layer):
        _map_block(variables, f"encoder/layer_{i}", f"encoder.blocks.{i}", out, cross=False)
    for i in range(n_text_layer):
        _map_block(variables, f"decoder/layer_{i}", f"decoder.blocks.{i}", out, cross=True)
    _layer_norm(variables, "encoder/layer_norm", "encoder.ln_post", out)
    _layer_norm(variables, "decoder/layer_norm", "decoder.ln", out)
    out["decoder.token_embedding.weight"] = _dequantize(variables, "decoder/embeddings/weight")
    out["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
    conv1 = variables["encoder/conv1/weight"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=n_audio_layer,
        n_vocab=out["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=out["decoder.positional_embedding"].shape[0],
        n_text_state=out["decoder.token_embedding.weight"].shape[1],
        n_text_head=int(variables["decoder/num_heads"]),
        n_text_layer=n_text_layer,
    )
    return dims, out


def read_ct2_checkpoint(model_dir: str | Path):
    """A CTranslate2 Whisper directory (model.bin + config.json) as a Checkpoint."""
    from . import Checkpoint

    model_dir = Path(model_dir)
    variables = read_ct2_variables(model_dir / "model.bin")
    try:
        dims, weights = ct2_to_mlx_weights(variables)
    except KeyError as exc:
        raise ModelFormatError(f"{model_dir}: model.bin is not a Whisper model (missing {exc})") from None
    heads = None
    config_path = model_dir / "config.json"
    if config_path.exists():
        heads = json.loads(config_path.read_text()).get("alignment_heads")
    return Checkpoint(dims, weights, None if heads is None else np.asarray(heads), source_format="ctranslate2")
