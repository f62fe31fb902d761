"""The numpy CPU kernels against straightforward references, and the encoder/logits with the CPU
fast paths against MLX's own ops."""

import math
import os
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from whisper_mlx import whisper
from whisper_mlx.audio import load_audio, log_mel_spectrogram, pad_or_trim
from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.backends.numpy_backend import NumpyBackend, panels, schedule
from whisper_mlx.backends.numpy_backend import blas as host_blas
from whisper_mlx.backends.numpy_backend import kernels as cpu_kernels
from whisper_mlx.backends.numpy_backend.buffers import BufferPool

needs_cpu = pytest.mark.skipif(
    mx.default_device() != mx.cpu, reason="the numpy backend runs where MLX computes on the CPU"
)


def reference_attention(q, k, v, n_head):
    """float64 softmax(q kᵀ / √d) v on (B, L, n_head * d) arrays; k and v may be longer than q."""
    batch, length, width = q.shape

    def split(x):
        return x.reshape(batch, -1, n_head, width // n_head).transpose(0, 2, 1, 3).astype(np.float64)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(width // n_head)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)


@pytest.fixture(params=["kernel", "numpy"])
def step_attention(request, monkeypatch):
    """A decoding step's attention through the C kernel (where it was built) and through numpy's calls."""
    if request.param == "numpy":
        monkeypatch.setattr(panels.StepAttention, "of", classmethod(lambda cls, *arrays: None))
    elif not panels.available():
        pytest.skip("the panel kernel was not built (no C compiler at install)")
    return request.param


@pytest.fixture(params=[True, False], ids=["threads", "serial"])
def threads(request):
    if request.param:
        yield True
        return
    with schedule.blocks_on_this_thread():  # the blocks run in the calling thread
        yield False


@pytest.mark.parametrize("length", [1, 257, 600])  # one row, and lengths that split into ragged blocks
def test_attention_equals_reference(threads, length):
    rng = np.random.default_rng(length)
    q, k, v = (rng.normal(size=(2, length, 96)).astype(np.float32) * 2 for _ in range(3))
    got = cpu_kernels.attention(q, k, v, n_head=3)
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_attention(q, k, v, 3), rtol=1e-5, atol=1e-5)


def test_attention_shifts_rows_whose_scores_could_overflow(threads):
    """Rows whose scores are bounded skip the max pass; rows with scores of hundreds (exp(89) overflows
    float32) still get theirs subtracted."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.normal(size=(1, 300, 96)).astype(np.float32) for _ in range(3))
    q[0, ::3] *= 40
    got = cpu_kernels.attention(q, k, v, n_head=3)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_attention(q, k, v, 3), rtol=1e-4, atol=1e-4)


@pytest.fixture(params=["mkl", "numpy"])
def gelu_impl(request, monkeypatch):
    """Φ from MKL's vector math library, or the numpy erf approximation (no MKL preloaded)."""
    if request.param == "mkl" and not host_blas.has_normal_cdf():
        pytest.skip("needs MKL's vector math (vmsCdfNorm) preloaded")
    if request.param == "numpy":
        monkeypatch.setattr(host_blas, "has_normal_cdf", lambda: False)
    return request.param


def test_gelu_equals_exact_erf_gelu(threads, gelu_impl):
    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = cpu_kernels.gelu(x.reshape(5, -1)).reshape(-1)
    np.testing.assert_allclose(got, exact, rtol=0, atol=5e-7)
    near = (x > -2) & (x != 0)  # relative precision where the outputs are not negligible
    np.testing.assert_allclose(got[near], exact[near], rtol=1e-5)
    mlx_gelu = np.array(nn.gelu(mx.array(x)))
    assert np.abs(got - exact).max() <= np.abs(mlx_gelu - exact).max() + 1e-7


