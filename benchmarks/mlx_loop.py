"""The MLX decoding loop, measured: kernels of a greedy step's filters and selection (compiled or not),
host waits per decoding step, per-step time with and without pipelining, and a timeline showing whether
each step's graph was built while the device still evaluated the previous step.

    python -m benchmarks.mlx_loop --model tiny.en --audio tests/data/alice_ch1.flac --windows 12 --out DIR
"""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import whisper_mlx  # noqa: F401  (before mlx.core: BLAS preload)

# isort: split
import mlx.core as mx
import numpy as np

from whisper_mlx.audio import N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim
from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.decoding import DecodingOptions, DecodingTask, TimestampHistory

# primitives that only re-describe memory (no kernel runs for them)
VIEW_PRIMITIVES = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Slice", "Transpose", "StopGradient", "AsStrided"}


def graph_primitives(*outputs: mx.array) -> Counter:
    """How many times each primitive occurs in the unevaluated graph that computes `outputs`."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', dot.getvalue()))


def kernel_count(*outputs: mx.array) -> int:
    """Kernels launched to compute `outputs`: graph primitives that are not views."""
    return sum(n for name, n in graph_primitives(*outputs).items() if name not in VIEW_PRIMITIVES)


def greedy_step_kernels(
    task: DecodingTask, rows: int, n_sampled: int, compiled: bool, select_only: bool = False
) -> int:
    """Kernels of one greedy step on `rows` rows of random logits: the logit filters and selection, with
    the rows' bookkeeping (sums, flags, history, the host's copy) unless select_only."""
    n_vocab = task.model.dims.n_vocab
    logits = mx.random.normal((rows, n_vocab), key=mx.random.key(0))
    tokens = mx.full((rows,), task.tokenizer.timestamp_begin + 3, mx.int32)
    history = TimestampHistory(tokens, tokens - 3 if n_sampled > 1 else tokens, tokens)
    state = (mx.zeros((rows,), mx.float32), mx.zeros((rows,), mx.bool_))
    mx.eval(logits, tokens, history.penultimate, *state)
    phase = min(n_sampled, 2)
    if select_only:
        update = lambda lg, *h: task._select(lg, TimestampHistory(*h), phase, 0.0)  # noqa: E731
        if compiled:
            update = mx.compile(update)
    elif compiled:
        update = task._compiled_greedy_update(n_sampled, rows)
    else:
        update = task._row_update(n_sampled, 0.0)
    inputs = (logits, history.last, history.penultimate, history.last_timestamp)
    if not select_only:
        inputs += state
    if compiled:
        update(*inputs)  # traced once
    return kernel_count(*update(*inputs))


class WaitCountingBackend(MLXBackend):
    """The MLX backend, counting decoder steps and host waits (to_host calls) and timing the waits."""

    def __init__(self, model):
        super().__init__(model)
        self.steps = 0
        self.waits = 0
        self.wait_seconds = 0.0

    def step(self, state, tokens):
        self.steps += 1
        return super().step(state, tokens)

    def to_host(self, array) -> np.ndarray:
        start = time.perf_counter()
        self.waits += 1
        host = super().to_host(array)
        self.wait_seconds += time.perf_counter() - start
        return host


class TimelineBackend(WaitCountingBackend):
    """Records (kind, start, end, array ids) for each decoder step's graph building ("build": its start),
    each submission ("submit": the async_eval call) and each host wait ("wait"), in perf_counter seconds."""

    def __init__(self, model):
        super().__init__(model)
        self.events: list[tuple[str, float, float, set[int]]] = []

    def step(self, state, tokens):
        now = time.perf_counter()
        self.events.append(("build", now, now, set()))
        return super().step(state, tokens)

    def submit(self, *arrays) -> None:
        start = time.perf_counter()
        super().submit(*arrays)
        self.events.append(("submit", start, time.perf_counter(), {id(a) for a in arrays}))

    def to_host(self, array) -> np.ndarray:
        start = time.perf_counter()
        host = super().to_host(array)
        self.events.append(("wait", start, time.perf_counter(), {id(array)}))
        return host


def step_phases(events: list[tuple[str, float, float, set[int]]], busy_ms: float = 0.1) -> list[dict]:
    """Per decoder step, from its graph building's start to the host wait after it: the milliseconds spent
    building (until the first submission), inside async_eval, and waiting; and whether the building
    overlapped the device: the array waited on was submitted before the building began and was still not
    ready when the host got to it (the wait blocked over busy_ms)."""
    submitted: dict[int, float] = {}
    steps: list[dict] = []
    step = None
    for kind, start, end, ids in events:
        if kind == "build":
            step = {"start": start, "build_ms": None, "submit_ms": 0.0}
        elif kind == "submit":
            submitted.update(dict.fromkeys(ids, start))
            if step is not None:
                step["build_ms"] = step["build_ms"] if step["build_ms"] is not None else 1000 * (start - step["start"])
                step["submit_ms"] += 1000 * (end - start)
        elif step is not None:  # the host wait that ends the step
            wait_ms = 1000 * (end - start)
            waited_since = submitted.get(next(iter(ids)), start)
            overlapped = waited_since < step.pop("start") and wait_ms > busy_ms
            steps.append({**step, "wait_ms": wait_ms, "overlapped": overlapped})
            step = None
    return steps


def overlap_timeline(events: list[tuple[str, float, float, set[int]]]) -> dict:
    """Means of the step phases, the fraction of steps whose building overlapped the device, and the
    first events in milliseconds from the first one."""
    steps = step_phases(events)
    n = max(len(steps), 1)
    origin = events[0][1] if events else 0.0
    return {
        "steps": len(steps),
        **{f"{k}_mean": round(sum(s[k] or 0.0 for s in steps) / n, 3) for k in ("build_ms", "submit_ms", "wait_ms")},
        "overlapped_fraction": round(sum(s["overlapped"] for s in steps) / n, 3),
        "first_events_ms": [
            (k, round(1000 * (a - origin), 2), round(1000 * (b - origin), 2)) for k, a, b, _ in events[:24]
        ],
    }


def timeline_run(model, features: mx.array, pipeline: bool) -> dict:
    """One compiled greedy decode of the windows recorded as a timeline (after a warm-up)."""
    backend = TimelineBackend(model)
    task = DecodingTask(model, DecodingOptions(language="en"), backend, pipeline=pipeline, compile_steps=True)
    task.run(features[:1])
    backend.events.clear()
    task.run(features)
    return {"pipeline": pipeline, **overlap_timeline(backend.events)}


def window_features(backend: MLXBackend, audio_path: str, windows: int) -> mx.array:
    audio = load_audio(audio_path)
    clips = [audio[i * N_SAMPLES : (i + 1) * N_SAMPLES] for i in range(windows)]
    n_mels = backend.model.dims.n_mels
    mels = np.stack([pad_or_trim(np.array(log_mel_spectrogram(c, n_mels)), 3000, axis=0) for c in clips])
    return backend.encode(mels)


def time_loop(model, features: mx.array, pipeline: bool, compiled: bool) -> dict:
    """One greedy decode of the windows: seconds, decoder steps, host waits, tokens."""
    backend = WaitCountingBackend(model)
    task = DecodingTask(model, DecodingOptions(language="en"), backend, pipeline=pipeline, compile_steps=compiled)
    task.run(features[:1])  # warm-up: compiled steps and buffers
    backend.steps = backend.waits = 0
    backend.wait_seconds = 0.0
    start = time.perf_counter()
    results = task.run(features)
    seconds = time.perf_counter() - start
    steps = backend.steps + 1  # the prefill's logits give the first step
    return {
        "pipeline": pipeline,
        "compiled": compiled,
        "seconds": round(seconds, 3),
        "steps": steps,
        "ms_per_step": round(1000 * seconds / steps, 2),
        "host_waits_per_step": round((backend.waits - 1) / steps, 3),  # the no-speech read is not a step's
        "host_wait_ms_per_step": round(1000 * backend.wait_seconds / steps, 2),
        "tokens": sum(len(r.tokens) for r in results),
        "text_sha": hash(tuple(tuple(r.tokens) for r in results)) & 0xFFFFFFFF,
    }


def measure(model_name: str, audio: str, windows: int, dtype: str | None) -> dict:
    from whisper_mlx.load_models import load_model, packaged_model_path

    model = load_model(packaged_model_path(model_name), backend="mlx", dtype=getattr(mx, dtype) if dtype else None)
    backend = MLXBackend(model)
    features = window_features(backend, audio, windows)
    task = DecodingTask(model, DecodingOptions(language="en"), backend)
    kernels = {
        f"{part}_{'compiled' if c else 'plain'}_n{n}": greedy_step_kernels(task, windows, n, c, part == "select")
        for part in ("select", "step")
        for c in (False, True)
        for n in (0, 1, 2)
    }
    runs = [time_loop(model, features, p, c) for p, c in ((False, False), (True, False), (True, True))]
    timelines = [timeline_run(model, features, p) for p in (False, True)]
    return {
        "model": model_name,
        "windows": windows,
        "device": str(mx.default_device()),
        "dtype": str(model.dtype),
        "kernels": kernels,
        "runs": runs,
        "timelines": timelines,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--audio", default="tests/data/alice_ch1.flac")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--dtype", choices=["float16", "float32"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for mlx_loop.json")
    args = parser.parse_args(argv)
    report = measure(args.model, args.audio, args.windows, args.dtype)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"mlx_loop_{args.model}_{args.dtype or 'default'}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
