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

import whisper_mlx  # noqa: F401  (before mlx.core: BLAS preload)
import mlx.core as mx
import numpy as np

from benchmarks.normalize import word_error_rate
from whisper_mlx import decoding
from whisper_mlx.host_model import HostDecoder, host_decoder_for
from whisper_mlx.load_models import get_cached_model, packaged_model_path

DATA = Path(__file__).parent / "data"


class StageClock:
    """Wraps functions to sum their wall time and count calls, and counts decoder steps by batch size."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.steps = collections.Counter()
        self.items = collections.Counter()

    def wrap(self, owner, name: str, stage: str, items=lambda *args: 1) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1
            self.items[stage] += items(*args)
            return result

        setattr(owner, name, timed)

    def count_steps(self, model) -> None:
        """Counts the decoder's forward calls by row count: MLX's and the numpy decoder's (CPU greedy)."""
        step, host_hidden = model.step, HostDecoder.hidden

        def counted(tokens, state, keep=1):
            self.steps[tokens.shape[0]] += 1
            return step(tokens, state, keep)

        def counted_host(decoder, tokens, state, keep=None):
            self.steps[tokens.shape[0]] += 1
            return host_hidden(decoder, tokens, state, keep)

        model.step = counted
        HostDecoder.hidden = counted_host


def profile_file(model, audio: Path, batch_size: int) -> dict:
    transcribe_module = sys.modules["whisper_mlx.transcribe"]
    clock = StageClock()
    clock.wrap(transcribe_module, "encode_windows", "encoder", items=lambda model, mels: mels.shape[0])
    clock.wrap(decoding.DecodingTask, "_decode_rows", "decoder")
    clock.count_steps(model)
    start = time.perf_counter()
    result = transcribe_module.transcribe(str(audio), model=model, batch_size=batch_size, language="en")
    total = time.perf_counter() - start
    reference = audio.with_suffix(".txt")
    wer = word_error_rate(reference.read_text(), result["text"])["wer"] if reference.exists() else None
    return {"total": total, "clock": clock, "wer": wer}


def time_step(model, batch: int, repeats: int = 30) -> dict:
    """Milliseconds of one greedy decoding step at `batch` rows, 60 tokens into a window, on the path
    transcribe takes: the numpy decoder on the CPU (float32), else MLX."""
    task = decoding.DecodingTask(model, decoding.DecodingOptions(language="en"))
    features = mx.random.normal((batch, model.dims.n_audio_ctx, model.dims.n_audio_state)).astype(model.dtype)
    host = host_decoder_for(model)
    hidden = mx.random.normal((batch, model.dims.n_text_state))
    if host is not None:
        state = host.new_state(features, np.zeros(batch, int), model.dims.n_text_ctx)
        token, advance = np.array([[440]] * batch), lambda: host.hidden(token, state)
        logits = host.logits(np.array(hidden))
        parts = {"step": lambda: host.logits(advance()[:, -1]), "decoder blocks": advance,
                 "logits": lambda: host.logits(np.array(hidden))}
        prime = lambda tokens: host.hidden(np.array(tokens), state)  # noqa: E731
    else:
        state = model.new_state(features)
        token = mx.array([[440]] * batch)
        logits = model.decoder.host_logits(hidden)
        parts = {"step": lambda: mx.eval(model.step(token, state)[0]),
                 "decoder blocks": lambda: mx.eval(model.step(token, state)[1]),
                 "logits": lambda: model.decoder.host_logits(hidden)}
        prime = lambda tokens: mx.eval(model.step(mx.array(tokens), state)[1])  # noqa: E731
    prime([task.sot_sequence("en")] * batch)
    for _ in range(60):
        prime([[440]] * batch)
    history = decoding.TimestampHistory.empty(batch, np)
    parts["greedy filters (numpy)"] = lambda: task.timestamp_rules.greedy(task.suppressor.apply(logits, 5), history, 5)
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
    args = parser.parse_args(argv)
    audio = DATA / f"{args.file}.flac" if (DATA / f"{args.file}.flac").exists() else Path(args.file)
    model = get_cached_model(packaged_model_path(args.model))
    print(f"backend: {whisper_mlx.backend_info()}")
    for batch in args.step_batches:
        parts = "  ".join(f"{name} {ms:.1f} ms" for name, ms in time_step(model, batch).items())
        print(f"one step at {batch} row(s): {parts}")
    report = profile_file(model, audio, args.batch_size)
    clock = report["clock"]
    steps = sum(clock.steps.values())
    print(f"{audio.name}, batch_size {args.batch_size}: total {report['total']:.1f} s"
          + (f", WER {report['wer']:.2%}" if report["wer"] is not None else ""))
    windows = clock.items["encoder"]
    print(f"  encoder: {clock.seconds['encoder']:.1f} s for {windows} windows in {clock.calls['encoder']} batches "
          f"({clock.seconds['encoder'] / max(windows, 1):.2f} s/window)")
    print(f"  decoder: {clock.seconds['decoder']:.1f} s, {steps} steps "
          f"({clock.seconds['decoder'] / max(steps, 1) * 1000:.1f} ms/step; rows per step: "
          + ", ".join(f"{b}: {n}" for b, n in sorted(clock.steps.items())) + ")")
    other = report["total"] - clock.seconds["encoder"] - clock.seconds["decoder"]
    print(f"  other (mel, VAD, segments, host work): {other:.1f} s")


if __name__ == "__main__":
    main()
