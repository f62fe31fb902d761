"""The MLX runtime: an optimized BLAS for MLX's Linux CPU device, the device MLX computes on, and the
default compute dtype.

The mlx[cpu] wheel links netlib's reference BLAS, tens of times slower than MKL or OpenBLAS. Loading one
of those with RTLD_GLOBAL *before* mlx.core is first imported makes MLX resolve cblas_* to it, so this
module must not import mlx at import time.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
import warnings

logger = logging.getLogger("whisper_mlx")

_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_state = {"blas": None, "blas_path": None, "status": "not attempted"}


def _mkl_candidates() -> list[str]:
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))])
    found = []
    for prefix in prefixes:
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    return found


def find_blas() -> tuple[str, str] | None:
    """(kind, path) of the BLAS to preload, honouring WHISPER_MLX_BLAS=off|<path>."""
    setting = os.environ.get("WHISPER_MLX_BLAS", "").strip()
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    if setting:
        return ("custom", setting)
    for path in _mkl_candidates():
        return ("mkl", path)
    for path in _SYSTEM_OPENBLAS:
        if os.path.exists(path):
            return ("openblas", path)
    return None


def preload_blas() -> None:
    """Load an optimized BLAS globally before mlx.core, once; a no-op off Linux."""
    if _state["status"] != "not attempted" or not sys.platform.startswith("linux"):
        if _state["status"] == "not attempted":
            _state["status"] = "not needed on this platform"
        return
    choice = find_blas()
    if choice is None:
        _state["status"] = "off" if os.environ.get("WHISPER_MLX_BLAS") else "none found"
        return
    if "mlx.core" in sys.modules:
        _state["status"] = "mlx.core imported first"
        warnings.warn(
            "whisper_mlx: mlx.core was imported before whisper_mlx, so the optimized BLAS "
            f"({choice[1]}) could not be applied and CPU matmuls use the slow reference BLAS. "
            "Import whisper_mlx before mlx, or preload it with LD_PRELOAD.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    kind, path = choice
    if kind == "mkl":
        # MKL's OpenMP threads otherwise spin after each parallel matmul on the cores the numpy kernels need
        os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as exc:
        _state["status"] = f"failed to load {path}: {exc}"
        logger.warning("whisper_mlx: could not load BLAS %s: %s", path, exc)
        return
    _state.update(blas=kind, blas_path=path, status="loaded")


def preloaded_blas_path() -> str | None:
    """The optimized BLAS loaded for MLX (the numpy backend calls it directly too), or None."""
    return _state["blas_path"]


def on_cpu() -> bool:
    """Whether MLX computes on its CPU device (where the numpy backend can serve plain float32 models)."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def default_dtype():
    """float16 on a GPU (Metal, CUDA); float32 on the CPU, where half-precision matmuls skip BLAS."""
    import mlx.core as mx

    return mx.float32 if on_cpu() else mx.float16


def end_mlx_thread() -> None:
    """Destroy the MLX streams this thread created: a thread that ran MLX work must, or the process
    may abort at exit ("terminate called without an active exception"; MLX leaves it to the caller)."""
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "clear_streams"):
        mx.clear_streams()


def gpu_available() -> bool:
    """Whether MLX can compute on a GPU here (Metal, or CUDA in an mlx-cuda build)."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return mx.metal.is_available() or (cuda is not None and cuda.is_available())


def device_name() -> str:
    """The device MLX computes on: metal, cuda or cpu."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def blas_info() -> dict:
    """Which BLAS serves MLX's CPU matmuls, and how it was found."""
    return {
        "blas": _state["blas"] or "reference (bundled)",
        "blas_path": _state["blas_path"],
        "blas_status": _state["status"],
    }
