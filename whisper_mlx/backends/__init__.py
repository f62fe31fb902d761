"""Backends: the one seam between the algorithms and the hardware (see interface.py).

A model's backend is chosen once, when it is loaded (`load_model(..., backend=...)`) or on first use,
and kept on the model: `auto` (the default, or the WHISPER_MLX_BACKEND environment variable) takes numpy
for plain float32 models while MLX computes on the CPU, and MLX everywhere else.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import BackendError
from ..runtime import blas_info, default_dtype, device_name, on_cpu
from .interface import Backend, DecoderState
from .mlx_backend import MLXBackend
from .numpy_backend import NumpyBackend, panels, unsupported_reason

BACKEND_NAMES = ("auto", "mlx", "numpy")
ENVIRONMENT_VARIABLE = "WHISPER_MLX_BACKEND"

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "DecoderState",
    "backend_for",
    "backend_info",
    "requested_backend",
    "select_backend",
]


def requested_backend(name: str | None = None) -> str:
    """The backend name asked for: `name`, else WHISPER_MLX_BACKEND, else auto; checked."""
    chosen = (name or os.environ.get(ENVIRONMENT_VARIABLE) or "auto").strip().lower()
    if chosen not in BACKEND_NAMES:
        source = f"{ENVIRONMENT_VARIABLE}={chosen!r}" if name is None else repr(name)
        raise BackendError(f"unknown backend {source}: choose one of {', '.join(BACKEND_NAMES)}")
    return chosen


def select_backend(model, name: str | None = None) -> Backend:
    """Build the backend `name` (auto, mlx, numpy) for `model`; numpy where it cannot run is an error."""
    chosen = requested_backend(name)
    reason = unsupported_reason(model) if chosen != "mlx" else None
    if chosen == "numpy" and reason is not None:
        raise BackendError(f"the numpy backend cannot run this model: {reason}")
    if chosen == "numpy" or (chosen == "auto" and reason is None):
        return NumpyBackend(model)
    return MLXBackend(model)


def backend_for(model, name: str | None = None) -> Backend:
    """The model's backend: the one chosen when it was loaded, else chosen now and kept on the model."""
    backend = getattr(model, "backend", None)
    if backend is None or (name is not None and requested_backend(name) not in ("auto", backend.name)):
        backend = select_backend(model, name)
        model.backend = backend  # a plain attribute, not a parameter
    return backend


def backend_info(model=None) -> dict:
    """The device MLX computes on, the default dtype, the BLAS serving CPU matmuls, the instruction set
    of the numpy backend's panel kernel (None when it was not built), and the backend `model` uses (or,
    without a model, the one a float32 model would get here)."""
    if model is not None:
        backend = backend_for(model).name
    else:
        chosen = requested_backend()
        backend = chosen if chosen != "auto" else ("numpy" if on_cpu() else "mlx")
    return {
        "backend": backend,
        "device": device_name(),
        "default_dtype": str(default_dtype()).replace("mlx.core.", ""),
        **blas_info(),
        "panel_kernel": panels.instruction_set(),
        "mlx_version": getattr(mx, "__version__", "unknown"),
    }
