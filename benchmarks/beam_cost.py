"""What 5 beams cost over greedy decoding on each backend: one file, tiny.en, batched and sequential,
each setting in turn after one warm-up, the median of a few rounds, with the WER of each.

    python -m benchmarks.beam_cost                                 # alice_ch1, both backends
    python -m benchmarks.beam_cost --file ls_test --backends mlx --rounds 3

Numbers vary with machine load; compare the rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import whisper_mlx  # before mlx.core: BLAS preload

# isort: split
from benchmarks.machine import machine_info
from benchmarks.normalize import word_error_rate
from whisper_mlx.audio import SAMPLE_RATE, load_audio
from whisper_mlx.load_models import load_model, packaged_model_path

DATA = Path(__file__).parent / "data"
SETTINGS = [  # (label, transcribe options)
    ("batched 12, greedy", {"batch_size": 12}),
    ("batched 12, 5 beams", {"batch_size": 12, "beam_size": 5, "best_of": 5}),
    ("sequential, greedy", {}),
    ("sequential, 5 beams", {"beam_size": 5, "best_of": 5}),
]


def timed(model, audio, options: dict) -> tuple[float, str]:
    start = time.perf_counter()
    text = whisper_mlx.transcribe(audio, model=model, language="en", **options)["text"]
    return time.perf_counter() - start, text


def measure_backend(backend: str, audio, reference: str, rounds: int) -> list[dict]:
    model = load_model(packaged_model_path(), backend=backend)
    timed(model, audio[: 10 * SAMPLE_RATE], {})  # warm-up
    rows = []
    for label, options in SETTINGS:
        runs = [timed(model, audio, options) for _ in range(rounds)]
        seconds = statistics.median(t for t, _ in runs)
        wer = word_error_rate(reference, runs[0][1])["wer"]
        rows.append({"backend": backend, "setting": label, "seconds": seconds, "wer": wer})
    return rows


def report(rows: list[dict]) -> str:
    greedy = {(r["backend"], r["setting"].split(",")[0]): r["seconds"] for r in rows if "greedy" in r["setting"]}
    lines = ["| Backend | Setting | Time (s) | × greedy | WER |", "|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = r["seconds"] / greedy[(r["backend"], r["setting"].split(",")[0])]
        lines.append(f"| {r['backend']} | {r['setting']} | {r['seconds']:.2f} | {ratio:.2f} | {100 * r['wer']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="alice_ch1")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["numpy", "mlx"])
    args = parser.parse_args(argv)
    audio = load_audio(str(DATA / f"{args.file}.flac"))
    reference = (DATA / f"{args.file}.txt").read_text()
    rows = [row for backend in args.backends for row in measure_backend(backend, audio, reference, args.rounds)]
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, MLX {machine['mlx']}; {args.file}, tiny.en")
    print(report(rows))


if __name__ == "__main__":
    main()
