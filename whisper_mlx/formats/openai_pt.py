"""OpenAI Whisper `.pt` checkpoints, read and written without torch.

A torch zip checkpoint is a zip archive with one top-level folder holding `data.pkl` (a pickle whose
tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls, the storage
being a persistent id `('storage', torch.HalfStorage, key, location, numel)`), the raw little-endian
bytes of each storage in `data/<key>`, and `version`.

Unpickling runs code named by the file, so the reader only resolves the handful of globals a state
dict needs (tensors, storages, OrderedDict) to harmless local stand-ins and refuses everything else.
"""

from __future__ import annotations

import base64
import gzip
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..dims import ModelDimensions, sinusoids
from ..errors import ModelFormatError
from . import Checkpoint
from .safetensors import bfloat16_to_float32
from .torch_pickle import write_torch_zip

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "BFloat16Storage": np.uint16,  # widened to float32 when read (numpy has no bfloat16)
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_ZIP_MAGIC = b"PK\x03\x04"


class _StorageType:
    """Stands in for a torch.<X>Storage class: only its element dtype matters to us."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 (and v1): a strided view of a storage, copied out."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise ModelFormatError("tensor rebuilt from something that is not a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise ModelFormatError(f"corrupt tensor: size {size}, stride {stride}, offset {offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:  # as_strided would read past the buffer: refuse rather than crash
        raise ModelFormatError(f"tensor of size {size} reaches element {last} of a {storage.size}-element storage")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor/storage/OrderedDict globals; anything else is refused, never imported."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool, origin: Path):
        super().__init__(file)
        self.archive, self.prefix, self.big_endian, self.origin = archive, prefix, big_endian, origin
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ModelFormatError(
            f"{self.origin}: refusing to load: the checkpoint references {module}.{name}, which is not part "
            "of a plain tensor state dict (a checkpoint that runs code is unsafe)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ModelFormatError(f"{self.origin}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise ModelFormatError(f"{self.origin}: corrupt storage reference {pid!r}")
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type, key, int(numel))
        return self.storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        entry = f"{self.prefix}data/{key}"
        try:
            raw = self.archive.read(entry)
        except KeyError:
            raise ModelFormatError(f"{self.origin}: storage {entry} is missing from the archive") from None
        dtype = storage_type.dtype.newbyteorder(">") if self.big_endian else storage_type.dtype
        if len(raw) < numel * dtype.itemsize:
            raise ModelFormatError(f"{self.origin}: storage {entry} is truncated")
        data = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
        return bfloat16_to_float32(data) if storage_type.name == "BFloat16Storage" else data


def _find_pickle(archive: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise ModelFormatError(f"{path}: not a torch checkpoint (found {len(pickles)} data.pkl entries)")
    return pickles[0][: -len("data.pkl")]


def read_torch_zip(path: str | Path):
    """The object stored by torch.save (zip format), with tensors as numpy arrays, safely."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        if magic[:1] == b"\x80":
            raise ModelFormatError(
                f"{path}: legacy (pre-zip, torch<1.6) checkpoints are not supported; "
                "re-save it with a recent torch.save or convert it to another format"
            )
        raise ModelFormatError(f"{path}: not a torch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _find_pickle(archive, path)
            byteorder = f"{prefix}byteorder"
            big_endian = byteorder in archive.namelist() and archive.read(byteorder).strip() == b"big"
            data = io.BytesIO(archive.read(prefix + "data.pkl"))
            return _RestrictedUnpickler(data, archive, prefix, big_endian, path).load()
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ModelFormatError(f"{path}: truncated or corrupt torch checkpoint ({exc})") from None
    except (pickle.UnpicklingError, TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise ModelFormatError(f"{path}: corrupt pickle in torch checkpoint ({type(exc).__name__}: {exc})") from None


# OpenAI names differ from mlx-whisper's only in the MLP (an nn.Sequential) and the conv layout.
_OPENAI_TO_MLX = ((".mlp.0.", ".mlp1."), (".mlp.2.", ".mlp2."))


def openai_to_mlx_weights(state_dict: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, value in state_dict.items():
        if name in ("encoder.positional_embedding", "decoder.mask", "alignment_heads"):
            continue  # computed by the model (or not a parameter)
        if not isinstance(value, np.ndarray):
            raise ModelFormatError(f"state dict entry {name!r} is not a tensor")
        for old, new in _OPENAI_TO_MLX:
            name = name.replace(old, new)
        if name in ("encoder.conv1.weight", "encoder.conv2.weight"):
            value = value.transpose(0, 2, 1)  # (out, in, kernel) -> (out, kernel, in)
        out[name] = value
    return out


def mlx_to_openai_weights(weights: dict[str, np.ndarray], dims: ModelDimensions) -> OrderedDict[str, np.ndarray]:
    # openai keeps the encoder's sinusoidal embedding as a (persistent) buffer, so include it
    dtype = weights["encoder.ln_post.weight"].dtype
    out = OrderedDict(
        [("encoder.positional_embedding", np.array(sinusoids(dims.n_audio_ctx, dims.n_audio_state)).astype(dtype))]
    )
    for name, value in weights.items():
        for old, new in _OPENAI_TO_MLX:
            name = name.replace(new, old)
        if name in ("encoder.conv1.weight", "encoder.conv2.weight"):
            value = value.transpose(0, 2, 1)
        out[name] = value
    return out


def parse_alignment_heads(value, dims: ModelDimensions) -> np.ndarray | None:
    """Alignment heads in any of the forms seen in the wild: (n, 2) pairs, a (layers, heads) boolean
    mask, or openai's base85-encoded gzip of that mask."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        try:
            raw = gzip.decompress(base64.b85decode(value))
        except (ValueError, OSError, EOFError) as exc:
            raise ModelFormatError(f"undecodable alignment_heads string ({exc})") from None
        value = np.frombuffer(raw, dtype=bool).copy()
    array = np.asarray(value)
    mask_size = dims.n_text_layer * dims.n_text_head
    if array.dtype == bool or ((array.ndim != 2 or array.shape[1] != 2) and array.size == mask_size):
        return np.argwhere(array.reshape(dims.n_text_layer, dims.n_text_head)).astype(np.int64)
    if array.ndim == 2 and array.shape[1] == 2:
        return array.astype(np.int64)
    raise ModelFormatError(f"alignment_heads of shape {array.shape} is neither (n, 2) pairs nor a layer x head mask")


def read_openai_checkpoint(path: str | Path) -> Checkpoint:
    """An OpenAI Whisper .pt ({"dims": {...}, "model_state_dict": {...}}), read without torch."""
    path = Path(path)
    obj = read_torch_zip(path)
    if not isinstance(obj, dict) or "dims" not in obj or "model_state_dict" not in obj:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ModelFormatError(
            f"{path}: not an OpenAI Whisper checkpoint (expected dims and model_state_dict, found {keys})"
        )
    try:
        dims = ModelDimensions.from_dict(dict(obj["dims"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: bad dims ({exc})") from None
    state = obj["model_state_dict"]
    heads = obj.get("alignment_heads", state.get("alignment_heads"))
    return Checkpoint(dims, openai_to_mlx_weights(state), parse_alignment_heads(heads, dims), source_format="openai")


def write_openai_pt(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write an OpenAI-style .pt that openai-whisper (and torch.load(weights_only=True)) can read.
    The alignment heads, when known, go in a top-level (n, 2) int64 `alignment_heads` tensor."""
    from .mlx import dequantize_checkpoint

    checkpoint = dequantize_checkpoint(checkpoint)
    obj: dict[str, Any] = {
        "dims": checkpoint.dims.to_dict(),
        "model_state_dict": mlx_to_openai_weights(checkpoint.weights, checkpoint.dims),
    }
    if checkpoint.alignment_heads is not None:
        obj["alignment_heads"] = np.asarray(checkpoint.alignment_heads, dtype=np.int64).reshape(-1, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_torch_zip(obj, path)
    return path
