"""Products of a few rows by a weight matrix copied into panels: the decoding steps' linear layers and
logits, through the small C kernel in the repository's csrc/panel_products.c; and the decoding steps'
attention through the same library (StepAttention).

A BLAS computes x Wᵀ for 2-30 rows far below the speed of reading W on some CPUs (its kernels are
made for larger products; docs/performance.md has the measurements). The kernel reads each panel of
16 weight rows once per block of rows and keeps the block's sums in vector registers. Every output is
one chain of fused multiply-adds in ascending k, so a row's result is the same bits whatever rows
share its product and however its columns are split over threads.

The kernel is an optional part of the package (setuptools builds it where a C compiler is found);
without it the callers use the BLAS (`available()` is False).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import itertools
import os
from pathlib import Path

import numpy as np

PANEL = 16  # weight rows per panel (the kernel's vector width)
MAX_ROWS = 128  # more rows (a prompt's hundreds) go to the BLAS, as fast there (docs/performance.md)
_library: list = []  # [ctypes library or None], resolved once


def _load():
    """The compiled kernel next to this module, or None (not built, or WHISPER_MLX_PANELS=0)."""
    if os.environ.get("WHISPER_MLX_PANELS", "").strip() == "0":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_panel_products{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            n, p = ctypes.c_long, ctypes.c_void_p
            lib.panel_product.argtypes = [p, n, n, n, p, n, n, n, p, p, n]
            lib.panel_product.restype = None
            lib.panels_per_block.restype = ctypes.c_int
            lib.use_instruction_set.argtypes = [ctypes.c_int]
            lib.use_instruction_set.restype = ctypes.c_int
            lib.instruction_set.restype = ctypes.c_int
            lib.attend_step.argtypes = [ctypes.POINTER(_Attention), n, n]
            lib.attend_step.restype = ctypes.c_int
            return lib
    return None


def _kernel():
    if not _library:
        _library.append(_load())
    return _library[0]


def available() -> bool:
    return _kernel() is not None


INSTRUCTION_SETS = ("baseline", "avx2", "avx512")  # the kernel's copies (x86-64 builds by GCC: all three)


def use_instruction_set(name: str | None = None) -> str | None:
    """Run the kernel copy for `name` (one of INSTRUCTION_SETS), or, when this CPU lacks it or name is
    None, for the best instruction set it has; returns the one in use (None without the kernel).
    Panel weights made before a change keep the block layout of the copy they were made for: make
    them again."""
    if name is not None and name not in INSTRUCTION_SETS:
        raise ValueError(f"unknown instruction set {name!r}: one of {', '.join(INSTRUCTION_SETS)}")
    lib = _kernel()
    if lib is None:
        return None
    return INSTRUCTION_SETS[lib.use_instruction_set(-1 if name is None else INSTRUCTION_SETS.index(name))]


def instruction_set() -> str | None:
    """The instruction set of the kernel copy in use (None without the kernel): for reports."""
    lib = _kernel()
    return None if lib is None else INSTRUCTION_SETS[lib.instruction_set()]


class PanelWeights:
    """A weight matrix W (width, k), as nn.Linear stores it (or the token embedding), copied into panels
    panels[p, k, j] = W[p·PANEL + j, k], zero past `width`, the panel count even (the AVX-512 kernel
    computes two panels at once)."""

    def __init__(self, weight: np.ndarray):
        lib = _kernel()
        if lib is None:
            raise RuntimeError("the panel kernel was not built (no C compiler at install)")
        self.width, self.inner = weight.shape
        count = -(-self.width // PANEL)
        count += count % 2
        # filled panel by panel from views of the weights: a padded copy would double the peak memory
        self.panels = np.zeros((count, self.inner, PANEL), np.float32)
        full = self.width // PANEL
        weight = np.asarray(weight, np.float32)
        self.panels[:full] = weight[: full * PANEL].reshape(full, PANEL, self.inner).transpose(0, 2, 1)
        if self.width > full * PANEL:
            self.panels[full, :, : self.width - full * PANEL] = weight[full * PANEL :].T
        self.step = int(lib.panels_per_block())  # panel ranges start at multiples of it

    def matmul(
        self, x: np.ndarray, bias: np.ndarray | None = None, out: np.ndarray | None = None, part: slice | None = None
    ) -> np.ndarray:
        """x Wᵀ (+ bias) for x (rows, k), into out (rows, width) when given; with `part` (a slice of
        panels, from split()) only those panels' columns of out are written."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.inner:
            raise ValueError(f"cannot multiply {x.shape} by the transposed ({self.width}, {self.inner}) weights")
        if out is None:
            out = np.empty((x.shape[0], self.width), np.float32)
        elif out.shape != (x.shape[0], self.width) or not out.flags.c_contiguous or out.dtype != np.float32:
            raise ValueError(f"cannot write a ({x.shape[0]}, {self.width}) product into {out.shape}")
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=np.float32)
        part = part or slice(0, len(self.panels))
        _kernel().panel_product(
            x.ctypes.data,
            x.shape[0],
            self.inner,
            self.inner,
            self.panels.ctypes.data,
            self.width,
            part.start,
            part.stop,
            None if bias is None else bias.ctypes.data,
            out.ctypes.data,
            self.width,
        )
        return out

    def split(self, parts: int) -> list[slice]:
        """The panels in `parts` contiguous ranges of about equal size, each starting at a multiple of
        the kernel's block."""
        blocks = len(self.panels) // self.step
        bounds = [round(blocks * i / parts) * self.step for i in range(parts + 1)]
        return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


