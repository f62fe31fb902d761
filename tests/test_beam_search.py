"""Beam search against openai's algorithm written out per window (reference_beam.py), on scripted
logits through the backend interface (numpy and MLX arrays), and on a random-weight model through both
real backends: beams batched equal windows decoded alone, and the backends agree."""

import itertools
import os
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.backends.numpy_backend import NumpyBackend
from whisper_mlx.beam_search import BeamSearch
from whisper_mlx.decoding import (
    ApplyTimestampRules,
    DecodingOptions,
    DecodingTask,
    SuppressTokens,
    TimestampHistory,
    logsumexp,
    top_k,
)
from whisper_mlx.errors import DecodingError
from whisper_mlx.tokenizer import get_tokenizer
from whisper_mlx.whisper import ModelDimensions, Whisper

from reference_beam import reference_beam_search, reference_rank
from reference_rules import reference_filter
from scripted_backend import ScriptedBackend

N_VOCAB = 51864  # tiny.en
XPS = pytest.mark.parametrize("xp", [np, mx], ids=["numpy", "mlx"])


def dims(n_vocab=N_VOCAB, width=64):
    return ModelDimensions(80, 1500, width, 2, 1, n_vocab, 448, width, 2, 2)


def stand_in_model():
    """What DecodingTask reads of a model when the backend is given: dimensions and languages."""
    return SimpleNamespace(dims=dims(), is_multilingual=False, num_languages=99)


def run_scripted(xp, options: DecodingOptions, prompts, seeds, monkeypatch):
    """Decode scripted windows; returns (task, backend, results, each window's finished candidates)."""
    tokenizer = get_tokenizer(False)
    backend = ScriptedBackend(xp, N_VOCAB, tokenizer.timestamp_begin, tokenizer.eot)
    task = DecodingTask(stand_in_model(), options, backend=backend)
    candidates = {}
    original = DecodingTask._best_of_window

    def spy(self, search: BeamSearch, window: int, no_speech: float):
        candidates[window] = search.candidates(window)
        return original(self, search, window, no_speech)

    monkeypatch.setattr(DecodingTask, "_best_of_window", spy)
    results = task.run(xp.array(np.array(seeds)[:, None]), prompts, ["en"] * len(prompts))
    return task, backend, results, candidates


def reference_for(task, backend, prompt_tokens, seed, max_steps):
    tokenizer, options = task.tokenizer, task.options

    def filter_logits(logits, beams):
        return reference_filter(
            logits,
            beams,
            ts_begin=tokenizer.timestamp_begin,
            eot=tokenizer.eot,
            no_timestamps=tokenizer.no_timestamps,
            suppress=task._suppressed_tokens(),
            blank=task._blank_tokens(),
            max_initial_index=50,
            with_timestamps=not options.without_timestamps,
        )

    return reference_beam_search(
        lambda sampled: backend.logits(seed, prompt_tokens, sampled),
        filter_logits,
        beam_size=options.beam_size,
        patience=options.patience,
        eot=tokenizer.eot,
        max_steps=max_steps,
    )


CONFIGS = {
    "beam5": {"beam_size": 5},
    "beam2": {"beam_size": 2},
    "patience2": {"beam_size": 3, "patience": 2.0},
    "patience_half": {"beam_size": 4, "patience": 0.5},
    "length_penalty": {"beam_size": 5, "length_penalty": 0.6},
    "penalty1_patience": {"beam_size": 3, "length_penalty": 1.0, "patience": 1.5},
    "no_timestamps": {"beam_size": 5, "without_timestamps": True},
    "prefix": {"beam_size": 3, "prefix": "so it was"},
    "length_runs_out": {"beam_size": 5, "sample_len": 6},
    "one_beam_patience3": {"beam_size": 1, "patience": 3.0},
}


