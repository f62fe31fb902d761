"""Goldens on whatever device MLX computes on: tiny.en transcribes jfk and ls_test with the MLX backend
in one dtype; the texts, their WER against the references, and whether they equal the CPU's float32
texts (benchmarks/results/gpu-goldens-cpu.json, written with --record on the CPU).

    python -m benchmarks.gpu_goldens --dtype float16 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import whisper_mlx

# isort: split
import mlx.core as mx

from benchmarks.normalize import word_error_rate
from whisper_mlx.load_models import load_model, packaged_model_path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CPU_GOLDENS = Path(__file__).resolve().parent / "results" / "gpu-goldens-cpu.json"
FILES = ("jfk", "ls_test")


def transcripts(dtype: str) -> dict[str, str]:
    model = load_model(packaged_model_path("tiny.en"), dtype=getattr(mx, dtype), backend="mlx")
    return {
        name: whisper_mlx.transcribe(str(DATA / f"{name}.flac"), model=model, language="en", temperature=0.0)["text"]
        for name in FILES
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float32")
    parser.add_argument("--out", type=Path, help="folder for goldens-<dtype>.json")
    parser.add_argument("--record", action="store_true", help="write the CPU goldens file instead")
    args = parser.parse_args(argv)
    texts = transcripts(args.dtype)
    if args.record:
        CPU_GOLDENS.write_text(json.dumps(texts, indent=2) + "\n")
    cpu = json.loads(CPU_GOLDENS.read_text()) if CPU_GOLDENS.exists() else {}
    report = {
        "device": str(mx.default_device()),
        "dtype": args.dtype,
        "files": {
            name: {
                "text": text,
                "wer": word_error_rate((DATA / f"{name}.txt").read_text(), text)["wer"],
                "equals_cpu_float32": text == cpu.get(name),
            }
            for name, text in texts.items()
        },
    }
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"goldens-{args.dtype}.json").write_text(json.dumps(report, indent=2) + "\n")
    if any(f["wer"] > 0.2 for f in report["files"].values()):
        raise SystemExit("a golden's WER is above 20%")


if __name__ == "__main__":
    main()
