"""Benchmark whisper_mlx against mlx-whisper, lightning-whisper-mlx and faster-whisper.

    python -m benchmarks.run                 # full comparison -> benchmarks/results/<date>-<machine>.{json,md,png}
    python -m benchmarks.run --quick         # jfk + ls_test, tiny.en, one run -> benchmarks/out/
    python -m benchmarks.run --quick --systems whisper_mlx   # CI smoke run (whisper_mlx alone)
    python -m benchmarks.run --memory        # peak RSS on a 10-min and a 2-h file -> benchmarks/results/

See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from . import report
from .corpus import BENCH_DIR, AudioFile, load_corpus
from .machine import load_average, machine_info, optimized_blas
from .models import ct2_source, mlx_model
from .normalize import word_error_rate
from .systems import BY_KEY, REFERENCE_KEY, SYSTEMS, System, ensure_venv, run_measurement, runner_command

QUICK_FILES = ["jfk", "ls_test"]
LONG_FILES = ["alice_ch1", "alice_ch2_gb", "alice_ch1_brown", "alice_ch2_gb_babble"]  # the quality gate's files
FULL_FILES = ["jfk", "ls_test", *LONG_FILES, "alice_x3"]
GENERATED = {"alice_x3"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="CI smoke mode: jfk + ls_test, tiny.en, one run, to benchmarks/out"
    )
    p.add_argument("--systems", nargs="+", default=["all"],
                   help=f"system keys or groups (all, whisper_mlx, mlx-peer, faster-whisper, as-installed); "
                        f"keys: {', '.join(BY_KEY)}")  # fmt: skip
    p.add_argument("--files", nargs="+", help=f"corpus names (default quick: {QUICK_FILES}, full: {FULL_FILES})")
    p.add_argument("--model", default="tiny.en", help="tiny.en or base (default tiny.en)")
    p.add_argument(
        "--runs", type=int, help="timed runs per file after one warm-up; the median is reported (default 3, quick 1)"
    )
    p.add_argument(
        "--long-runs", type=int, default=1, help="timed runs on generated long files (memory test; default 1)"
    )
    p.add_argument("--as-installed-files", nargs="+", default=["jfk", "ls_test"],
                   help="files the slow 'as installed' (no BLAS) variants run on; 'all' for every file")  # fmt: skip
    p.add_argument("--warmup-file", default="jfk", help="corpus file transcribed once before timing (default jfk)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results, quick: benchmarks/out)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measurement")
    p.add_argument("--memory", action="store_true",
                   help="only the memory test: whisper_mlx peak RSS on a 10-minute and a 2-hour file, "
                        "and their ratio")  # fmt: skip
    p.add_argument(
        "--no-setup", action="store_true", help="skip systems whose venv is not ready instead of creating it"
    )
    p.add_argument("--readme", choices=["auto", "yes", "no"], default="auto",
                   help="embed the table in benchmarks/README.md "
                        "(auto: in full mode when --out is the default)")  # fmt: skip
    args = p.parse_args(argv)
    args.files = args.files or (QUICK_FILES if args.quick else FULL_FILES)
    args.runs = args.runs or (1 if args.quick else 3)
    default_out = BENCH_DIR / ("out" if args.quick else "results")
    if args.readme == "auto":
        args.readme = "yes" if not args.quick and args.out is None else "no"
    args.out = args.out or default_out
    return args


def select_systems(names: list[str]) -> list[System]:
    """Systems matching keys or tags, in SYSTEMS order; 'all' is every system."""
    wanted = {n.strip() for name in names for n in name.split(",") if n.strip()}
    known_tags = {tag for s in SYSTEMS for tag in s.tags} | {"all"}
    unknown = wanted - set(BY_KEY) - known_tags
    if unknown:
        raise SystemExit(f"unknown system(s) {sorted(unknown)}; keys: {list(BY_KEY)}; groups: {sorted(known_tags)}")
    return [s for s in SYSTEMS if "all" in wanted or s.key in wanted or s.tags & wanted]


def mlx_dtype() -> str:
    """float16 where MLX computes on Metal, float32 on CPU (float16 CPU matmuls are ~60x slower)."""
    import platform

    return "float16" if sys.platform == "darwin" and platform.machine() == "arm64" else "float32"


def prepare_systems(systems: list[System], no_setup: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """Each system's python (creating venvs as needed), and a setup error per system that failed."""
    pythons, errors = {}, {}
    for system in systems:
        if no_setup and system.venv and not (BENCH_DIR / ".venvs" / system.venv / ".bench-installed.json").exists():
            errors[system.key] = "venv not set up (--no-setup)"
            continue
        try:
            pythons[system.key] = ensure_venv(system)
        except Exception as exc:  # one broken upstream package must not stop the others
            errors[system.key] = f"setup failed: {exc}"
            print(f"!! {system.key}: {errors[system.key]}", flush=True)
    return pythons, errors