@XPS
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_beam_search_equals_openai_reference(xp, config, monkeypatch):
    prompts = [None, "a prompt of some words", [1, 2, 3, 4, 5, 6, 7], None, "more words"]
    seeds = [11, 22, 33, 44, 55]
    task, backend, results, candidates = run_scripted(
        xp, DecodingOptions(language="en", **config), prompts, seeds, monkeypatch
    )
    initial = [tuple(task.initial_tokens(p, "en")) for p in prompts]
    max_steps = min(task.sample_len, 448 - max(len(t) for t in initial))
    ended_by_eot = 0
    for w, (seed, result) in enumerate(zip(seeds, results)):
        want = reference_for(task, backend, initial[w], seed, max_steps)
        got_tokens, got_sums = candidates[w]
        assert got_tokens == [list(seq[:-1]) for seq, _ in want], f"window {w}: candidates differ"
        # MLX sums a row's 50k exponentials in float32 (drift ~1e-4 a step, see the greedy filter test)
        np.testing.assert_allclose(got_sums, [score for _, score in want], rtol=1e-5, atol=2e-3)
        best_tokens, best_score = want[reference_rank(want, config.get("length_penalty"))]
        assert result.tokens == list(best_tokens[:-1])
        assert result.avg_logprob == pytest.approx(best_score / len(best_tokens), abs=2e-4)
        ended_by_eot += len(best_tokens) - 1 < max_steps
    if config.get("sample_len") is None:
        assert ended_by_eot >= 3, "the scripted logits should end most windows with EOT"


def test_reference_beams_rank_differently_with_length_penalty(monkeypatch):
    """The configurations above exercise the ranking: the length penalty changes some window's choice."""
    prompts, seeds = [None] * 6, [3, 5, 7, 9, 13, 17]
    chosen = []
    for penalty in (None, 1.0):
        _, _, results, _ = run_scripted(
            np, DecodingOptions(language="en", beam_size=5, length_penalty=penalty), prompts, seeds, monkeypatch
        )
        chosen.append([r.tokens for r in results])
    assert chosen[0] != chosen[1]


@pytest.mark.parametrize("seed", range(3))
def test_top_candidates_equal_top_k_of_the_filtered_log_softmax(seed):
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    n_vocab, ts_begin = 51865, tokenizer.timestamp_begin
    suppressor = SuppressTokens(n_vocab, [*tokenizer.non_speech_tokens, tokenizer.sot], [tokenizer.eot])
    rules = ApplyTimestampRules(tokenizer, n_vocab, max_initial_timestamp_index=50)
    rng = np.random.default_rng(200 + seed)
    for _trial in range(12):
        n = int(rng.integers(0, 5))
        seqs = [[int(rng.integers(ts_begin, ts_begin + 40)) if rng.random() < 0.5 else 300 for _ in range(n)]] * 6
        logits = rng.normal(size=(6, n_vocab)) * 3
        logits[:, ts_begin:] += rng.normal() * 6
        for xp in (np, mx):
            history = TimestampHistory.empty(6, xp)
            for i in range(n):
                history = history.push(xp.array([s[i] for s in seqs], dtype=xp.int32), ts_begin)
            filtered = suppressor.apply(xp.array(logits.astype(np.float32)), n)
            masked = np.array(rules.apply(filtered, history, n)).astype(np.float64)
            want = masked - logsumexp(masked, axis=-1, keepdims=True)
            values, tokens = rules.top_candidates(filtered, history, n, 6)
            values, tokens = np.array(values), np.array(tokens)
            order = np.argsort(-values, axis=1)
            tokens = np.take_along_axis(tokens, order, 1)
            np.testing.assert_array_equal(tokens, np.argsort(-want, axis=1)[:, :6])
            np.testing.assert_allclose(np.take_along_axis(values, order, 1), np.sort(want, axis=1)[:, ::-1][:, :6],
                                       rtol=1e-5, atol=2e-4)  # fmt: skip


@XPS
def test_top_k_by_blocks_equals_a_full_sort(xp):
    rng = np.random.default_rng(5)
    for width in (51864, 1501, 106, 4):
        x = rng.normal(size=(7, width)).astype(np.float32)
        x[0, :] = -np.inf
        x[0, :3] = [1.0, 2.0, 3.0]  # fewer finite entries than k: they are still the largest
        values, columns = top_k(xp.array(x), 6)
        values, columns = np.array(values), np.array(columns)
        assert columns.dtype == np.int32
        np.testing.assert_array_equal(np.take_along_axis(x, columns.astype(np.int64), 1), values)
        k = min(6, width)
        np.testing.assert_array_equal(np.sort(values, axis=1), np.sort(x, axis=1)[:, -k:])


