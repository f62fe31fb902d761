"""Many short files: transcribe_many against a loop of transcribe calls and faster-whisper's batched
pipeline, on 20 slices (5-30 s, cut in pauses) that together are alice_ch1 from start to end.

    python -m benchmarks.many                      # -> benchmarks/results/<date>-<machine>-many.{json,md}
    python -m benchmarks.many --systems many loop-12

The slices cover the whole chapter, so each system's WER is that of its 20 transcripts joined in order
against the chapter's reference. Times are the 20 transcriptions (the model loaded and warmed up on jfk
first); faster-whisper runs in the suite's venv through its runner, one subprocess per file whose timed
run is summed (its load and warm-up are outside the time, as here).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .corpus import BENCH_DIR, CACHE_DIR, SAMPLE_RATE, load_corpus, write_flac
from .machine import cores_in_use, machine_info, machine_slug
from .models import ct2_source, mlx_model
from .normalize import word_error_rate
from .systems import BY_KEY, ensure_venv, run_measurement, runner_command

N_FILES = 20
SHORTEST, LONGEST = 5.0, 30.0  # seconds per slice
SEED = 20261201
SYSTEMS = ("many", "loop-12", "loop-1", "faster-whisper-int8", "faster-whisper-fp32")
LABELS = {
    "many": "whisper_mlx transcribe_many (batch 12)",
    "loop-12": "whisper_mlx transcribe x20 (batch_size=12)",
    "loop-1": "whisper_mlx transcribe x20 (sequential)",
    "faster-whisper-int8": "faster-whisper BatchedInferencePipeline x20 (int8, batch 12)",
    "faster-whisper-fp32": "faster-whisper BatchedInferencePipeline x20 (fp32, batch 12)",
}


def quietest_frame(energy: np.ndarray, low: float, high: float) -> float:
    """The quietest 20 ms frame's time in [low, high] seconds."""
    first, last = int(low * 50), max(int(low * 50) + 1, int(high * 50))
    return (first + int(np.argmin(energy[first:last]))) / 50


def cut_points(samples: np.ndarray, seed: int = SEED) -> list[float]:
    """N_FILES - 1 cut times: near jittered equal shares, each in the quietest frame within 1.5 s, every
    slice between SHORTEST and LONGEST seconds."""
    duration = len(samples) / SAMPLE_RATE
    frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
    energy = (frames.astype(np.float64) ** 2).mean(axis=1)
    rng = np.random.default_rng(seed)
    cuts = [0.0]
    for k in range(1, N_FILES):
        left = N_FILES - k  # slices after this cut
        low = max(cuts[-1] + SHORTEST, duration - LONGEST * left) + 1.5
        high = min(cuts[-1] + LONGEST, duration - SHORTEST * left) - 1.5
        target = float(np.clip(k * duration / N_FILES + rng.uniform(-8, 8), low, high))
        cuts.append(quietest_frame(energy, target - 1.5, target + 1.5))
    return cuts[1:]


def make_slices(out_dir: Path) -> tuple[list[Path], str, list[float]]:
    """The slices as FLAC files (written once), the chapter's reference and each slice's seconds."""
    (chapter,) = load_corpus(["alice_ch1"])
    samples = np.load(chapter.samples)
    bounds = [0.0, *cut_points(samples), len(samples) / SAMPLE_RATE]
    paths, seconds = [], []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        path = out_dir / f"alice_ch1-{i:02d}-{start:07.2f}-{end:07.2f}.flac"
        if not path.exists():
            write_flac(samples[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)], path)
        paths.append(path)
        seconds.append(round(end - start, 2))
    return paths, chapter.reference, seconds