def summarize(system: System, audio: AudioFile, raw: dict) -> dict:
    """One result row: the runner's raw output plus median time, x real time, WER and peak RSS."""
    row = {"system": system.key, "label": system.label, "file": audio.name, "audio_seconds": round(audio.seconds, 3),
           "batch_size": system.batch_size, "notes": system.notes}  # fmt: skip
    if "error" in raw:
        return {**row, "error": raw["error"]}
    median = statistics.median(raw["times"])
    wer = word_error_rate(audio.reference, raw["text"])
    return {**row, "median_s": round(median, 4), "times_s": [round(t, 4) for t in raw["times"]],
            "x_realtime": round(audio.seconds / median, 2), "wer": round(wer["wer"], 4), "wer_detail": wer,
            "peak_rss_mib": round(raw["peak_rss_bytes"] / 2**20, 1), "load_s": round(raw["load_s"], 3),
            "warmup_s": round(raw["warmup_s"], 3), "dtype": raw.get("dtype"), "blas": raw.get("blas"),
            "device": raw.get("device"), "versions": raw.get("versions", {}), "text": raw["text"].strip()}  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_whisper_mlx = this system's median time / whisper_mlx batched's on the same file, same run."""
    reference = {r["file"]: r["median_s"] for r in rows if r["system"] == REFERENCE_KEY and "median_s" in r}
    for row in rows:
        if "median_s" in row and row["file"] in reference:
            row["ratio_to_whisper_mlx"] = round(row["median_s"] / reference[row["file"]], 2)


def merge_rounds(parts: list[dict]) -> dict:
    """One system's rounds on one file as one raw result: every round's times, the largest peak RSS,
    the first round's text, load and warm-up times (or the first error)."""
    failed = [part for part in parts if "error" in part]
    if failed:
        return failed[0]
    merged = dict(parts[0])
    merged["times"] = [t for part in parts for t in part["times"]]
    merged["peak_rss_bytes"] = max(part["peak_rss_bytes"] for part in parts)
    return merged


def measure_all(args, systems, pythons, files: list[AudioFile], warmup: AudioFile) -> list[dict]:
    """Each file's runs in rounds: every system once per round, each in a fresh subprocess (load, warm-up,
    one timed run). These VMs drift by 10-30% within half an hour; in rounds the drift reaches every
    system alike instead of favouring the ones measured last."""
    dtype, blas = mlx_dtype(), optimized_blas()
    models = {"mlx": lambda: mlx_model(args.model, dtype), "ct2": lambda: ct2_source(args.model)}
    rows = []
    for audio in files:
        runs = args.long_runs if audio.name in GENERATED else args.runs
        measured = [s for s in systems if s.key in pythons and not (
            "as-installed" in s.tags and "all" not in args.as_installed_files
            and audio.name not in args.as_installed_files)]  # fmt: skip
        commands = {s.key: runner_command(s, pythons[s.key], models[s.weights](), audio.samples, warmup.samples, 1,
                                          dtype, blas) for s in measured}  # fmt: skip
        rounds: dict[str, list[dict]] = {s.key: [] for s in measured}
        for number in range(1, runs + 1):
            for system in measured:
                if any("error" in part for part in rounds[system.key]):
                    continue
                print(
                    f"-- {system.key} on {audio.name} (sha256 {audio.sha256[:16]}, round {number} of {runs}) ...",
                    flush=True,
                )
                rounds[system.key].append(run_measurement(system, commands[system.key], args.timeout))
        for system in measured:
            row = summarize(system, audio, merge_rounds(rounds[system.key]))
            print("   " + report.one_line(row), flush=True)
            rows.append(row)
    add_ratios(rows)
    return rows