def test_gelu_outputs_stay_out_of_the_denormal_range(gelu_impl):
    """Large negative inputs (the last tiny.en encoder layer reaches -100) must not give denormal outputs:
    a matrix product of them ran ~10x slower. Their outputs stay ~0, as the exact GELU's are."""
    x = np.linspace(-200, 200, 400_001).astype(np.float32)
    got = cpu_kernels.gelu(x)
    magnitude = np.abs(got[got != 0])
    assert magnitude.min() > 1e-25
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=5e-7)
    weights = np.full((1, 64), 1e-3, np.float32)  # products with small weights stay normal floats too
    assert np.abs(got[:, None] * weights)[got != 0].min() > np.finfo(np.float32).tiny


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernels_work_in_a_forked_child():
    x = np.linspace(-3, 3, 1 << 17, dtype=np.float32)
    want = cpu_kernels.gelu(x)  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # child: must not wait on the parent's (absent) worker threads
        os._exit(0 if np.array_equal(cpu_kernels.gelu(x), want) else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child hung in the CPU kernels")


def test_gelu_keeps_shape_and_non_contiguous_input():
    x = np.random.default_rng(0).normal(size=(3, 40, 70)).astype(np.float32)
    view = x.transpose(2, 0, 1)
    np.testing.assert_allclose(cpu_kernels.gelu(view), np.array(nn.gelu(mx.array(view))), atol=1e-6)


def test_mlp_equals_reference(threads):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 300, 48)).astype(np.float32)  # 600 rows: ragged last block
    w1, b1 = rng.normal(size=(192, 48)).astype(np.float32) / 7, rng.normal(size=192).astype(np.float32)
    w2, b2 = rng.normal(size=(48, 192)).astype(np.float32) / 14, rng.normal(size=48).astype(np.float32)
    h = x.astype(np.float64) @ w1.T + b1
    want = (0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))) @ w2.T + b2
    got = cpu_kernels.mlp(x, w1, b1, w2, b2)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("model_name", ["tiny_en", "base_model"])  # 6 heads x 64, 8 heads x 64
def test_numpy_encoder_equals_mlx_encoder(model_name, data_dir, request):
    model = request.getfixturevalue(model_name)
    mel = pad_or_trim(np.array(log_mel_spectrogram(load_audio(str(data_dir / "jfk.flac")))), 3000, axis=0)[None]
    fast = NumpyBackend(model).encode(mel)
    plain = np.array(MLXBackend(model).encode(mel))
    np.testing.assert_allclose(fast, plain, rtol=1e-3, atol=2e-3)  # float32 sums in another order
    assert np.abs(fast - plain).mean() < 1e-5


@needs_cpu
def test_numpy_logits_equal_embedding_and_follow_new_weights(tiny_en):
    decoder = tiny_en.decoder
    original = decoder.token_embedding.weight
    backend = NumpyBackend(tiny_en)
    for rows in (1, 2, 3, 10):  # one row (gemv), and the packed embedding's row counts
        hidden = np.random.default_rng(rows).normal(size=(rows, 384)).astype(np.float32)
        want = np.array(decoder.logits(mx.array(hidden)))
        np.testing.assert_allclose(backend.decoder.logits(hidden), want, rtol=1e-5, atol=1e-4)
        try:
            decoder.token_embedding.weight = original * 2  # e.g. load_weights after a first decode
            np.testing.assert_allclose(backend.decoder.logits(hidden), want * 2, rtol=1e-5, atol=2e-4)
        finally:
            decoder.token_embedding.weight = original


