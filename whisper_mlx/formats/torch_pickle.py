"""Write torch.save-compatible zip checkpoints without torch.

The pickle is emitted opcode by opcode (protocol 2) because the standard pickler insists on importing
the globals it names (torch._utils._rebuild_tensor_v2, torch.HalfStorage), and torch is not needed here.
Only plain containers, scalars, strings and numpy arrays (stored as tensors) are supported: exactly
what `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}

MARK, STOP, TUPLE, EMPTY_TUPLE, REDUCE, BINPERSID = b"(", b".", b"t", b")", b"R", b"Q"
EMPTY_DICT, SETITEMS, EMPTY_LIST, APPENDS = b"}", b"u", b"]", b"e"
NONE, NEWTRUE, NEWFALSE = b"N", b"\x88", b"\x89"


class _PickleEmitter:
    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages: list[tuple[str, bytes]] = []

    def emit(self, value) -> None:
        if isinstance(value, np.ndarray):
            self._tensor(value)
        elif isinstance(value, OrderedDict):
            self._global("collections", "OrderedDict")
            self.out += EMPTY_TUPLE + REDUCE
            self._items(value)
        elif isinstance(value, dict):
            self.out += EMPTY_DICT
            self._items(value)
        elif isinstance(value, (list, tuple)):
            self._sequence(value)
        else:
            self._scalar(value)

    def _scalar(self, value) -> None:
        if value is None:
            self.out += NONE
        elif isinstance(value, (bool, np.bool_)):
            self.out += NEWTRUE if value else NEWFALSE
        elif isinstance(value, (int, np.integer)):
            self._int(int(value))
        elif isinstance(value, (float, np.floating)):
            self.out += b"G" + struct.pack(">d", float(value))  # BINFLOAT
        elif isinstance(value, str):
            encoded = value.encode("utf-8")
            self.out += b"X" + struct.pack("<I", len(encoded)) + encoded  # BINUNICODE
        else:
            raise TypeError(f"cannot store a {type(value).__name__} in a torch checkpoint")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])  # BININT1
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)  # BININT2
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(encoded)]) + encoded  # LONG1

    def _sequence(self, value) -> None:
        if isinstance(value, tuple):
            if not value:
                self.out += EMPTY_TUPLE
                return
            self.out += MARK
            for item in value:
                self.emit(item)
            self.out += TUPLE
            return
        self.out += EMPTY_LIST
        if value:
            self.out += MARK
            for item in value:
                self.emit(item)
            self.out += APPENDS

    def _items(self, mapping: dict) -> None:
        if not mapping:
            return
        self.out += MARK
        for key, item in mapping.items():
            self.emit(key)
            self.emit(item)
        self.out += SETITEMS

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL

    def _tensor(self, array: np.ndarray) -> None:
        """_rebuild_tensor_v2(storage, 0, size, contiguous stride, False, OrderedDict())."""
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if array.dtype not in _STORAGE_NAMES:
            raise TypeError(f"cannot store a {array.dtype} array as a torch tensor")
        key = str(len(self.storages))
        self.storages.append((key, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()))
        strides = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += MARK
        self.out += MARK + b"X" + struct.pack("<I", 7) + b"storage"
        self._global("torch", _STORAGE_NAMES[array.dtype])
        self.emit(key)
        self.emit("cpu")
        self.emit(int(array.size))
        self.out += TUPLE + BINPERSID
        self.emit(0)
        self.emit(tuple(int(d) for d in array.shape))
        self.emit(strides)
        self.emit(False)
        self.emit(OrderedDict())
        self.out += TUPLE + REDUCE


def torch_pickle(obj) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(data.pkl bytes, [(storage key, raw bytes)]) for an object of containers and numpy arrays."""
    emitter = _PickleEmitter()
    emitter.emit(obj)
    emitter.out += STOP
    return bytes(emitter.out), emitter.storages


def write_torch_zip(obj, path: str | Path, archive_name: str = "archive") -> None:
    """Write `obj` the way torch.save does (zip format, uncompressed entries), atomically."""
    path = Path(path)
    pickled, storages = torch_pickle(obj)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{archive_name}/data.pkl", pickled)
        archive.writestr(f"{archive_name}/byteorder", "little")
        for key, raw in storages:
            archive.writestr(f"{archive_name}/data/{key}", raw)
        archive.writestr(f"{archive_name}/version", "3\n")
    os.replace(tmp, path)
