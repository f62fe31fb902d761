"""The panel kernel (backends/numpy_backend/panels.py): products of a few rows against float64, each
row's bits independent of the rows beside it and of the threads' column split, every instruction-set
copy this CPU runs, and the decoder's use of it."""

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