# ------------------------------------------------------------------ a random-weight model, both backends


@pytest.fixture(scope="module")
def random_model():
    mx.random.seed(3)
    model = Whisper(dims())
    model.update(model.parameters())
    model.decoder.positional_embedding = mx.random.normal(model.decoder.positional_embedding.shape) * 0.1
    # a likelier EOT, so that beams finish within a few steps
    weight = np.array(model.decoder.token_embedding.weight)
    weight[50256] *= 3.0
    model.decoder.token_embedding.weight = mx.array(weight)
    return model


BACKENDS = pytest.mark.parametrize("make_backend", [NumpyBackend, MLXBackend], ids=["numpy", "mlx"])
PROMPTS = [None, "a prompt of some words", None, "and then"]


def features_of(backend, n: int, seed: int):
    features = mx.random.normal((n, 1500, 64), key=mx.random.key(seed))
    return np.array(features) if backend.xp is np else features


@BACKENDS
def test_beams_batched_equal_windows_alone(random_model, make_backend):
    backend = make_backend(random_model)
    task = DecodingTask(random_model, DecodingOptions(language="en", beam_size=4, sample_len=20), backend=backend)
    features = features_of(backend, len(PROMPTS), 1)
    batched = task.run(features, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = task.run(features[i : i + 1], [prompt])[0]
        assert batched[i].tokens == alone.tokens
        assert batched[i].avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4)
        assert batched[i].no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-5)
    assert any(r.tokens for r in batched)


def test_beams_on_both_backends_agree(random_model):
    options = DecodingOptions(language="en", beam_size=3, sample_len=16, patience=1.5)
    mlx_features = features_of(MLXBackend(random_model), 3, 2)
    got = DecodingTask(random_model, options, backend=NumpyBackend(random_model)).run(np.array(mlx_features))
    other = DecodingTask(random_model, options, backend=MLXBackend(random_model)).run(mlx_features)
    assert [r.tokens for r in got] == [r.tokens for r in other]
    for a, b in zip(got, other):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)


@BACKENDS
def test_one_beam_is_greedy(random_model, make_backend):
    """beam_size=1 runs the greedy decoder; the beam search itself with one beam picks the same tokens."""
    backend = make_backend(random_model)
    features = features_of(backend, 3, 4)
    greedy = DecodingTask(random_model, DecodingOptions(language="en", sample_len=20), backend=backend)
    one = DecodingTask(random_model, DecodingOptions(language="en", sample_len=20, beam_size=1), backend=backend)
    assert not one.searches_beams
    want = greedy.run(features, PROMPTS[:3])
    got = one.run(features, PROMPTS[:3])
    assert [(r.tokens, r.avg_logprob) for r in got] == [(r.tokens, r.avg_logprob) for r in want]
    searched = one._decode_beams(features, [one.initial_tokens(p, "en") for p in PROMPTS[:3]])
    assert [tokens for tokens, _, _ in searched] == [r.tokens for r in want]


def test_options_follow_openai():
    model = stand_in_model()
    backend = ScriptedBackend(np, N_VOCAB, 50363, 50256)
    for bad in (
        {"beam_size": 5, "best_of": 5},
        {"best_of": 5},  # at temperature 0
        {"beam_size": 5, "temperature": 0.4},
        {"patience": 2.0},
        {"task": "lang_id"},
    ):
        with pytest.raises(DecodingError):
            DecodingTask(model, DecodingOptions(**bad), backend=backend)
    for bad in ({"beam_size": 0}, {"patience": 0.0}, {"length_penalty": 1.5}, {"best_of": -1}):
        with pytest.raises(DecodingError):
            DecodingOptions(**bad)
    with pytest.raises(DecodingError):  # round(1 * 0.4) keeps no candidate
        DecodingTask(model, DecodingOptions(beam_size=1, patience=0.4), backend=backend)
    assert DecodingTask(model, DecodingOptions(beam_size=1, patience=3.0), backend=backend).searches_beams