def time_whisper_mlx(system: str, files: list[Path], warmup: Path) -> tuple[float, list[str]]:
    """Seconds for the 20 transcriptions and their texts in file order (model loaded, warmed up)."""
    import whisper_mlx

    model = whisper_mlx.load_model(str(mlx_model("tiny.en", "float32")))
    whisper_mlx.transcribe(str(warmup), model=model, batch_size=12, language="en")
    start = time.perf_counter()
    if system == "many":
        done = dict(whisper_mlx.transcribe_many([str(f) for f in files], model=model, batch_size=12, language="en"))
        texts = [done[str(f)]["text"] for f in files]
    else:
        batch = 12 if system == "loop-12" else 1
        texts = [whisper_mlx.transcribe(str(f), model=model, batch_size=batch, language="en")["text"] for f in files]
    return time.perf_counter() - start, texts


def time_faster_whisper(system: str, files: list[Path], warmup_samples: Path, timeout: float) -> tuple[float, list]:
    """The suite's faster-whisper batched system (in its venv, its runner) on each file; the timed runs summed."""
    dtype = system.rsplit("-", 1)[1].replace("fp", "float")
    fw = replace(BY_KEY["faster-whisper-batched"], dtype=dtype)
    python = ensure_venv(fw)
    total, texts = 0.0, []
    for path in files:
        samples = CACHE_DIR / "many" / f"{path.stem}.npy"
        if not samples.exists():
            from .corpus import decode_audio

            np.save(samples, decode_audio(path))
        command = runner_command(fw, python, ct2_source("tiny.en"), samples, warmup_samples, 1, dtype, None)
        raw = run_measurement(fw, command, timeout)
        if "error" in raw:
            raise SystemExit(f"{system} on {path.name}: {raw['error']}")
        total += raw["times"][0]
        texts.append(raw["text"])
    return total, texts


def measure(systems: list[str], files: list[Path], reference: str, timeout: float) -> list[dict]:
    (jfk,) = load_corpus(["jfk"])
    rows = []
    for system in systems:
        print(f"-- {system} ...", flush=True)
        if system.startswith("faster-whisper"):
            seconds, texts = time_faster_whisper(system, files, jfk.samples, timeout)
        else:
            seconds, texts = time_whisper_mlx(system, files, jfk.audio)
        wer = word_error_rate(reference, " ".join(texts))
        rows.append({"system": system, "label": LABELS[system], "seconds": round(seconds, 2),
                     "wer": round(wer["wer"], 4), "wer_detail": wer, "texts": texts})  # fmt: skip
        print(f"   {LABELS[system]}: {seconds:.1f} s, WER {100 * wer['wer']:.1f}%", flush=True)
    return rows


def markdown(rows: list[dict], info: dict, seconds: list[float], command: str) -> str:
    many = next((r["seconds"] for r in rows if r["system"] == "many"), None)
    lines = [
        f"# Many short files: {N_FILES} slices of alice_ch1, tiny.en",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; cores busy with other work as it started: "
        f"{info['cores_in_use_start']}. Slices: {min(seconds):.1f}-{max(seconds):.1f} s, "
        f"{sum(seconds):.1f} s in all (alice_ch1 whole, cut in pauses).",
        "",
        "| system | time (s) | x transcribe_many's time | WER |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = f"{row['seconds'] / many:.2f}" if many else "-"
        lines.append(f"| {row['label']} | {row['seconds']:.1f} | {ratio} | {100 * row['wer']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per faster-whisper subprocess")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    slice_dir = CACHE_DIR / "many"
    slice_dir.mkdir(parents=True, exist_ok=True)
    files, reference, seconds = make_slices(slice_dir)
    info = machine_info()
    info["cores_in_use_start"] = cores_in_use()
    rows = measure(args.systems, files, reference, args.timeout)
    command = "python -m benchmarks.many " + shlex.join(argv if argv is not None else sys.argv[1:])
    stem = args.out / f"{dt.date.today().isoformat()}-{machine_slug()}-many"
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": info, "command": command, "slice_seconds": seconds, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, info, seconds, command.strip()))
    print(f"wrote {stem}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
