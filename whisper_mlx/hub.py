"""Short model names (lightning-whisper-mlx's and mlx-whisper's) -> Hugging Face repos, and downloads
through the Hugging Face cache (never into the working directory, unlike lightning).

Short names follow lightning-whisper-mlx 0.0.10: `tiny`, `base`, `small`, `medium`, `large`,
`large-v2`, `large-v3` and the `distil-*` models (kept in subfolders of one repo), each optionally with
quant="4bit"/"8bit". Added here: the English-only `.en` models and `turbo` (large-v3-turbo).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelNotFoundError

QUANTS = ("4bit", "8bit")
_COMMUNITY = "mlx-community"
_DISTIL_REPO = "mustafaaljadery/distil-whisper-mlx"  # lightning's home for its distilled models
_DISTIL = ("distil-small.en", "distil-medium.en", "distil-large-v2", "distil-large-v3")


def _community(name: str, base_repo: str | None = None) -> dict:
    """mlx-community's whisper-<name>-mlx[-4bit|-8bit] convention."""
    repos: dict[str | None, str] = {None: base_repo or f"{_COMMUNITY}/whisper-{name}-mlx"}
    repos.update({q: f"{_COMMUNITY}/whisper-{name}-mlx-{q}" for q in QUANTS})
    return repos


def _distil(name: str) -> dict:
    # lightning stores these as mlx_models/<name>[-4-bit|-8-bit]/ inside one repo
    return {
        None: f"{_DISTIL_REPO}:mlx_models/{name}",
        "4bit": f"{_DISTIL_REPO}:mlx_models/{name}-4-bit",
        "8bit": f"{_DISTIL_REPO}:mlx_models/{name}-8-bit",
    }


_MODELS: dict[str, dict] = {
    "tiny": _community("tiny", f"{_COMMUNITY}/whisper-tiny"),  # lightning/mlx-whisper use the bare repo
    **{name: _community(name) for name in ("base", "small", "medium", "large", "large-v2", "large-v3")},
    **{f"{name}.en": _community(f"{name}.en") for name in ("tiny", "base", "small", "medium")},
    "turbo": {None: f"{_COMMUNITY}/whisper-large-v3-turbo"},
    **{name: _distil(name) for name in _DISTIL},
}
_MODELS["large-v3-turbo"] = _MODELS["turbo"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The files a Whisper model directory needs, in any supported layout (skips e.g. flax/tf/onnx weights).
_ALLOW_PATTERNS = [
    "*.json",
    "weights.npz",
    "weights.safetensors",
    "model.safetensors",
    "model-*.safetensors",
    "model.bin",
    "vocabulary.*",
    "*.tiktoken",
    "*.txt",
]


def available_models() -> list[str]:
    """The short model names load_model accepts (each also with quant="4bit"/"8bit" where published)."""
    return sorted(_MODELS)


def is_model_name(name: str) -> bool:
    return name in _MODELS


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def repo_for(name: str, quant: str | None = None) -> tuple[str, str | None]:
    """(repo id, subfolder or None) for a short name; ModelNotFoundError listing the names otherwise."""
    if name not in _MODELS:
        raise ModelNotFoundError(
            f"unknown model name {name!r}; available: {', '.join(available_models())} "
            "(or pass a local path or a Hugging Face repo id)"
        )
    if quant not in (None, *QUANTS):
        raise ValueError(f"quant must be None, '4bit' or '8bit', not {quant!r}")
    variants = _MODELS[name]
    if quant not in variants:
        assert quant is not None  # every name has a full-precision (None) variant
        raise ModelNotFoundError(
            f"no published {quant} variant of {name!r}; make one with "
            f"`python -m whisper_mlx.convert {name} OUT_DIR -q --q-bits {quant[0]}`"
        )
    repo, _, subfolder = variants[quant].partition(":")
    return repo, subfolder or None


def _offline() -> bool:
    # read at call time: huggingface_hub only reads HF_HUB_OFFLINE when it is first imported
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(
    repo_id: str, subfolder: str | None = None, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The local snapshot directory of a Hub repo, downloading it if needed into cache_dir (default: the
    HF cache, or HF_HUB_CACHE)."""
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/{p}" for p in _ALLOW_PATTERNS] if subfolder else list(_ALLOW_PATTERNS)
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=_offline(),
            cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE") or None,
        )
    except Exception as exc:  # every hub failure (offline, not cached, 404, gated, network) reads the same to users
        hint = (
            "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it once online"
            if _offline()
            else "check the repo id and your network, or pass a local model directory"
        )
        raise ModelNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face Hub: {hint} ({type(exc).__name__}: {exc})"
        ) from exc
    path = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not path.is_dir():
        raise ModelNotFoundError(f"{repo_id!r} has no folder {subfolder!r}")
    return path
