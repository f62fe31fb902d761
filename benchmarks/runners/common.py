"""Shared by the runner scripts, which execute inside each system's own virtual environment.

Standard library plus numpy only (every venv has numpy). Protocol: a runner loads the model, warms
up on ``--warmup-audio``, transcribes ``--audio`` ``--runs`` times, and prints exactly one line
``@@BENCH_RESULT@@ {json}`` on stdout: the last run's text, every run's wall time, the model-load
time and the process's peak RSS (``ru_maxrss``, so it includes model, warm-up and all runs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import time
from importlib import metadata

RESULT_MARKER = "@@BENCH_RESULT@@"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time one system on one audio file.")
    parser.add_argument("--model", required=True, help="model directory in this system's format")
    parser.add_argument("--audio", required=True, help=".npy of float32 16 kHz mono samples")
    parser.add_argument("--warmup-audio", help=".npy transcribed once before timing (default: --audio)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--language", default="en")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--beam-size", type=int, default=1, help="1: greedy; more: beam search (best_of 5)")
    parser.add_argument("--dtype", default="float32", help="float32|float16 (MLX) or a CTranslate2 compute type")
    parser.add_argument("--blas", default="", help="shared library to load with RTLD_GLOBAL before mlx.core")
    return parser.parse_args(argv)


def preload_blas(path: str) -> str:
    """Load ``path`` globally so MLX's cblas_* calls resolve to it; must run before ``import mlx.core``."""
    if not path:
        return "as installed"
    if "mlx.core" in sys.modules:
        raise RuntimeError("preload_blas must run before mlx.core is imported")
    if "mkl" in os.path.basename(path):
        os.environ.setdefault("KMP_BLOCKTIME", "0")  # as whisper_mlx's own preload does, for a like-for-like BLAS
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    return path


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def versions(*packages: str) -> dict[str, str]:
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def load_samples(path: str):
    import numpy as np

    return np.load(path).astype(np.float32)


def measure(load, transcribe, args: argparse.Namespace, info: dict) -> None:
    """Time ``load()`` once, ``transcribe(model, samples)`` for warm-up and ``args.runs`` runs; print the result."""
    audio = load_samples(args.audio)
    warmup = load_samples(args.warmup_audio) if args.warmup_audio else audio
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    transcribe(model, warmup)
    warmup_s = time.perf_counter() - start
    times, text = [], ""
    for _ in range(max(1, args.runs)):
        start = time.perf_counter()
        text = transcribe(model, audio)
        times.append(time.perf_counter() - start)
    emit({"text": text, "times": times, "load_s": load_s, "warmup_s": warmup_s,
          "peak_rss_bytes": peak_rss_bytes(), "python": sys.version.split()[0], **info})  # fmt: skip


def emit(result: dict) -> None:
    sys.stdout.flush()
    print(RESULT_MARKER, json.dumps(result), flush=True)
