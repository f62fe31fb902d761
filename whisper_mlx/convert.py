"""Convert any Whisper checkpoint whisper_mlx reads into the mlx-community layout (or OpenAI .pt / HF).

    python -m whisper_mlx.convert SRC OUT_DIR [--dtype float16|float32] [-q] [--q-bits 4|8]
                                  [--q-group-size 64] [--to mlx|openai|hf] [--force]

The mlx layout is config.json + weights.npz (all lightning-whisper-mlx 0.0.10 reads) + weights.safetensors
(what mlx-whisper prefers), with the alignment heads stored among the weights as mlx-whisper does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

import numpy as np

from .errors import WhisperMLXError
from .formats import Checkpoint
from .formats.hf import write_hf_checkpoint
from .formats.mlx import MLX_WEIGHT_FILES, dequantize_checkpoint, write_mlx_checkpoint
from .formats.openai_pt import write_openai_pt
from .load_models import build_model, read_checkpoint, resolve_model_path

TARGETS = {  # output format -> files it writes into OUT_DIR
    "mlx": ("config.json", *MLX_WEIGHT_FILES),
    "openai": ("model.pt",),
    "hf": ("config.json", "model.safetensors", "generation_config.json"),
}
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}


def cast_checkpoint(checkpoint: Checkpoint, dtype: str) -> Checkpoint:
    """Floating weights (and quantization scales/biases) cast to dtype; packed integer weights kept."""
    np_dtype = _NUMPY_DTYPES[dtype]
    weights = {
        k: v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) else np.asarray(v)
        for k, v in checkpoint.weights.items()
    }
    return Checkpoint(
        checkpoint.dims,
        weights,
        checkpoint.alignment_heads,
        checkpoint.quantization,
        checkpoint.source_format,
        dict(checkpoint.extras),
    )


def quantize_checkpoint(checkpoint: Checkpoint, bits: int = 4, group_size: int = 64, dtype: str = "float16"):
    """MLX affine quantization of every Linear/Embedding whose input width divides into groups."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
        raise ValueError(f"unsupported quantization: {bits} bits, group size {group_size}")
    model = build_model(dequantize_checkpoint(checkpoint), getattr(mx, dtype))
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _, m: isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group_size == 0,
    )
    weights = {
        name: np.array(value) for name, value in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    }
    return Checkpoint(
        checkpoint.dims,
        weights,
        checkpoint.alignment_heads,
        {"group_size": group_size, "bits": bits},
        checkpoint.source_format,
        dict(checkpoint.extras),
    )


def _check_destination(src: Path, out_dir: Path, to: str, force: bool) -> None:
    src_dir = (src if src.is_dir() else src.parent).resolve()
    target = out_dir.resolve()
    if target == src_dir or src_dir in target.parents:
        raise ValueError(f"refusing to write into the source model directory {src_dir}; pick another OUT_DIR")
    existing = [name for name in TARGETS[to] if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass force=True (--force) to overwrite")


def convert(
    src,
    out_dir,
    dtype: str = "float16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
    to: str = "mlx",
) -> Path:
    """Convert SRC (path, Hub repo id or short name) into OUT_DIR; returns OUT_DIR."""
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype must be float16 or float32, not {dtype!r}")
    if to not in TARGETS:
        raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(TARGETS)}")
    if quantize and to != "mlx":
        raise ValueError("quantized weights can only be written in the mlx layout")
    src_path = resolve_model_path(src)
    out_dir = Path(out_dir)
    _check_destination(src_path, out_dir, to, force)
    checkpoint = read_checkpoint(src_path)
    if quantize:
        checkpoint = quantize_checkpoint(checkpoint, q_bits, q_group_size, dtype)
    elif to != "mlx":
        checkpoint = dequantize_checkpoint(checkpoint)
    checkpoint = cast_checkpoint(checkpoint, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    if to == "mlx":
        write_mlx_checkpoint(checkpoint, out_dir)
    elif to == "openai":
        write_openai_pt(checkpoint, out_dir / "model.pt")
    else:
        write_hf_checkpoint(checkpoint, out_dir)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whisper_mlx.convert",
        description="Convert a Whisper checkpoint (CTranslate2, mlx, OpenAI .pt, transformers, Hub id or "
        "short name) to the mlx-community layout.",
    )
    parser.add_argument("src", help="model directory, .pt file, Hugging Face repo id or short name (e.g. tiny)")
    parser.add_argument("out_dir", help="directory to write config.json + weights.npz + weights.safetensors into")
    parser.add_argument("--dtype", choices=sorted(_NUMPY_DTYPES), default="float16")
    parser.add_argument("-q", "--quantize", action="store_true", help="MLX-quantize Linear/Embedding weights")
    parser.add_argument("--q-bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64)
    parser.add_argument("--to", choices=sorted(TARGETS), default="mlx", help="output format (default: mlx)")
    parser.add_argument("--force", action="store_true", help="overwrite existing weights in OUT_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert(
            args.src,
            args.out_dir,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            force=args.force,
            to=args.to,
        )
    except (WhisperMLXError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
