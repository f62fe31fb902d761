"""Matrix products (and MKL's vectorised exp and normal CDF) on numpy arrays through the BLAS that
runtime.py preloaded for MLX.

numpy's wheels bring their own OpenBLAS, whose kernels for a few rows (a decoding step's products and
logits) are slow on Intel CPUs (on AMD EPYC CPUs they are faster, but see products_library). The host
decoder's products therefore call the preloaded library's cblas_sgemm
directly (ctypes); WHISPER_MLX_PRODUCTS=numpy sends them to numpy instead (products_library()).
Without a preloaded BLAS (or for other dtypes and layouts) the same functions fall back to numpy. With
MKL, the logits of several rows read a packed copy of the embedding (PackedOperand).

MKL's vector math library also has the normal CDF, Φ, for the exact GELU x Φ(x): one SIMD pass instead
of the ~20 numpy passes of kernels.py's erf approximation; and exp, for the attention's softmax, faster
and more accurate than numpy's.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from ... import runtime

_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
_library: list = []  # [ctypes library or None], resolved once


def _blas():
    if not _library:
        lib = None
        path = runtime.preloaded_blas_path()
        if path is not None:
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                _declare(lib)
            except (OSError, AttributeError):  # no cblas symbols: numpy does the work
                lib = None
        _library.append(lib)
    return _library[0]


# read once: products_library() is called for every product of every decoding step
_NUMPY_PRODUCTS = os.environ.get("WHISPER_MLX_PRODUCTS", "").strip().lower() == "numpy"


def products_library():
    """The preloaded library whose products to call, or None for numpy's (WHISPER_MLX_PRODUCTS=numpy at
    import). numpy's OpenBLAS is faster per product on AMD EPYC CPUs, but its threads spin after each call
    on the cores the loader and encoder threads need, and MKL's threads stay on the calling thread
    (docs/experiments.md)."""
    return None if _NUMPY_PRODUCTS else _blas()


def _declare(lib) -> None:
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.cblas_sgemm.restype = None
    lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    if hasattr(lib, "cblas_sgemm_pack"):  # MKL's packed products; OpenBLAS has none
        lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
        lib.cblas_sgemm_pack_get_size.argtypes = [i, i, i, i]
        lib.cblas_sgemm_pack.restype = None
        lib.cblas_sgemm_pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
        lib.cblas_sgemm_compute.restype = None
        lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
    for name in _VECTOR_FUNCTIONS:  # MKL's; OpenBLAS has no vector math
        function = getattr(lib, name, None)
        if function is not None:
            function.restype = None
            function.argtypes = [ctypes.c_int64, p, p, ctypes.c_int64]
    if hasattr(lib, "MKL_Set_Num_Threads_Local"):  # (the lowercase name takes a pointer)
        lib.MKL_Set_Num_Threads_Local.restype = i
        lib.MKL_Set_Num_Threads_Local.argtypes = [i]


_VECTOR_FUNCTIONS = ("vmsCdfNorm", "vmsExp")


def use_one_thread_here() -> None:
    """MKL runs on the calling thread only, from now on (for kernels.py's workers, which share the
    cores out among themselves). MKL's global thread count, which threadpoolctl sets, did not keep its
    calls from worker threads off other threads."""
    lib = _blas()
    if lib is not None and hasattr(lib, "MKL_Set_Num_Threads_Local"):
        lib.MKL_Set_Num_Threads_Local(1)


# high accuracy, and results below float32's normal range flushed to zero: denormals slow the next product
_VML_HA_FTZ = 0x00000002 | 0x00280000


def has_normal_cdf() -> bool:
    lib = _blas()
    return lib is not None and hasattr(lib, "vmsCdfNorm")


def normal_cdf_into(x: np.ndarray, out: np.ndarray) -> None:
    """out = Φ(x) elementwise, for contiguous float32 arrays of one size (needs has_normal_cdf())."""
    _blas().vmsCdfNorm(x.size, x.ctypes.data, out.ctypes.data, _VML_HA_FTZ)


def has_exp() -> bool:
    lib = _blas()
    return lib is not None and hasattr(lib, "vmsExp")


def exp_into(x: np.ndarray, out: np.ndarray) -> None:
    """out = exp(x) elementwise (x and out may be one array): MKL's when has_exp(), else numpy's."""
    if (
        has_exp()
        and x.dtype == out.dtype == np.float32
        and x.flags.c_contiguous
        and out.flags.c_contiguous
        and x.shape == out.shape
    ):
        _blas().vmsExp(x.size, x.ctypes.data, out.ctypes.data, _VML_HA_FTZ)
    else:
        np.exp(x, out=out)


def _row_major(a: np.ndarray) -> bool:
    """A float32 matrix the BLAS can read in place: unit column stride, rows a whole number of floats apart."""
    return (
        a.dtype == np.float32
        and a.flags.aligned
        and a.strides[-1] == 4
        and a.strides[-2] % 4 == 0
        and a.strides[-2] >= 4 * a.shape[-1]
    )


def _operand(b: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """(array, transpose flag, leading dimension) of a 2-D right operand the BLAS can read in place."""
    if _row_major(b):
        return b, _NO_TRANS, b.strides[0] // 4
    if _row_major(b.T):
        return b.T, _TRANS, b.T.strides[0] // 4
    return None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b for a 2-D float32 a (rows, k) and b (k, n), b possibly a transposed view (nn.Linear's
    weight.T is read in place); written into `out` (rows, n) when given."""
    lib = products_library()
    # one row: numpy's OpenBLAS gemv is as fast as MKL (and has less call overhead)
    blas_shapes = a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0] and a.shape[0] > 1
    operand = _operand(b) if lib is not None and blas_shapes else None
    if out is not None and not (out.shape == (a.shape[0], b.shape[1]) and out.flags.c_contiguous):
        operand = None
    if operand is None or not _row_major(a) or a.shape[0] * b.shape[1] == 0:
        return np.matmul(a, b, out=out)  # (which also raises on mismatched shapes)
    rows, inner = a.shape
    out = np.empty((rows, b.shape[1]), np.float32) if out is None else out
    data, trans, ldb = operand
    lib.cblas_sgemm(
        _ROW_MAJOR,
        _NO_TRANS,
        trans,
        rows,
        b.shape[1],
        inner,
        1.0,
        a.ctypes.data,
        a.strides[0] // 4,
        data.ctypes.data,
        ldb,
        0.0,
        out.ctypes.data,
        b.shape[1],
    )
    return out


