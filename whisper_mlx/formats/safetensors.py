"""Read and write .safetensors files with numpy alone (no safetensors/torch dependency).

Layout: a little-endian uint64 header size N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
plus an optional "__metadata__" of strings), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # BF16 widened on read
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a shift (numpy has no bfloat16)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: truncated safetensors file (no header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100_000_000:
            raise ModelFormatError(f"{path}: truncated or corrupt safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header")
    return header, 8 + length


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file (memory-mapped; bfloat16 widened to float32)."""
    path = Path(path)
    size = path.stat().st_size
    header, start = _read_header(path, size)
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if start + end > size or begin > end:
            raise ModelFormatError(f"{path}: truncated safetensors file (tensor {name!r} ends past the file end)")
        array = data[start + begin : start + end].view(np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        if array.size != int(np.prod(shape)):
            raise ModelFormatError(f"{path}: tensor {name!r} holds {array.size} values for shape {shape}")
        array = array.reshape(shape)
        tensors[name] = bfloat16_to_float32(array) if dtype == "BF16" else array
    return tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    """Write numpy arrays as a .safetensors file (atomically: a temp file renamed into place)."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "mlx"})}
    blobs, offset = [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {array.dtype} in safetensors")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as the spec recommends
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)
