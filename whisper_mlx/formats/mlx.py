"""The mlx-community layout: config.json (ModelDimensions, model_type, optional quantization) next to
weights.safetensors and/or weights.npz holding mlx-whisper parameter names.

mlx-whisper stores the alignment heads as an `alignment_heads` (n, 2) integer array among the weights
(it is an mx.array attribute of its model), so that is where we read and write them. config.json
must hold nothing else: mlx-whisper and lightning pass it to ModelDimensions(**config).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..dims import ModelDimensions
from ..errors import ModelFormatError
from . import Checkpoint
from .safetensors import read_safetensors, write_safetensors

MLX_WEIGHT_FILES = ("weights.safetensors", "weights.npz")
# Entries some converters leave among the weights that are not parameters of our model.
_NON_PARAMETERS = ("alignment_heads", "encoder.positional_embedding", "encoder._positional_embedding")


def read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing (a model directory needs its config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return config


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read eagerly so truncation surfaces here as ModelFormatError."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ModelFormatError(f"{path}: truncated or corrupt .npz file ({exc})") from None


def _quantization(config: dict, path: Path) -> dict | None:
    q = config.get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or not {"group_size", "bits"} <= set(q):
        raise ModelFormatError(f"{path}: 'quantization' must hold group_size and bits, got {q!r}")
    known = {key: q[key] for key in ("group_size", "bits", "mode") if key in q}
    return {**known, "group_size": int(q["group_size"]), "bits": int(q["bits"])}


def read_mlx_checkpoint(model_dir: str | Path) -> Checkpoint:
    """An mlx-community directory; weights.safetensors is preferred over weights.npz (as mlx-whisper)."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    try:
        dims = ModelDimensions.from_dict(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{model_dir / 'config.json'}: not an mlx Whisper config ({exc})") from None
    weights_path = next((model_dir / n for n in MLX_WEIGHT_FILES if (model_dir / n).exists()), None)
    if weights_path is None:
        raise ModelFormatError(f"{model_dir}: no weights.safetensors or weights.npz next to config.json")
    weights = dict(read_safetensors(weights_path) if weights_path.suffix == ".safetensors" else read_npz(weights_path))
    heads = weights.pop("alignment_heads", None)
    for name in _NON_PARAMETERS:
        weights.pop(name, None)
    return Checkpoint(
        dims,
        weights,
        alignment_heads=None if heads is None else np.asarray(heads, dtype=np.int64).reshape(-1, 2),
        quantization=_quantization(config, model_dir / "config.json"),
        source_format="mlx",
        extras={"weights_file": weights_path.name},
    )


def mlx_config(checkpoint: Checkpoint) -> dict:
    config = {**checkpoint.dims.to_dict(), "model_type": "whisper"}
    if checkpoint.quantization:
        config["quantization"] = dict(checkpoint.quantization)
    return config


def write_mlx_checkpoint(checkpoint: Checkpoint, out_dir: str | Path, files=MLX_WEIGHT_FILES) -> list[Path]:
    """Write config.json plus each of `files` (weights.safetensors, weights.npz); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights: dict[str, Any] = dict(checkpoint.weights)  # Any: numpy's savez stub checks **kwds against allow_pickle
    if checkpoint.alignment_heads is not None:
        weights["alignment_heads"] = np.asarray(checkpoint.alignment_heads, dtype=np.int64).reshape(-1, 2)
    written = []
    for name in files:
        target = out_dir / name
        if name.endswith(".safetensors"):
            write_safetensors(weights, target, {"format": "mlx"})
        elif name.endswith(".npz"):
            tmp = out_dir / (name + ".tmp.npz")  # np.savez appends .npz to names lacking it
            np.savez(tmp, **weights)
            os.replace(tmp, target)
        else:
            raise ValueError(f"unknown mlx weights file {name!r} (use weights.safetensors or weights.npz)")
        written.append(target)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(mlx_config(checkpoint), indent=4) + "\n")
    return [config_path, *written]


def dequantize_weights(weights: dict[str, np.ndarray], quantization: dict) -> dict[str, np.ndarray]:
    """Undo MLX affine quantization: each `X.weight` with `X.scales`/`X.biases` becomes float again."""
    import mlx.core as mx

    out = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and f"{prefix}.scales" in weights:
            dequantized = mx.dequantize(
                mx.array(value),
                mx.array(weights[f"{prefix}.scales"]),
                mx.array(weights[f"{prefix}.biases"]),
                group_size=quantization["group_size"],
                bits=quantization["bits"],
            )
            value = np.array(dequantized.astype(mx.float32))
        out[name] = value
    return out


def dequantize_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """The same checkpoint with float weights (a no-op when it is not quantized)."""
    if not checkpoint.quantization:
        return checkpoint
    weights = dequantize_weights(checkpoint.weights, checkpoint.quantization)
    return Checkpoint(
        checkpoint.dims, weights, checkpoint.alignment_heads, None, checkpoint.source_format, dict(checkpoint.extras)
    )