def test_the_fallback_ladder_searches_beams_at_zero_and_samples_above():
    from whisper_mlx.transcribe import rung_options

    options = DecodingOptions(beam_size=5, patience=2.0, best_of=4, temperature=1.0)
    zero, hot = rung_options(options, 0.0), rung_options(options, 0.4)
    assert (zero.beam_size, zero.patience, zero.best_of, zero.temperature) == (5, 2.0, None, 0.0)
    assert (hot.beam_size, hot.patience, hot.best_of, hot.temperature) == (None, None, 4, 0.4)


# ------------------------------------------------------------------------------------ real weights

JFK_BEAM5 = (
    " And so, my fellow Americans ask not what your country can do for you ask what you can do for your country."
)
LS_BEAM5 = (
    " Then, the goods sold openly shorted the burden she had borne so long in secret and bravely trudged on alone."
)


@pytest.fixture(scope="module", params=["auto", "mlx"] if os.environ.get("WHISPER_MLX_BACKEND") != "mlx" else ["mlx"])
def tiny_en_on(request):
    """tiny.en on the suite's backend (auto: numpy on a CPU), and on the MLX backend."""
    from whisper_mlx.load_models import default_model_path, get_cached_model

    return get_cached_model(default_model_path(), backend=None if request.param == "auto" else request.param)


def test_five_beams_pinned_transcripts(tiny_en_on, data_dir):
    from whisper_mlx import transcribe

    jfk = transcribe(str(data_dir / "jfk.flac"), model=tiny_en_on, beam_size=5)
    assert jfk["text"] == JFK_BEAM5
    assert [(s["start"], s["end"]) for s in jfk["segments"]] == [(0.0, 8.0), (8.0, 11.0)]
    ls = transcribe(str(data_dir / "ls_test.flac"), model=tiny_en_on, beam_size=5, batch_size=12)
    assert ls["text"] == LS_BEAM5
    sequential = transcribe(str(data_dir / "ls_test.flac"), model=tiny_en_on, beam_size=5)
    assert sequential["segments"] == ls["segments"]


def test_five_beams_with_prompt_prefix_and_word_timestamps(tiny_en, data_dir):
    from whisper_mlx import transcribe

    path, beams = str(data_dir / "jfk.flac"), {"beam_size": 5, "temperature": 0.0}
    result = transcribe(
        path,
        model=tiny_en,
        patience=2.0,
        length_penalty=0.5,
        initial_prompt="President Kennedy's inaugural address.",
        word_timestamps=True,
        **beams,
    )
    assert "my fellow Americans ask not" in result["text"] and "for your country" in result["text"]
    for segment in result["segments"]:
        assert "".join(w["word"] for w in segment["words"]) == segment["text"]
        assert all(w["start"] <= w["end"] for w in segment["words"])
    prefixed = transcribe(path, model=tiny_en, prefix="And so my", without_timestamps=True, **beams)
    assert prefixed["text"].startswith(" fellow Americans ask not")  # the text after the forced prefix


@pytest.mark.slow
def test_five_beams_in_batched_lanes(tiny_en, data_dir):
    """130 s: two lanes whose windows are decoded together, five beams each, each lane its own seek loop."""
    import whisper_mlx
    from whisper_mlx import transcribe

    audio = whisper_mlx.load_audio(str(data_dir / "alice_ch1.flac"))[: 16000 * 130]
    result = transcribe(audio, model=tiny_en, language="en", batch_size=12, beam_size=5)
    segments = result["segments"]
    assert result["text"] == "".join(s["text"] for s in segments)
    assert all(a["end"] <= b["start"] + 1e-6 and a["start"] <= a["end"] for a, b in itertools.pairwise(segments))
    assert len({s["seek"] for s in segments}) >= 5  # windows of both lanes
    assert max(s["end"] for s in segments) > 120.0
    assert "Alice" in result["text"] and "rabbit" in result["text"]
