"""Where whisper_mlx's time goes on one file: encoder vs decoder, decoding steps by batch size, and a
microbenchmark of one decoding step (decoder blocks, logits, greedy filters) per batch size.

    python -m benchmarks.profile                      # alice_ch1, tiny.en, batch_size 12
    python -m benchmarks.profile --file jfk --batch-size 1

Timings wrap the pipeline's own functions (no behaviour change); numbers vary with machine load.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import whisper_mlx  # before mlx.core: BLAS preload

# isort: split
import mlx.core as mx
import numpy as np

from benchmarks.normalize import word_error_rate
from whisper_mlx import decoding
from whisper_mlx.backends import backend_for
from whisper_mlx.load_models import get_cached_model, packaged_model_path

DATA = Path(__file__).parent / "data"


class TimedBackend:
    """Forwards to a backend, summing the wall time of its encoder calls and counting decoding steps by
    row count (the backend interface is the only thing wrapped: no behaviour change)."""

    def __init__(self, inner):
        self.inner, self.name, self.xp = inner, inner.name, inner.xp
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.steps = collections.Counter()
        self.windows = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, mels):
        start = time.perf_counter()
        features = self.inner.encode(mels)
        self.seconds["encoder"] += time.perf_counter() - start
        self.calls["encoder"] += 1
        self.windows += len(mels)
        return features

    def step(self, state, tokens):
        self.steps[tokens.shape[0]] += 1
        return self.inner.step(state, tokens)


def profile_file(model, audio: Path, batch_size: int) -> dict:
    transcribe_module = sys.modules["whisper_mlx.transcribe"]
    backend = backend_for(model)
    timed = model.backend = TimedBackend(backend)
    decode_rows = decoding.DecodingTask._decode_rows

    def timed_decode(task, *args, **kwargs):
        start = time.perf_counter()
        try:
            return decode_rows(task, *args, **kwargs)
        finally:
            timed.seconds["decoder"] += time.perf_counter() - start

    decoding.DecodingTask._decode_rows = timed_decode
    start = time.perf_counter()
    try:
        result = transcribe_module.transcribe(str(audio), model=model, batch_size=batch_size, language="en")
    finally:
        decoding.DecodingTask._decode_rows = decode_rows
        model.backend = backend
    total = time.perf_counter() - start
    reference = audio.with_suffix(".txt")
    wer = word_error_rate(reference.read_text(), result["text"])["wer"] if reference.exists() else None
    return {"total": total, "clock": timed, "wer": wer}


def time_step(model, batch: int, repeats: int = 30) -> dict:
    """Milliseconds of one greedy decoding step at `batch` rows, 60 tokens into a window, on the model's
    backend, and of the greedy filters on its arrays."""
    backend = backend_for(model)
    task = decoding.DecodingTask(model, decoding.DecodingOptions(language="en"))
    shape = (batch, model.dims.n_audio_ctx, model.dims.n_audio_state)
    features = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if backend.xp is mx:
        features = mx.array(features).astype(model.dtype)
    state = backend.new_state(features, np.zeros(batch, int))
    prompt = np.array([task.sot_sequence("en")] * batch)
    logits, _ = backend.prefill(state, prompt, 0)
    for _ in range(60):
        logits = backend.step(state, backend.xp.full((batch,), 440, backend.xp.int32))
    token = backend.xp.full((batch,), 440, backend.xp.int32)
    history = decoding.TimestampHistory.empty(batch, backend.xp)
    parts = {
        "step": lambda: backend.to_host(backend.step(state, token)),
        "greedy filters": lambda: backend.to_host(
            task.timestamp_rules.greedy(task.suppressor.apply(logits, 5), history, 5)[0]
        ),
    }
    out = {}
    for name, run in parts.items():
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        out[name] = (time.perf_counter() - start) / repeats * 1000
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="alice_ch1", help="a corpus name in benchmarks/data or a path")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--step-batches", type=int, nargs="*", default=[1, 3, 6])
    parser.add_argument("--backend", default=None, choices=["auto", "mlx", "numpy"])
    args = parser.parse_args(argv)
    audio = DATA / f"{args.file}.flac" if (DATA / f"{args.file}.flac").exists() else Path(args.file)
    model = get_cached_model(packaged_model_path(args.model), backend=args.backend)
    print(f"backend: {whisper_mlx.backend_info(model)}")
    for batch in args.step_batches:
        parts = "  ".join(f"{name} {ms:.1f} ms" for name, ms in time_step(model, batch).items())
        print(f"one step at {batch} row(s): {parts}")
    report = profile_file(model, audio, args.batch_size)
    clock = report["clock"]
    steps = sum(clock.steps.values())
    print(
        f"{audio.name}, batch_size {args.batch_size}: total {report['total']:.1f} s"
        + (f", WER {report['wer']:.2%}" if report["wer"] is not None else "")
    )
    windows = clock.windows
    print(
        f"  encoder: {clock.seconds['encoder']:.1f} s for {windows} windows in {clock.calls['encoder']} batches "
        f"({clock.seconds['encoder'] / max(windows, 1):.2f} s/window)"
    )
    print(
        f"  decoder: {clock.seconds['decoder']:.1f} s, {steps} steps "
        f"({clock.seconds['decoder'] / max(steps, 1) * 1000:.1f} ms/step; rows per step: "
        + ", ".join(f"{b}: {n}" for b, n in sorted(clock.steps.items()))
        + ")"
    )
    other = report["total"] - clock.seconds["encoder"] - clock.seconds["decoder"]
    print(f"  other (mel, VAD, segments, host work): {other:.1f} s")


if __name__ == "__main__":
    main()