def main_memory(args: argparse.Namespace, command: str) -> int:
    """--memory: peak RSS of whisper_mlx batched on the generated 10-minute and 2-hour files."""
    from .memory import memory_markdown, run_memory

    info = machine_info()
    print(f"{command}\nmachine: {info['cpu']} x{info['cores']}, {info['os']}, python {info['python']}", flush=True)
    memory = run_memory(mlx_model(args.model, mlx_dtype()), args.timeout)
    info["load_average_end"] = load_average()
    now = dt.datetime.now(dt.timezone.utc)
    data = {"schema": 1, "date": now.isoformat(timespec="seconds"), "command": command, "mode": "memory",
            "model": args.model, "mlx_dtype": mlx_dtype(), "machine": info, "memory": memory}  # fmt: skip
    stem = f"{now:%Y-%m-%d}-{info['slug']}-memory"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    header = f"## whisper_mlx memory test: {args.model}, {data['date'][:10]}\n\n- Command: `{command}`\n\n"
    (args.out / f"{stem}.md").write_text(header + memory_markdown(memory))
    print(f"wrote {args.out / stem}.json and .md; 2 h / 10 min peak RSS ratio: {memory['ratio']}", flush=True)
    failed = [r["file"] for r in memory["rows"] if "error" in r]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory:
        return main_memory(args, "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv))
    if importlib.util.find_spec("jiwer") is None:
        raise SystemExit("the benchmark needs jiwer (and matplotlib for the chart): pip install -e '.[bench]'")
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("WHISPER_MLX_BACKEND"):  # the backend the whisper_mlx rows ran on is part of the command
        command = f"WHISPER_MLX_BACKEND={shlex.quote(os.environ['WHISPER_MLX_BACKEND'])} {command}"
    systems = select_systems(args.systems)
    info = machine_info()
    print(
        f"{command}\nmachine: {info['cpu']} x{info['cores']}, {info['os']}, python {info['python']}, "
        f"load average {info['load_average_start']}",
        flush=True,
    )
    names = list(dict.fromkeys([args.warmup_file, *args.files]))
    corpus = {f.name: f for f in load_corpus(names)}
    for audio in corpus.values():
        print(f"audio {audio.name}: {audio.seconds:.2f} s, sha256 {audio.sha256}", flush=True)
    pythons, setup_errors = prepare_systems(systems, args.no_setup)
    files = [corpus[n] for n in args.files]
    rows = measure_all(args, systems, pythons, files, corpus[args.warmup_file])
    info["load_average_end"] = load_average()
    now = dt.datetime.now(dt.timezone.utc)
    data = {"schema": 1, "date": now.isoformat(timespec="seconds"), "command": command,
            "mode": "quick" if args.quick else "full", "model": args.model, "mlx_dtype": mlx_dtype(),
            "runs": args.runs, "rounds": True, "long_runs": args.long_runs, "warmup_file": args.warmup_file,
            "machine": info,
            "files": [{"name": f.name, "seconds": round(f.seconds, 3), "sha256": f.sha256,
                       "audio": _relative(f.audio)} for f in files],
            "systems": [{"key": s.key, "label": s.label, "notes": s.notes, "batch_size": s.batch_size,
                         "setup_error": setup_errors.get(s.key)} for s in systems],
            "results": rows}  # fmt: skip
    paths = report.write_outputs(data, args.out, f"{now:%Y-%m-%d}-{info['slug']}")
    if args.readme == "yes":  # the top-level README links to benchmarks/README.md and carries no table
        report.update_readme(BENCH_DIR / "README.md", data, paths)
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    failed = [r["system"] + " on " + r["file"] for r in rows if "error" in r] + list(setup_errors)
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed or not rows else 0


def _relative(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(BENCH_DIR.parent))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