@needs_cpu
@pytest.mark.parametrize("batch, length", [(3, 1), (4, 7)])  # greedy steps, and a prompt's first step
def test_numpy_cross_attention_equals_mlx_sdpa(tiny_en, batch, length, step_attention):
    attention = tiny_en.decoder.blocks[0].cross_attn
    layer = NumpyBackend(tiny_en).decoder.layers[0]
    rng = np.random.default_rng(batch)
    audio = rng.normal(size=(batch, 1500, 384)).astype(np.float32)
    x = rng.normal(size=(batch, length, 384)).astype(np.float32)
    query = whisper.split_heads(layer.cross_query(x), 6)
    cache = layer.cross_cache(audio, BufferPool())
    fast = layer.cross_out(whisper.merge_heads(cpu_kernels.cross_attention(query, *cache)))
    plain = np.array(attention.cross(mx.array(x), attention.cross_kv(mx.array(audio))))
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5)
    # and against float64 softmax(q kᵀ / √d) v on the projections
    q, k, v = (
        np.array(p(mx.array(t))) for p, t in ((attention.query, x), (attention.key, audio), (attention.value, audio))
    )
    want = np.array(attention.out(mx.array(reference_attention(q, k, v, 6).astype(np.float32))))
    np.testing.assert_allclose(fast, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_rows", [0, 1, "all"])  # no mask, one for all rows, one per row
@pytest.mark.parametrize("batch", [1, 2, 3, 6])
def test_step_attention_splits_rows_over_a_worker_exactly(batch, mask_rows, monkeypatch, step_attention):
    rng = np.random.default_rng(batch)
    q = rng.normal(size=(batch, 6, 1, 64)).astype(np.float32)
    q[0] *= 40  # row 0's scores leave the unshifted softmax's range, the others' do not
    keys_t = (rng.normal(size=(batch, 6, 64, 300)) / 8).astype(np.float32)
    values = rng.normal(size=(batch, 6, 300, 64)).astype(np.float32)
    mask = None
    if mask_rows:
        mask = np.zeros((batch if mask_rows == "all" else 1, 1, 1, 300), np.float32)
        for b in range(mask.shape[0]):
            mask[b, ..., : 7 * b + 3] = -np.inf  # e.g. a row's left padding
    pool, submitted = schedule.workers(), []

    class Spy:
        def submit(self, task, *args):
            submitted.append(args)
            return pool.submit(task, *args)

    monkeypatch.setattr(cpu_kernels, "workers", Spy)
    monkeypatch.setattr(cpu_kernels, "worker_count", lambda: 2)
    got = cpu_kernels.attend(q, keys_t, values, mask)
    np.testing.assert_array_equal(got, cpu_kernels.cross_attention(q, keys_t, values) if mask is None else got)
    assert len(submitted) == (2 if mask is None else 1) * (batch >= cpu_kernels.STEP_SPLIT_MIN_ROWS)
    # each row exactly as alone (the split changes no bit), and softmax(q k + mask) v in float64
    for b in range(batch):
        row_mask = None if mask is None else mask[min(b, mask.shape[0] - 1)][None]
        np.testing.assert_array_equal(
            got[b : b + 1], cpu_kernels.attend(q[b : b + 1], keys_t[b : b + 1], values[b : b + 1], row_mask)
        )
    scores = q.astype(np.float64) @ keys_t + (0 if mask is None else mask)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = weights / weights.sum(-1, keepdims=True) @ values
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def reference_masked_attention(q, k, v, mask):
    scores = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v.astype(np.float64)


def causal_and_padding_mask(pad: list[int], length: int) -> np.ndarray:
    """(B, 1, L, L): causal, and real queries never see a row's left padding (as the decoder's prompt)."""
    positions = np.arange(length)
    mask = np.where(positions[None, :] > positions[:, None], -np.inf, 0.0)[None, None]
    padded = (positions[None, None, :] < np.array(pad)[:, None, None]) & (
        positions[None, :, None] >= np.array(pad)[:, None, None]
    )
    return (mask + np.where(padded, -np.inf, 0.0)[:, None]).astype(np.float32)


@pytest.mark.parametrize("pad", [[0], [0, 40, 299]])  # one causal mask for all rows; a mask per row
def test_masked_attention_equals_reference(threads, pad):
    rng = np.random.default_rng(len(pad))
    q, k, v = (rng.normal(size=(len(pad), 3, 300, 32)).astype(np.float32) * 2 for _ in range(3))
    mask = causal_and_padding_mask(pad, 300)
    got = cpu_kernels.masked_attention(q, k, v, mask)
    np.testing.assert_allclose(got, reference_masked_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        cpu_kernels.masked_attention(q, k, v, None), reference_masked_attention(q, k, v, 0.0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_sdpa_equals_explicit_attention_with_padding_masks(dtype):
    """The MLX model's one attention dispatch (mx.fast SDPA) and the numpy backend's kernel against
    softmax(q kᵀ / √d + mask) v in float64, with causal and left-padding masks per row."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 6, 228, 64)).astype(np.float32) for _ in range(3))
    mask = causal_and_padding_mask([0, 23, 73], 228)
    want = reference_masked_attention(q, k, v, mask)
    sdpa = whisper.attend(*(mx.array(a).astype(dtype) for a in (q, k, v)), mx.array(mask).astype(dtype))
    tolerance = 1e-4 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(np.array(sdpa.astype(mx.float32)), want, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(cpu_kernels.masked_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
