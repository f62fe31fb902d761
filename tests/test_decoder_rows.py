"""Decoder states with several rows per window (a window's beams) on both backends: the prompt is fed
once per window and copied to its rows, the rows share the window's cross-attention keys/values, rows
are rearranged to the beams they continue, and whole windows are dropped."""

import mlx.core as mx
import numpy as np
import pytest

from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.backends.numpy_backend import NumpyBackend
from whisper_mlx.whisper import ModelDimensions, Whisper

BACKENDS = pytest.mark.parametrize("make_backend", [NumpyBackend, MLXBackend], ids=["numpy", "mlx"])


@pytest.fixture(scope="module")
def random_model():
    mx.random.seed(5)
    model = Whisper(ModelDimensions(80, 1500, 64, 2, 1, 51864, 448, 64, 2, 2))
    model.update(model.parameters())
    model.decoder.positional_embedding = mx.random.normal(model.decoder.positional_embedding.shape) * 0.1
    return model


def features_of(backend, n: int, seed: int):
    features = mx.random.normal((n, 1500, 64), key=mx.random.key(seed))
    return np.array(features) if backend.xp is np else features


@BACKENDS
def test_rows_of_a_window_equal_that_window_alone(random_model, make_backend):
    """Three rows fed different tokens over one window's shared keys/values: each as the window alone."""
    backend = make_backend(random_model)
    xp, features = backend.xp, features_of(backend, 2, 4)
    prompts = np.array([[50257, 50362, 11, 12], [50257, 50362, 21, 22]])
    state = backend.new_state(features, np.array([0, 0]), rows_per_window=3)
    logits, _ = backend.prefill(state, prompts, 0)
    assert logits.shape == (2, 51864) and state.offset == 4
    tokens = np.array([100, 101, 102, 200, 201, 202], np.int32)
    got = np.array(backend.step(state, xp.array(tokens)))
    for row, token in enumerate(tokens):
        alone = backend.new_state(features[row // 3 : row // 3 + 1], np.zeros(1, np.int64))
        backend.prefill(alone, prompts[row // 3 : row // 3 + 1], 0)
        want = np.array(backend.step(alone, xp.array(np.array([token], np.int32))))[0]
        np.testing.assert_allclose(got[row], want, atol=2e-4)


@BACKENDS
def test_rearranged_rows_continue_their_source_beams(random_model, make_backend):
    """After rearrange, a row's next logits are those of the sequence it took over."""
    backend = make_backend(random_model)
    xp, features = backend.xp, features_of(backend, 2, 6)
    prompt = np.array([[50257, 50362, 11, 12], [50257, 50362, 21, 22]])
    state = backend.new_state(features, np.zeros(2, np.int64), rows_per_window=3)
    backend.prefill(state, prompt, 0)
    steps = [np.array([100, 101, 102, 200, 201, 202]), np.array([7, 8, 9, 7, 8, 9])]
    backend.step(state, xp.array(steps[0].astype(np.int32)))
    sources = np.array([2, 2, 0, 4, 3, 5])
    state.rearrange(xp.array(sources))
    got = np.array(backend.step(state, xp.array(steps[1].astype(np.int32))))
    for row, source in enumerate(sources):
        window = row // 3
        alone = backend.new_state(features[window : window + 1], np.zeros(1, np.int64))
        tokens = [*prompt[window], steps[0][source]]
        backend.prefill(alone, np.array([tokens]), 0)
        want = np.array(backend.step(alone, xp.array(np.array([steps[1][row]], np.int32))))[0]
        np.testing.assert_allclose(got[row], want, atol=2e-4)


@BACKENDS
def test_dropping_windows_keeps_their_beams(random_model, make_backend):
    backend = make_backend(random_model)
    xp, features = backend.xp, features_of(backend, 3, 8)
    prompt = np.array([[50257, 50362, 11 + w] for w in range(3)])
    state = backend.new_state(features, np.zeros(3, np.int64), rows_per_window=2)
    backend.prefill(state, prompt, 0)
    first = np.arange(300, 306, dtype=np.int32)
    backend.step(state, xp.array(first))
    state.take(xp.array(np.array([0, 2])))
    got = np.array(backend.step(state, xp.array(np.array([5, 6, 7, 8], np.int32))))
    full = backend.new_state(features, np.zeros(3, np.int64), rows_per_window=2)
    backend.prefill(full, prompt, 0)
    backend.step(full, xp.array(first))
    want = np.array(backend.step(full, xp.array(np.array([5, 6, 0, 0, 7, 8], np.int32))))
    np.testing.assert_allclose(got, want[[0, 1, 4, 5]], atol=2e-4)
