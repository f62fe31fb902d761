"""The panel kernel (backends/numpy_backend/panels.py): products of a few rows against float64, each
row's bits independent of the rows beside it and of the threads' column split, every instruction-set
copy this CPU runs, and the decoder's use of it; and the decoding steps' attention in the same library."""

import itertools
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from whisper_mlx.backends.numpy_backend import NumpyBackend, panels, schedule
from whisper_mlx.backends.numpy_backend import model as host_model

pytestmark = [
    pytest.mark.skipif(not panels.available(), reason="the panel kernel was not built (no C compiler at install)"),
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the numpy backend runs where MLX computes on the CPU"),
]


def test_the_kernel_is_built_in_ci():
    """CI installs with a compiler: a failed build there (the extension is optional) must not pass."""
    if os.environ.get("CI"):
        assert panels.available()


@pytest.fixture(params=panels.INSTRUCTION_SETS)
def instruction_set(request):
    """Each kernel copy this CPU can run (a copy it cannot run is skipped, with that reason)."""
    in_use = panels.use_instruction_set(request.param)
    try:
        if in_use != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield in_use
    finally:
        panels.use_instruction_set()


def random_case(rows: int, width: int, inner: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, inner), dtype=np.float32),
        rng.standard_normal((width, inner), dtype=np.float32),
        rng.standard_normal(width, dtype=np.float32),
    )


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 30, 64])
@pytest.mark.parametrize("width", [16, 37, 200])
def test_products_equal_float64(instruction_set, rows, width):
    x, weight, bias = random_case(rows, width, 96, seed=rows * width)
    weights = panels.PanelWeights(weight)
    want = x.astype(np.float64) @ weight.T.astype(np.float64)
    np.testing.assert_allclose(weights.matmul(x), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(weights.matmul(x, bias), want + bias, rtol=1e-5, atol=1e-4)


def test_a_row_is_the_same_bits_alone_in_any_batch_and_any_split(instruction_set):
    x, weight, bias = random_case(30, 517, 384, seed=1)
    weights = panels.PanelWeights(weight)
    whole = weights.matmul(x, bias)
    for row in (0, 11, 29):
        np.testing.assert_array_equal(weights.matmul(x[row : row + 1], bias), whole[row : row + 1])
    np.testing.assert_array_equal(weights.matmul(x[6:19], bias), whole[6:19])
    for parts in (2, 3, 7):
        out = np.full_like(whole, np.nan)
        split = weights.split(parts)
        assert split[0].start == 0 and split[-1].stop == len(weights.panels)
        assert all(a.stop == b.start and a.start % weights.step == 0 for a, b in itertools.pairwise(split))
        for part in split:
            weights.matmul(x, bias, out=out, part=part)
        np.testing.assert_array_equal(out, whole)


def test_the_fused_copies_give_the_same_bits():
    """The AVX2 and AVX-512 copies both sum each output in one chain of fused multiply-adds."""
    x, weight, _ = random_case(13, 100, 384, seed=2)
    results = {}
    for name in ("avx2", "avx512"):
        if panels.use_instruction_set(name) == name:
            results[name] = panels.PanelWeights(weight).matmul(x)
    panels.use_instruction_set()
    if len(results) < 2:
        pytest.skip("needs a CPU with AVX2 and AVX-512")
    np.testing.assert_array_equal(results["avx2"], results["avx512"])


def test_a_part_writes_only_its_columns():
    x, weight, _ = random_case(3, 100, 64, seed=3)
    weights = panels.PanelWeights(weight)
    out = np.full((3, 100), np.nan, np.float32)
    part = weights.split(2)[0]
    weights.matmul(x, out=out, part=part)
    columns = part.stop * panels.PANEL
    np.testing.assert_array_equal(out[:, :columns], weights.matmul(x)[:, :columns])
    assert np.isnan(out[:, columns:]).all()


def test_an_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        panels.use_instruction_set("sse9")
    assert panels.instruction_set() in panels.INSTRUCTION_SETS


def test_mismatched_shapes_raise():
    x, weight, _ = random_case(3, 40, 64)
    weights = panels.PanelWeights(weight)
    with pytest.raises(ValueError, match="cannot multiply"):
        weights.matmul(x[:, :50])
    with pytest.raises(ValueError, match="cannot write"):
        weights.matmul(x, out=np.empty((3, 41), np.float32))


def test_the_environment_can_turn_the_kernel_off():
    check = (
        "from whisper_mlx.backends.numpy_backend import panels; import whisper_mlx; "
        "assert not panels.available() and whisper_mlx.backend_info()['panel_kernel'] is None"
    )
    env = {**os.environ, "WHISPER_MLX_PANELS": "0"}
    assert subprocess.run([sys.executable, "-c", check], env=env).returncode == 0


def test_a_steps_linear_layers_and_logits_use_the_kernel(tiny_en):
    """A decoding step's few rows go through the panels (the same bits as the kernel's own product),
    a prompt's many rows through the BLAS; logits of a batch are each row's logits alone."""
    host = NumpyBackend(tiny_en).decoder
    layer = host.layers[0].qkv
    rng = np.random.default_rng(4)
    few = rng.standard_normal((6, 1, 384), dtype=np.float32)
    direct = panels.PanelWeights(layer.weight).matmul(few[:, 0], layer.bias)
    np.testing.assert_array_equal(layer(few)[:, 0], direct)
    many = rng.standard_normal((2, panels.MAX_ROWS, 384), dtype=np.float32)
    np.testing.assert_array_equal(layer(many), host_model.affine(many, layer.weight, layer.bias))
    hidden = rng.standard_normal((panels.MAX_ROWS, 384), dtype=np.float32)
    logits = host.logits(hidden)
    np.testing.assert_allclose(logits, hidden.astype(np.float64) @ host.token_embedding.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(host.logits(hidden[3:5]), logits[3:5])
    assert host.embedding_parts == host.embedding_panels.split(schedule.worker_count())
    assert len(host.embedding_parts) == schedule.worker_count()


def attention_case(windows: int, length: int, queries: int = 1, seed: int = 0):
    """q (B, H, L, 64), transposed keys (B, H, 64, S) and values (B, H, S, 64), as a cross-attention cache."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((windows, 6, queries, 64), dtype=np.float32)
    keys_t = rng.standard_normal((windows, 6, 64, length), dtype=np.float32) / 3
    values = rng.standard_normal((windows, 6, length, 64), dtype=np.float32)
    return q, keys_t, values


def float64_attention(q, keys_t, values, mask=None):
    scores = q.astype(np.float64) @ keys_t.astype(np.float64) + (0 if mask is None else mask)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True) @ values.astype(np.float64)


@pytest.mark.parametrize("windows, length, queries", [(1, 1500, 1), (6, 1500, 1), (3, 37, 1), (2, 300, 5)])
def test_step_attention_equals_float64(instruction_set, windows, length, queries):
    """Cross-attention: transposed keys read in place; several queries per window (its beams) too."""
    q, keys_t, values = attention_case(windows, length, queries, seed=length)
    got = panels.StepAttention.of(q, keys_t, values, None)()
    np.testing.assert_allclose(got, float64_attention(q, keys_t, values), rtol=1e-5, atol=1e-5)


def test_step_self_attention_reads_the_cache_rows_in_place_under_a_padding_mask(instruction_set):
    """Self-attention: keys as rows of a longer cache (B, H, max_len, D), a left-padding mask per row."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 6, 1, 64), dtype=np.float32) / 4
    keys = rng.standard_normal((3, 6, 100, 64), dtype=np.float32)[:, :, :41]
    values = rng.standard_normal((3, 6, 100, 64), dtype=np.float32)[:, :, :41]
    mask = np.zeros((3, 1, 1, 41), np.float32)
    mask[1, ..., :9] = -np.inf
    keys_t = keys.swapaxes(-1, -2)
    kernel = panels.StepAttention.of(q, keys_t, values, mask)
    assert kernel is not None and not kernel.struct.transposed
    np.testing.assert_allclose(kernel(), float64_attention(q, keys_t, values, mask), rtol=1e-5, atol=1e-5)
    shared = panels.StepAttention.of(q, keys_t, values, mask[:1])()  # one mask for every row
    np.testing.assert_allclose(shared, float64_attention(q, keys_t, values, mask[:1]), rtol=1e-5, atol=1e-5)


def test_a_windows_attention_is_the_same_bits_alone_in_any_batch_and_any_split(instruction_set):
    q, keys_t, values = attention_case(5, 1500, seed=7)
    kernel = panels.StepAttention.of(q, keys_t, values, None)
    whole = kernel().copy()
    kernel.out[:] = np.nan
    for first, last in ((0, 7), (7, 18), (18, 30)):  # items: windows x heads
        kernel(first, last)
    np.testing.assert_array_equal(kernel.out, whole)
    alone = panels.StepAttention.of(q[3:4], keys_t[3:4], values[3:4], None)()
    np.testing.assert_array_equal(alone, whole[3:4])


def test_the_attention_copies_give_the_same_bits():
    q, keys_t, values = attention_case(2, 333, seed=8)
    results = {}
    for name in ("avx2", "avx512"):
        if panels.use_instruction_set(name) == name:
            results[name] = panels.StepAttention.of(q, keys_t, values, None)()
    panels.use_instruction_set()
    if len(results) < 2:
        pytest.skip("needs a CPU with AVX2 and AVX-512")
    np.testing.assert_array_equal(results["avx2"], results["avx512"])


def test_layouts_the_attention_kernel_cannot_read_are_left_to_numpy():
    q, keys_t, values = attention_case(2, 50)
    mask = np.zeros((2, 1, 1, 50), np.float32)
    assert panels.StepAttention.of(q[..., :48], keys_t[:, :, :48], values[..., :48], None) is None  # head dim
    assert panels.StepAttention.of(q, keys_t.astype(np.float64), values, None) is None
    assert panels.StepAttention.of(q, keys_t[..., ::2], values[:, :, ::2], None) is None  # strided keys
    several = np.repeat(q, 2, axis=2)
    assert panels.StepAttention.of(several, keys_t, values, np.zeros((2, 1, 2, 50), np.float32)) is None
    assert panels.StepAttention.of(q, keys_t, values, mask.astype(np.float64)) is None
    assert panels.StepAttention.of(q, keys_t, values, mask) is not None


def test_a_decoding_step_attends_through_the_kernel(tiny_en, monkeypatch):
    """Every attention of a greedy step (4 layers: self and cross) goes to the kernel."""
    backend = NumpyBackend(tiny_en)
    made = []
    original = panels.StepAttention.of.__func__

    def spy(cls, *arrays):
        kernel = original(cls, *arrays)
        made.append(kernel is not None)
        return kernel

    monkeypatch.setattr(panels.StepAttention, "of", classmethod(spy))
    features = np.random.default_rng(9).standard_normal((2, 1500, 384), dtype=np.float32)
    state = backend.new_state(features, np.array([0, 2]))
    backend.prefill(state, np.array([[50257, 50257, 50257, 50362], [50256, 50256, 50257, 50362]]), 2)
    made.clear()
    backend.step(state, np.array([440, 440]))
    assert made == [True] * 8