# the row count MKL lays a packed copy out for (a copy packed for 1 row made 6-row products slower)
PACK_ROWS = 8


class PackedOperand:
    """A right operand b (k, n) copied once into MKL's packed layout (cblas_sgemm_pack), for many
    products with a few rows: the decoder's logits. MKL's products of 2 or more rows run faster from
    the packed copy (measured, not explained here; one row runs slower). The copy is larger than b,
    and the results are the plain product's, bit for bit."""

    def __init__(self, b: np.ndarray):
        if not self.available() or not _row_major(b) or b.strides[0] != 4 * b.shape[1]:
            raise ValueError("packing needs MKL and a contiguous float32 matrix")
        lib = _blas()
        self.inner, self.width = b.shape
        size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, PACK_ROWS, self.width, self.inner)
        self.buffer = np.empty(size, np.uint8)  # numpy never moves it (MKL's packed data must stay put)
        lib.cblas_sgemm_pack(
            _ROW_MAJOR,
            _B_MATRIX,
            _NO_TRANS,
            PACK_ROWS,
            self.width,
            self.inner,
            1.0,
            b.ctypes.data,
            self.width,
            self.buffer.ctypes.data,
        )

    @classmethod
    def available(cls) -> bool:
        lib = products_library()
        return lib is not None and hasattr(lib, "cblas_sgemm_pack")

    def matmul(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """a @ b for a (rows, k) float32 matrix, written into `out` (rows, width) when given: any
        float32 matrix with unit column stride, such as a block of columns of a wider one."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != self.inner:
            raise ValueError(f"cannot multiply {a.shape} by the packed ({self.inner}, {self.width})")
        if out is None:
            out = np.empty((a.shape[0], self.width), np.float32)
        elif out.shape != (a.shape[0], self.width) or not _row_major(out):
            raise ValueError(f"cannot write a ({a.shape[0]}, {self.width}) product into {out.shape}")
        if a.shape[0]:
            _blas().cblas_sgemm_compute(
                _ROW_MAJOR,
                _NO_TRANS,
                _PACKED,
                a.shape[0],
                self.width,
                self.inner,
                a.ctypes.data,
                self.inner,
                self.buffer.ctypes.data,
                self.width,
                0.0,
                out.ctypes.data,
                out.strides[0] // 4,
            )
        return out
