"""On-device logit filters against a straightforward reference; model cache equivalences on a tiny
random-weight model (no downloads, fast)."""

import mlx.core as mx
import numpy as np
import pytest

from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.backends.numpy_backend import NumpyBackend
from whisper_mlx.decoding import (
    ApplyTimestampRules,
    DecodingOptions,
    DecodingTask,
    SuppressTokens,
    TimestampHistory,
    compression_ratio,
    rank_candidates,
    select_tokens,
)
from whisper_mlx.errors import DecodingError
from whisper_mlx.tokenizer import get_tokenizer
from whisper_mlx.whisper import ModelDimensions, Whisper

from reference_rules import reference_filter

N_VOCAB = 51864  # tiny.en


def random_history(rng, batch, n, ts_begin, xp=mx):
    seqs = [
        [
            int(rng.integers(ts_begin, ts_begin + 40)) if rng.random() < 0.5 else int(rng.integers(0, 500))
            for _ in range(n)
        ]
        for _ in range(batch)
    ]
    history = TimestampHistory.empty(batch, xp)
    for i in range(n):
        history = history.push(xp.array([s[i] for s in seqs], dtype=xp.int32), ts_begin)
    return seqs, history


@pytest.mark.parametrize("xp", [mx, np], ids=["mlx", "numpy"])
@pytest.mark.parametrize("seed", range(6))
def test_timestamp_rules_equal_reference(seed, xp):
    tokenizer = get_tokenizer(False)
    ts_begin = tokenizer.timestamp_begin
    suppressed = [*tokenizer.non_speech_tokens, tokenizer.sot, tokenizer.no_speech]
    blank = [*tokenizer.encode(" "), tokenizer.eot]
    suppressor = SuppressTokens(N_VOCAB, suppressed, blank)
    rules = ApplyTimestampRules(tokenizer, N_VOCAB, max_initial_timestamp_index=50)
    rng = np.random.default_rng(seed)
    for _trial in range(25):
        n = int(rng.integers(0, 6))
        seqs, history = random_history(rng, 5, n, ts_begin, xp)
        logits = rng.normal(size=(5, N_VOCAB)) * 3
        logits[:, ts_begin:] += rng.normal() * 6  # sometimes timestamps dominate, sometimes text
        got = rules.apply(suppressor.apply(xp.array(logits.astype(np.float32)), n), history, n)
        got = np.array(got)
        want = reference_filter(
            logits,
            seqs,
            ts_begin=ts_begin,
            eot=tokenizer.eot,
            no_timestamps=tokenizer.no_timestamps,
            suppress=suppressed,
            blank=blank,
            max_initial_index=50,
        )
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-4)
        assert np.isfinite(got).any(axis=-1).all(), "a row must never be fully masked"


def test_row_never_fully_masked_after_last_timestamp():
    tokenizer = get_tokenizer(False)
    ts_end = tokenizer.timestamp_begin + 1500  # <|30.00|>
    rules = ApplyTimestampRules(tokenizer, N_VOCAB, 50)
    history = TimestampHistory.empty(1).push(mx.array([100], dtype=mx.int32), tokenizer.timestamp_begin)
    history = history.push(mx.array([ts_end], dtype=mx.int32), tokenizer.timestamp_begin)
    logits = rules.apply(mx.zeros((1, N_VOCAB)), history, 2)
    assert np.isfinite(np.array(logits)).any()
    assert int(mx.argmax(logits, axis=-1).item()) in (tokenizer.eot, ts_end)


def tiny_dims(n_vocab=51864):
    return ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=n_vocab,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=2,
    )


@pytest.fixture(scope="module")
def random_model():
    mx.random.seed(0)
    model = Whisper(tiny_dims())
    model.update(model.parameters())  # materialise
    positional = mx.random.normal(model.decoder.positional_embedding.shape) * 0.1
    model.decoder.positional_embedding = positional
    return model


def test_cached_steps_equal_full_forward(random_model):
    features = mx.random.normal((2, 1500, 64))
    tokens = mx.array([[50257, 50362, 400, 401, 402], [50257, 50362, 10, 11, 12]])
    full = random_model.logits(tokens, features)
    state = random_model.new_state(features)
    first, _ = random_model.step(tokens[:, :2], state)
    steps = [first[:, -1]] + [random_model.step(tokens[:, i : i + 1], state)[0][:, -1] for i in range(2, 5)]
    np.testing.assert_allclose(np.array(mx.stack(steps, axis=1)), np.array(full[:, 1:]), atol=1e-4)


def test_left_padded_row_equals_unpadded(random_model):
    features = mx.random.normal((1, 1500, 64))
    short = [50257, 50362, 7]
    state = random_model.new_state(features)
    alone, _ = random_model.step(mx.array([short]), state)
    padded_state = random_model.new_state(mx.concatenate([features, features]), mx.array([0, 3], mx.int32))
    rows = mx.array([[50361, 1, 2, *short], [50256, 50256, 50256, *short]])
    together, _ = random_model.step(rows, padded_state)
    np.testing.assert_allclose(np.array(together[1, -1]), np.array(alone[0, -1]), atol=1e-4)
    nxt = mx.array([[9], [9]])
    np.testing.assert_allclose(
        np.array(random_model.step(nxt, padded_state)[0][1, -1]),
        np.array(random_model.step(nxt[:1], state)[0][0, -1]),
        atol=1e-4,
    )