class _Attention(ctypes.Structure):
    """csrc/panel_products.c's struct attention."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("q", "keys", "values", "mask", "out")),
        *(
            (name, ctypes.c_long)
            for name in (
                "n_head",
                "n_queries",
                "dim",
                "length",
                "key_item_stride",
                "key_ld",
                "value_item_stride",
                "mask_row_stride",
                "transposed",
            )
        ),
    ]


MAX_HEAD_DIM = 128  # the kernel's (Whisper's heads have 64 dimensions)


def _item_stride(a: np.ndarray) -> int | None:
    """The float stride between a (B, H, ...) array's heads when its windows are as far apart as H heads."""
    if a.dtype != np.float32 or (a.shape[0] > 1 and a.strides[0] != a.shape[1] * a.strides[1]):
        return None
    return a.strides[1] // 4


class StepAttention:
    """softmax(q keys_t + mask) values of a decoding step (a few queries per window and head) through
    the C kernel, one call per range of items (a window's head), each item's result the same bits
    however the items are split. Arrays as kernels.attend takes them: q (B, H, L, D), keys_t (B, H, D,
    S) read in place whether its rows or its columns are contiguous, values (B, H, S, D) with contiguous
    rows, mask (1 or B, 1, 1, S) or None."""

    def __init__(
        self, q: np.ndarray, keys_t: np.ndarray, values: np.ndarray, mask: np.ndarray | None, item_strides, lib
    ):
        """item_strides: (keys', values') float strides between heads, as of() found them."""
        batch, n_head, n_queries, dim = q.shape
        self.q = np.ascontiguousarray(q, dtype=np.float32)
        self.out = np.empty(q.shape, np.float32)
        self.arrays = (keys_t, values, mask)  # the struct points into them
        transposed = keys_t.strides[-1] == 4
        mask_stride = 0 if mask is None or mask.shape[0] == 1 else mask.strides[0] // 4
        self.struct = _Attention(
            self.q.ctypes.data,
            keys_t.ctypes.data,
            values.ctypes.data,
            None if mask is None else mask.ctypes.data,
            self.out.ctypes.data,
            n_head,
            n_queries,
            dim,
            keys_t.shape[-1],
            item_strides[0],
            (keys_t.strides[-2] if transposed else keys_t.strides[-1]) // 4,
            item_strides[1],
            mask_stride,
            int(transposed),
        )
        self.items = batch * n_head
        self.lib = lib

    @classmethod
    def of(cls, q: np.ndarray, keys_t: np.ndarray, values: np.ndarray, mask: np.ndarray | None):
        """The kernel's job for these arrays, or None where it cannot read them in place (or was not built)."""
        lib = _kernel()
        dim = q.shape[-1]
        if lib is None or dim % PANEL or dim > MAX_HEAD_DIM or keys_t.shape[-2] != dim or q.dtype != np.float32:
            return None
        if keys_t.shape[-1] == 0:
            return None
        item_strides = (_item_stride(keys_t), _item_stride(values))
        rows_or_columns = keys_t.strides[-1] == 4 or keys_t.strides[-2] == 4
        if not rows_or_columns or None in item_strides:
            return None
        if values.strides[-1] != 4 or values.strides[-2] != 4 * dim or values.shape[-2] != keys_t.shape[-1]:
            return None
        if mask is not None and (
            mask.dtype != np.float32 or q.shape[2] != 1 or mask.shape[1:3] != (1, 1) or mask.strides[-1] != 4
        ):
            return None
        return cls(q, keys_t, values, mask, item_strides, lib)

    def __call__(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """Compute items [first, last) (windows · heads) into self.out; returns it."""
        last = self.items if last is None else last
        if self.lib.attend_step(ctypes.byref(self.struct), first, last) != 0:
            raise MemoryError("the attention kernel could not allocate its scores")
        return self.out
