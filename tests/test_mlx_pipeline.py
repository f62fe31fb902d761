"""The pipelined, compiled greedy loop: each step's one host wait is on an array submitted on its own
before the next step was, the results equal the unpipelined, uncompiled loop's exactly (tiny.en, and
scripted random logits against openai's rules written out per row), and the compiled step launches at
most a third of the kernels."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

import whisper_mlx
from benchmarks.mlx_loop import greedy_step_kernels, step_phases
from whisper_mlx import decoding
from whisper_mlx.audio import load_audio, log_mel_spectrogram, pad_or_trim
from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.backends.numpy_backend import NumpyBackend
from whisper_mlx.decoding import DecodingOptions, DecodingTask, candidate_keys
from whisper_mlx.sampling import gumbel_sample
from whisper_mlx.tokenizer import get_tokenizer
from whisper_mlx.whisper import ModelDimensions, Whisper

from reference_rules import reference_filter
from scripted_backend import ScriptedBackend

N_VOCAB = 51864  # tiny.en
KERNEL_BUDGET = 31  # a third of the ~95 kernels per step of the uncompiled filters (docs/performance.md)
VARIANTS = {"pipelined_compiled": (True, True), "pipelined": (True, False), "unpipelined_plain": (False, False)}


class RecordingBackend(MLXBackend):
    """The MLX backend, recording the order of decoder steps, submissions and host waits."""

    def __init__(self, model):
        super().__init__(model)
        self.events: list[tuple[str, tuple]] = []

    def step(self, state, tokens):
        self.events.append(("step", ()))
        return super().step(state, tokens)

    def submit(self, *arrays) -> None:
        self.events.append(("submit", arrays))
        super().submit(*arrays)

    def to_host(self, array) -> np.ndarray:
        self.events.append(("to_host", (array,)))
        return super().to_host(array)


def host_waits_on_older_submissions(events) -> list[bool]:
    """For each host wait on a submitted array: was that array submitted before the latest submission,
    with a decoder step built in between (the device had the next step to compute)?"""
    verdicts, submits = [], []
    for position, (kind, arrays) in enumerate(events):
        if kind == "submit":
            submits.append((position, arrays))
        elif kind == "to_host":
            holders = [(p, a) for p, a in submits if any(x is arrays[0] for x in a)]
            if holders:
                submitted_at = holders[-1][0]
                later = [k for k, _ in events[submitted_at + 1 : position]]
                verdicts.append(submits[-1][0] != submitted_at and "step" in later and "submit" in later)
    return verdicts


def waits_between_steps(events) -> list[int]:
    """Host waits between consecutive decoder steps."""
    counts, current = [], None
    for kind, _ in events:
        if kind == "step":
            if current is not None:
                counts.append(current)
            current = 0
        elif kind == "to_host" and current is not None:
            current += 1
    return counts


@pytest.fixture(scope="module")
def tiny_windows(tiny_en, data_dir):
    """tiny.en features of five windows of different lengths (short rows finish first and are dropped)."""
    clips = [load_audio(str(data_dir / f)) for f in ("jfk.flac", "ls_test.flac", "alice_ch1.flac")]
    clips = [clips[0], clips[1], clips[2][: 16000 * 30], clips[0][: 16000 * 3], clips[1][: 16000 * 2]]
    mels = np.stack([pad_or_trim(np.array(log_mel_spectrogram(c)), 3000, axis=0) for c in clips])
    return MLXBackend(tiny_en).encode(mels)


PROMPTS = [None, "Alice was beginning to get very tired", None, "and so", None]


def test_each_step_waits_once_on_an_array_submitted_before_the_next_step(tiny_en, tiny_windows):
    backend = RecordingBackend(tiny_en)
    results = DecodingTask(tiny_en, DecodingOptions(language="en"), backend).run(tiny_windows, PROMPTS)
    assert all(r.tokens for r in results)
    verdicts = host_waits_on_older_submissions(backend.events)
    steps = sum(kind == "step" for kind, _ in backend.events)
    assert steps > 50 and len(verdicts) == steps  # every step's wait is on a submission (the last is dropped)
    assert all(verdicts)
    assert set(waits_between_steps(backend.events)) == {1}


def test_unpipelined_loop_waits_on_the_latest_submission(tiny_en, tiny_windows):
    """The check above can fail: the old grouping evaluates step i's flags with step i+1's forward pass."""
    backend = RecordingBackend(tiny_en)
    DecodingTask(tiny_en, DecodingOptions(language="en"), backend, pipeline=False).run(tiny_windows[:2])
    verdicts = host_waits_on_older_submissions(backend.events)
    assert verdicts and not any(verdicts)


def test_step_phases_tell_overlapped_building_from_idle_device():
    """The timeline's verdict (benchmarks/mlx_loop.py): a step's building overlapped the device only when
    the array then waited on was submitted before the building and the wait still blocked."""
    ms = 0.001
    pipelined = [
        ("submit", 0.0, 1 * ms, {1}),  # step i's selection
        ("build", 2 * ms, 2 * ms, set()),
        ("submit", 4 * ms, 5 * ms, {2}),  # step i+1, built while step i ran
        ("wait", 5 * ms, 9 * ms, {1}),  # step i still running: blocked 4 ms
    ]
    unpipelined = [
        ("build", 0.0, 0.0, set()),
        ("submit", 3 * ms, 4 * ms, {1, 2}),  # step i evaluated with step i+1: nothing ran during building
        ("wait", 4 * ms, 9 * ms, {1}),
    ]
    idle = [*pipelined[:3], ("wait", 5 * ms, 5.05 * ms, {1})]  # step i was done before the building ended
    [step] = step_phases(pipelined)
    assert step["overlapped"] and step["build_ms"] == pytest.approx(2) and step["wait_ms"] == pytest.approx(4)
    assert step["submit_ms"] == pytest.approx(1)
    assert not step_phases(unpipelined)[0]["overlapped"]
    assert not step_phases(idle)[0]["overlapped"]


@pytest.mark.parametrize("options", [{}, {"without_timestamps": True}], ids=["timestamps", "text_only"])
def test_loop_variants_equal_on_tiny_en(tiny_en, tiny_windows, options):
    """Pipelining and compiling change neither the tokens nor the log probabilities, bit for bit."""
    found = {}
    for name, (pipeline, compiled) in VARIANTS.items():
        task = DecodingTask(
            tiny_en,
            DecodingOptions(language="en", **options),
            MLXBackend(tiny_en),
            pipeline=pipeline,
            compile_steps=compiled,
        )
        found[name] = [(r.tokens, r.avg_logprob, r.no_speech_prob) for r in task.run(tiny_windows, PROMPTS)]
    lengths = [len(tokens) for tokens, _, _ in found["unpipelined_plain"]]
    assert min(lengths) > 0 and max(lengths) > 3 * min(lengths), lengths  # rows were dropped along the way
    assert found["pipelined_compiled"] == found["unpipelined_plain"]
    assert found["pipelined"] == found["unpipelined_plain"]
    assert "ask not what your country can do for you" in tiny_en_text(found["pipelined_compiled"][0][0])


def tiny_en_text(tokens) -> str:
    return get_tokenizer(False).decode(tokens)


def stand_in_model():
    dims = ModelDimensions(80, 1500, 64, 1, 1, N_VOCAB, 448, 64, 1, 1)
    return SimpleNamespace(dims=dims, is_multilingual=False, num_languages=99)


def reference_decode(
    task: DecodingTask, backend: ScriptedBackend, seed: int, prompt: tuple, max_steps: int, temperature: float, key: int
):
    """One row decoded alone with openai's rules written out: tokens (EOT excluded), sum of log probs.
    Sampled rows draw from their own key (candidate_keys) at each step, as sampling.py defines."""
    tokenizer, sampled, total = task.tokenizer, [], 0.0
    row_key = candidate_keys([key], temperature, 1)
    rules = task.timestamp_rules
    for _ in range(max_steps):
        logits = backend.logits(seed, prompt, sampled).astype(np.float64)[None]
        masked = reference_filter(
            logits,
            [sampled],
            ts_begin=tokenizer.timestamp_begin,
            eot=tokenizer.eot,
            no_timestamps=tokenizer.no_timestamps,
            suppress=task._suppressed_tokens(),
            blank=task._blank_tokens(),
            max_initial_index=None if rules is None else rules.max_initial_timestamp_index,
            with_timestamps=rules is not None,
        )[0]
        token = int(np.argmax(masked))
        if temperature > 0:
            token = int(gumbel_sample(masked[None].astype(np.float32), temperature, row_key, len(sampled))[0])
        total += masked[token] - np.logaddexp.reduce(masked[np.isfinite(masked)])
        if token == tokenizer.eot:
            break
        sampled.append(token)
    return sampled, total


@pytest.mark.parametrize("xp", [mx, np], ids=["mlx", "numpy"])
@pytest.mark.parametrize("options", [{}, {"without_timestamps": True}], ids=["timestamps", "text_only"])
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_scripted_batch_equals_rows_decoded_alone(xp, options, temperature):
    """Random logits: the batched loop, dropping finished rows one step late, gives each row what the
    per-row reference gives, and the loop variants agree exactly; a sampled row draws from its own key,
    whatever else shares the batch."""
    tokenizer = get_tokenizer(False)
    seeds, prompts = list(range(10)), ["so it was", None, None, "x y z", *[None] * 6]
    keys = [1000 + 7 * seed for seed in seeds]
    found = {}
    for name, (pipeline, compiled) in VARIANTS.items():
        backend = ScriptedBackend(xp, N_VOCAB, tokenizer.timestamp_begin, tokenizer.eot)
        task = DecodingTask(
            stand_in_model(),
            DecodingOptions(language="en", sample_len=40, **options),
            backend,
            pipeline=pipeline,
            compile_steps=compiled,
        )
        results = task.run(xp.array(np.array(seeds)[:, None]), prompts, temperature=temperature, keys=keys)
        found[name] = [(r.tokens, r.avg_logprob) for r in results]
    assert found["pipelined_compiled"] == found["unpipelined_plain"] == found["pipelined"]
    lengths = []
    for seed, prompt, key, (tokens, avg_logprob) in zip(seeds, prompts, keys, found["pipelined_compiled"]):
        initial = tuple(task.initial_tokens(prompt, None))
        want, total = reference_decode(task, backend, seed, initial, 40, temperature, key)
        assert tokens == want
        assert avg_logprob == pytest.approx(total / (len(want) + 1), abs=1e-4)
        lengths.append(len(tokens))
    assert len(set(lengths)) >= 3, lengths  # rows finish at different steps


def test_numpy_backend_waits_once_per_step(tiny_en, tiny_windows):
    class Counting(NumpyBackend):
        waits = steps = 0

        def step(self, state, tokens):
            self.steps += 1
            return super().step(state, tokens)

        def to_host(self, array):
            self.waits += 1
            return super().to_host(array)

    backend = Counting(tiny_en)
    features = np.array(tiny_windows[:2])
    got = DecodingTask(tiny_en, DecodingOptions(language="en"), backend).run(features)
    want = DecodingTask(tiny_en, DecodingOptions(language="en"), MLXBackend(tiny_en)).run(tiny_windows[:2])
    assert [r.tokens for r in got] == [r.tokens for r in want]
    # one per sampled step (the prefill's first; the step built ahead of the last is not read) and the no-speech read
    assert backend.waits == backend.steps + 1


@pytest.mark.parametrize("n_sampled", [0, 1, 2])
def test_compiled_filters_and_selection_launch_a_third_of_the_kernels(tiny_en, n_sampled):
    task = DecodingTask(tiny_en, DecodingOptions(language="en"), MLXBackend(tiny_en))
    plain = greedy_step_kernels(task, 12, n_sampled, compiled=False, select_only=True)
    compiled = greedy_step_kernels(task, 12, n_sampled, compiled=True, select_only=True)
    assert plain > 60
    assert compiled <= KERNEL_BUDGET, (compiled, plain)


def test_compiled_steps_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(decoding, "_compiled_greedy", type(decoding._compiled_greedy)())
    built = []
    for rows in range(decoding.GREEDY_CACHE_SIZE + 5):
        decoding.compiled_greedy(("test", rows), lambda rows=rows: built.append(rows) or (lambda x: x + rows))
    decoding.compiled_greedy(("test", 10), lambda: built.append("again") or (lambda x: x))
    assert len(decoding._compiled_greedy) == decoding.GREEDY_CACHE_SIZE
    assert ("test", 0) not in decoding._compiled_greedy  # the least recently used went first
    assert "again" not in built  # a cached shape is not traced again


def test_dropping_rows_never_holds_the_caches_twice():
    """Compaction gathers one layer at a time: memory grows by about one layer's kept keys/values, not
    by a second copy of every layer's (large-v3's are ~250 MB per row in float16)."""
    dims = ModelDimensions(80, 1500, 256, 4, 1, N_VOCAB, 448, 256, 4, 4)
    model = Whisper(dims)
    state = model.new_state(mx.random.normal((12, 1500, 256)), mx.zeros((12,), mx.int32))
    mx.eval([(kv.keys, kv.values) for kv in state.cross_kv], [(c.keys, c.values) for c in state.caches])
    cross = sum(kv.keys.nbytes + kv.values.nbytes for kv in state.cross_kv)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    state.take(mx.arange(11))
    growth = mx.get_peak_memory() - before
    kept_cross = sum(kv.keys.nbytes + kv.values.nbytes for kv in state.cross_kv)
    assert kept_cross == cross * 11 // 12
    assert growth <= kept_cross / len(state.cross_kv) * 1.5, (growth, kept_cross)


def test_fp16_is_honoured_for_a_model_object(data_dir):
    from test_model_shapes import random_model

    model = random_model("large-v3-turbo")
    half = model.with_dtype(mx.float16)
    assert half.dtype == mx.float16 and half.decoder.blocks[0].mlp1.weight.dtype == mx.float16
    assert model.with_dtype(mx.float16) is half and model.with_dtype(mx.float32) is model
    audio = load_audio(str(data_dir / "jfk.flac"))
    options = {"language": "en", "temperature": 0.0, "condition_on_previous_text": False}
    got = whisper_mlx.transcribe(audio, model=model, fp16=True, **options)
    want = whisper_mlx.transcribe(audio, model=half, **options)
    assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in want["segments"]]
    assert whisper_mlx.transcribe(audio, model=model, fp16=False, **options)["segments"] != got["segments"]


def test_language_detection_reads_one_token_without_the_cross_attention_cache():
    from test_model_shapes import random_model

    from fake_backends import counting

    model = random_model("large-v3")
    features = mx.random.normal((3, 1500, 64), key=mx.random.key(1))
    tokenizer = get_tokenizer(True, num_languages=model.num_languages, language="en")
    full = np.array(model.logits(mx.full((3, 1), tokenizer.sot), features)[:, 0])
    with counting(model, forbid=("new_state", "prefill")):
        model.backend.inner = MLXBackend(model)
        _, probs = decoding.detect_language(model, tokenizer=tokenizer, audio_features=features)
    language_tokens = list(tokenizer.all_language_tokens)
    shifted = np.exp(full[:, language_tokens] - full[:, language_tokens].max(axis=-1, keepdims=True))
    want = shifted / shifted.sum(axis=-1, keepdims=True)
    got = np.array([[p[code] for code in tokenizer.all_language_codes] for p in probs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