def test_batch_equals_single_and_compaction(random_model):
    features = mx.random.normal((3, 1500, 64))
    task = DecodingTask(random_model, DecodingOptions(language="en", sample_len=12))
    batched = task.run(features, [None, "a prompt of some words", None])
    singles = [task.run(features[i : i + 1], [p])[0] for i, p in enumerate([None, "a prompt of some words", None])]
    for b, s in zip(batched, singles):
        assert b.tokens == s.tokens
        assert b.avg_logprob == pytest.approx(s.avg_logprob, abs=1e-4)


def test_numpy_and_mlx_backends_decode_alike(random_model):
    features = mx.random.normal((3, 1500, 64), key=mx.random.key(7))
    options = DecodingOptions(language="en", sample_len=16)
    prompts = [None, "a prompt of some words", None]
    got = DecodingTask(random_model, options, backend=NumpyBackend(random_model)).run(np.array(features), prompts)
    other = DecodingTask(random_model, options, backend=MLXBackend(random_model)).run(features, prompts)
    assert [r.tokens for r in got] == [r.tokens for r in other]
    assert any(r.tokens for r in got)
    for a, b in zip(got, other):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, rel=1e-4)  # numpy vs MLX decoder: float32 sums


def test_sampling_is_real_and_best_of_ranks():
    logits = mx.zeros((1, 50))
    draws = {
        int(select_tokens(logits, 1.0, mx.array([key], mx.uint32), step).item())
        for key in range(8)
        for step in range(5)
    }
    assert len(draws) > 5, "temperature sampling must not collapse to argmax"
    assert int(select_tokens(mx.array([[0.0, 3.0, 1.0]]), 0.0).item()) == 1
    # length-normalised: -10/10 beats -4/3; Google NMT penalty (alpha 1): -10/2.5 loses to -4/1.33
    assert rank_candidates(np.array([-10.0, -4.0]), np.array([10, 3]), None) == 0
    assert rank_candidates(np.array([-10.0, -4.0]), np.array([10, 3]), 1.0) == 1


def test_options_validation(random_model):
    with pytest.raises(DecodingError):
        DecodingOptions(task="summarise")
    with pytest.raises(DecodingError):  # checked when decoding starts, as openai does (test_beam_search.py)
        DecodingTask(random_model, DecodingOptions(best_of=3, temperature=0.0))
    assert compression_ratio("ab" * 200) > 2.4 > compression_ratio("The quick brown fox jumps over it.")


@pytest.mark.parametrize("seed", range(4))
def test_fused_greedy_equals_masked_argmax(seed):
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    n_vocab = 51865
    ts_begin = tokenizer.timestamp_begin
    suppressor = SuppressTokens(
        n_vocab, [*tokenizer.non_speech_tokens, tokenizer.sot], [*tokenizer.encode(" "), tokenizer.eot]
    )
    rules = ApplyTimestampRules(tokenizer, n_vocab, max_initial_timestamp_index=50)
    rng = np.random.default_rng(100 + seed)
    for _trial in range(25):
        n = int(rng.integers(0, 6))
        _, history = random_history(rng, 6, n, ts_begin)
        logits = rng.normal(size=(6, n_vocab)) * 3
        logits[:, ts_begin:] += rng.normal() * 6
        logits[:, tokenizer.eot] += rng.normal() * 4
        suppressed = suppressor.apply(mx.array(logits.astype(np.float32)), n)
        masked = rules.apply(suppressed, history, n)
        want_tokens = mx.argmax(masked, axis=-1)
        masked64 = np.array(masked).astype(np.float64)  # float64 reference: float32 sums of 50k terms drift
        top = masked64.max(axis=-1, keepdims=True)
        want_logprob = -np.log(np.exp(masked64 - top).sum(axis=-1))  # of the argmax, whose logit is top
        tokens, logprob = rules.greedy(suppressed, history, n)
        np.testing.assert_array_equal(np.array(tokens), np.array(want_tokens))
        np.testing.assert_allclose(np.array(logprob), want_logprob, rtol=1e-5, atol=2e-4)
        # the same filters on numpy arrays (MLX's CPU backend runs greedy steps there)
        host_history = TimestampHistory(
            *(np.array(a) for a in (history.last, history.penultimate, history.last_timestamp))
        )
        host_tokens, host_logprob = rules.greedy(suppressor.apply(logits.astype(np.float32), n), host_history, n)
        assert isinstance(host_tokens, np.ndarray) and host_tokens.dtype == np.int32
        np.testing.assert_array_equal(host_tokens, np.array(want_tokens))
        np.testing.assert_allclose(host_logprob, want_logprob, rtol=1e-6, atol=1e-5)  # numpy sums pairwise
