"""Counter-based sampling (sampling.py): exact draws from softmax(logits / T), the same numbers on both
array modules, and a row's draws independent of the other rows."""

import mlx.core as mx
import numpy as np
import pytest

from whisper_mlx.decoding import DecodingOptions, DecodingTask, candidate_keys
from whisper_mlx.sampling import derive_key, gumbel_sample, mix32, uniform
from whisper_mlx.whisper import ModelDimensions, Whisper


def test_mix32_is_the_same_on_both_array_modules_and_a_bijection_on_a_range():
    words = np.arange(0, 1 << 20, dtype=np.uint32) * np.uint32(4093)
    mixed = mix32(words)
    np.testing.assert_array_equal(mixed, np.array(mix32(mx.array(words))))
    assert len(np.unique(mixed)) == len(words)


def test_uniform_numbers_are_equal_on_both_modules_and_look_uniform():
    keys = np.arange(64, dtype=np.uint32)
    u = uniform(keys, 3, 4096)
    np.testing.assert_array_equal(u, np.array(uniform(mx.array(keys), 3, 4096)))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    assert np.abs(counts / u.size * 16 - 1).max() < 0.02
    # neighbouring keys, steps and columns are not correlated
    for a, b in [(u[:-1], u[1:]), (u[:, :-1], u[:, 1:]), (u, uniform(keys, 4, 4096))]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01


@pytest.mark.parametrize("xp", [mx, np], ids=["mlx", "numpy"])
def test_gumbel_samples_follow_the_tempered_softmax(xp):
    logits = np.array([0.0, np.log(2), np.log(3), np.log(4), -np.inf], np.float32)  # the last is never drawn
    temperature = 0.5
    want = np.exp(logits[:4] / temperature) / np.exp(logits[:4] / temperature).sum()  # 1:4:9:16
    rows = 20000
    keys = np.arange(rows, dtype=np.uint32)
    tokens = np.array(gumbel_sample(xp.array(np.tile(logits, (rows, 1))), temperature, xp.array(keys), 0))
    frequencies = np.bincount(tokens, minlength=5) / rows
    assert frequencies[4] == 0
    sigma = np.sqrt(want * (1 - want) / rows)
    assert np.all(np.abs(frequencies[:4] - want) < 4 * sigma), (frequencies, want)


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype(np.float32)
    keys = np.array([5, 9, 11, 5, 7, 3], np.uint32)
    together = gumbel_sample(logits, 1.0, keys, 7)
    alone = [int(gumbel_sample(logits[i : i + 1], 1.0, keys[i : i + 1], 7)[0]) for i in range(6)]
    assert together.tolist() == alone
    assert together[0] == together[3]  # same key, same logits
    assert (
        len({int(t) for t in gumbel_sample(np.zeros((40, 300), np.float32), 1.0, np.arange(40, dtype=np.uint32), 7)})
        > 30
    )


def test_derived_keys_tell_their_parts_apart():
    keys = {derive_key(seed, seek) for seed in (0, 1, -1, 2**40) for seek in (0, 1, 3000, 3001)}
    assert len(keys) == 16
    assert derive_key(1, 2) != derive_key(2, 1)
    assert derive_key(0, 0) != derive_key(0)
    rungs = candidate_keys([17, 18], 0.2, 3)
    assert rungs.dtype == np.uint32 and len(set(rungs.tolist())) == 6
    assert not set(rungs.tolist()) & set(candidate_keys([17, 18], 0.4, 3).tolist())


def test_decoding_with_the_same_keys_draws_the_same_samples():
    dims = ModelDimensions(80, 1500, 64, 1, 1, 51864, 448, 64, 1, 1)
    model = Whisper(dims)
    features = mx.random.normal((2, 1500, 64), key=mx.random.key(1))
    task = DecodingTask(model, DecodingOptions(language="en", sample_len=16, temperature=1.0, best_of=2))
    first = [r.tokens for r in task.run(features, keys=[10, 20])]
    again = [r.tokens for r in task.run(features, keys=[10, 20])]
    swapped = [r.tokens for r in task.run(features[::-1], keys=[20, 10])]
    other = [r.tokens for r in task.run(features, keys=[11, 21])]
    assert first == again == swapped[::-1]
    assert other != first


@pytest.mark.parametrize("seed", ["1", 1.5, True])
def test_a_seed_that_is_not_an_integer_is_a_decoding_error(seed):
    from whisper_mlx.errors import DecodingError
    from whisper_mlx.transcribe import build_options

    with pytest.raises(DecodingError, match="seed must be an integer"):
        build_options(0.0, 1, None, "0", seed=seed)
    assert build_options(0.0, 1, None, "0", seed=None).seed is None
