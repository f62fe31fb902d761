"""The systems compared, their virtual environments, and one measurement = one subprocess.

Each upstream package gets its own venv under ``benchmarks/.venvs/<venv>`` (created and filled by
the suite with pip; a marker file records what was installed so later runs skip the work).
whisper_mlx runs in the current interpreter with this checkout on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".venvs"
RUNNER_DIR = BENCH_DIR / "runners"
RESULT_MARKER = "@@BENCH_RESULT@@"
LINUX = sys.platform.startswith("linux")
# torch first: on Linux pip takes torch 2.13.0 (CPU) from a local wheel; mlx[cpu] is MLX's Linux CPU build.
_TORCH = ("torch==2.13.0",) if LINUX else ()
_MLX_CPU = ("mlx[cpu]",) if LINUX else ()


@dataclass(frozen=True)
class System:
    key: str  # command-line name
    label: str  # name in tables and charts
    runner: str  # script in benchmarks/runners
    weights: str  # "mlx" (converted dir) or "ct2" (CTranslate2 dir as shipped)
    venv: str | None = None  # None: the current interpreter
    install: tuple[tuple[str, ...], ...] = ()  # pip install steps, in order
    batch_size: int = 1
    beam_size: int = 1  # 1: greedy; faster-whisper's default and openai's CLI search 5 beams
    dtype: str | None = None  # None: float32 on CPU, float16 on Metal (MLX systems)
    blas: bool = False  # preload the optimized BLAS before mlx.core (Linux CPU)
    notes: str = ""
    tags: frozenset = field(default_factory=frozenset)


_MLXW = {"runner": "mlx_whisper_runner.py", "weights": "mlx", "venv": "mlx_whisper",
         "install": (_TORCH, ("mlx-whisper==0.4.3", *_MLX_CPU))}  # fmt: skip
_LIGHTNING = {"runner": "lightning_runner.py", "weights": "mlx", "venv": "lightning", "batch_size": 12,
              "install": (_TORCH, ("lightning-whisper-mlx==0.0.10", *_MLX_CPU))}  # fmt: skip
_FASTER = {"runner": "faster_whisper_runner.py", "weights": "ct2", "venv": "faster_whisper",
           "install": (("faster-whisper",),)}  # fmt: skip

SYSTEMS: list[System] = [
    System(
        "whisper_mlx-batched",
        "whisper_mlx (batched 12)",
        "whisper_mlx_runner.py",
        "mlx",
        batch_size=12,
        notes="reference for the ratio column",
        tags=frozenset({"whisper_mlx", "quick"}),
    ),
    System(
        "whisper_mlx",
        "whisper_mlx (sequential)",
        "whisper_mlx_runner.py",
        "mlx",
        tags=frozenset({"whisper_mlx", "quick"}),
    ),
    System(
        "whisper_mlx-beam5-batched",
        "whisper_mlx (batched 12, 5 beams)",
        "whisper_mlx_runner.py",
        "mlx",
        batch_size=12,
        beam_size=5,
        notes="beam_size=5, best_of=5 (openai's CLI defaults)",
        tags=frozenset({"beam"}),
    ),
    System(
        "whisper_mlx-beam5",
        "whisper_mlx (sequential, 5 beams)",
        "whisper_mlx_runner.py",
        "mlx",
        beam_size=5,
        notes="beam_size=5, best_of=5 (openai's CLI defaults)",
        tags=frozenset({"beam"}),
    ),
    System(
        "mlx-whisper",
        "mlx-whisper 0.4.3",
        blas=LINUX,
        notes="optimized BLAS preloaded" if LINUX else "",
        tags=frozenset({"mlx-peer"}),
        **_MLXW,
    ),
    System(
        "lightning",
        "lightning-whisper-mlx 0.0.10 (batch 12)",
        blas=LINUX,
        notes="optimized BLAS preloaded" if LINUX else "",
        tags=frozenset({"mlx-peer"}),
        **_LIGHTNING,
    ),
    System(
        "faster-whisper-fp32",
        "faster-whisper fp32",
        dtype="float32",
        notes="CTranslate2, greedy",
        tags=frozenset({"faster-whisper"}),
        **_FASTER,
    ),
    System(
        "faster-whisper-int8",
        "faster-whisper int8",
        dtype="int8",
        notes="CTranslate2, greedy",
        tags=frozenset({"faster-whisper"}),
        **_FASTER,
    ),
    System(
        "faster-whisper-beam5-fp32",
        "faster-whisper fp32, 5 beams",
        dtype="float32",
        beam_size=5,
        notes="CTranslate2, its default decoding (beam_size=5, best_of=5)",
        tags=frozenset({"beam"}),
        **_FASTER,
    ),
    System(
        "faster-whisper-beam5-int8",
        "faster-whisper int8, 5 beams",
        dtype="int8",
        beam_size=5,
        notes="CTranslate2, its default decoding (beam_size=5, best_of=5)",
        tags=frozenset({"beam"}),
        **_FASTER,
    ),
    System(
        "faster-whisper-batched",
        "faster-whisper int8 batched 12",
        dtype="int8",
        batch_size=12,
        notes="BatchedInferencePipeline (Silero VAD), greedy",
        tags=frozenset({"faster-whisper"}),
        **_FASTER,
    ),
]
if LINUX:  # what mlx-whisper / lightning users get on Linux: the reference BLAS bundled with mlx[cpu]
    SYSTEMS += [
        System(
            "mlx-whisper-as-installed",
            "mlx-whisper 0.4.3 as installed",
            notes="no BLAS preload",
            tags=frozenset({"mlx-peer", "as-installed"}),
            **_MLXW,
        ),
        System(
            "lightning-as-installed",
            "lightning-whisper-mlx 0.0.10 (batch 12) as installed",
            notes="no BLAS preload",
            tags=frozenset({"mlx-peer", "as-installed"}),
            **_LIGHTNING,
        ),
    ]
BY_KEY = {system.key: system for system in SYSTEMS}
REFERENCE_KEY = "whisper_mlx-batched"


def venv_python(system: System) -> Path:
    if system.venv is None:
        return Path(sys.executable)
    return VENV_DIR / system.venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _pip(python: Path, packages: tuple[str, ...], log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ pip install {' '.join(packages)}\n")
        out.flush()
        done = subprocess.run([str(python), "-m", "pip", "install", *packages], stdout=out, stderr=subprocess.STDOUT,
                              check=False)  # fmt: skip
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"pip install {' '.join(packages)} failed (log {log}):\n" + "\n".join(tail))


def ensure_venv(system: System) -> Path:
    """Create and fill ``system``'s venv unless its marker says it is already done; return its python."""
    python = venv_python(system)
    if system.venv is None:
        return python
    root = VENV_DIR / system.venv
    marker = root / ".bench-installed.json"
    wanted = json.dumps([list(step) for step in system.install])
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    log = VENV_DIR / f"{system.venv}.log"
    print(f"setting up {root} (log: {log}) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    for step in system.install:
        if step:
            _pip(python, step, log)
    marker.write_text(wanted)
    return python


def runner_env(system: System) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if system.venv is None:
        from .models import project_env

        env["PYTHONPATH"] = project_env()["PYTHONPATH"]
    return env


def runner_command(system: System, python: Path, model: Path, samples: Path, warmup: Path, runs: int,
                   dtype: str, blas_path: str | None, language: str = "en") -> list[str]:  # fmt: skip
    command = [str(python), str(RUNNER_DIR / system.runner), "--model", str(model), "--audio", str(samples),
               "--warmup-audio", str(warmup), "--runs", str(runs), "--language", language,
               "--batch-size", str(system.batch_size), "--beam-size", str(system.beam_size),
               "--dtype", system.dtype or dtype]  # fmt: skip
    if system.blas and blas_path:
        command += ["--blas", blas_path]
    return command


def run_measurement(system: System, command: list[str], timeout: float) -> dict:
    """Run one runner subprocess; its result dict, or ``{"error": ...}`` with the output's tail."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=runner_env(system),
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
    return {"error": f"exit {done.returncode}: " + "\n".join(tail)}
