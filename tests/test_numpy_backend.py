"""The numpy backend's model against the MLX model, its threads, its selection, and the direct BLAS calls
against numpy."""

import itertools
import os
import subprocess
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from whisper_mlx.audio import load_audio, log_mel_spectrogram, pad_or_trim
from whisper_mlx.backends import select_backend
from whisper_mlx.backends.mlx_backend import MLXBackend
from whisper_mlx.backends.numpy_backend import NumpyBackend, schedule
from whisper_mlx.backends.numpy_backend import blas as host_blas
from whisper_mlx.backends.numpy_backend import model as host_model
from whisper_mlx.backends.numpy_backend import panels as host_panels
from whisper_mlx.backends.numpy_backend.model import HostEncoder
from whisper_mlx.decoding import DecodingOptions, DecodingTask
from whisper_mlx.errors import BackendError
from whisper_mlx.whisper import ModelDimensions, Whisper

from fake_backends import CountingBackend

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu, reason="the numpy backend runs where MLX computes on the CPU"
)


def host_decoder_for(model):
    return NumpyBackend(model).decoder


def host_encoder_for(model):
    return NumpyBackend(model).encoder


@pytest.fixture(scope="module")
def small_model():
    mx.random.seed(3)
    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51864,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=2,
    )
    model = Whisper(dims)
    model.update(model.parameters())
    model.decoder.positional_embedding = mx.random.normal(model.decoder.positional_embedding.shape) * 0.1
    return model


def compare_steps(model, features: mx.array, pad: list[int], prompt_length: int, atol: float):
    """Prefill left-padded rows, then a few single-token steps, in both decoders: hidden states and
    logits must agree at every position."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, size=(len(pad), prompt_length))
    for row, p in enumerate(pad):
        tokens[row, :p] = 50256
    host = host_decoder_for(model)
    mlx_state = model.new_state(features, mx.array(pad, dtype=mx.int32))
    host_state = host.new_state(np.array(features), np.array(pad), model.dims.n_text_ctx)
    for step in range(4):
        new = tokens if step == 0 else rng.integers(0, 50000, size=(len(pad), 1))
        _, want = model.step(mx.array(new, dtype=mx.int32), mlx_state)
        got = host.hidden(new, host_state)
        np.testing.assert_allclose(got, np.array(want), atol=atol, rtol=1e-4)
        if step == 0:  # a prompt that keeps two positions: the same states there, and the same caches
            kept_state = host.new_state(np.array(features), np.array(pad), model.dims.n_text_ctx)
            keep = [prompt_length - 1, pad[-1]]
            np.testing.assert_allclose(host.hidden(new, kept_state, keep=keep), got[:, keep], atol=atol, rtol=1e-4)
            for a, b in zip(kept_state.keys + kept_state.values, host_state.keys + host_state.values):
                np.testing.assert_array_equal(a, b)
        want_logits = np.array(model.decoder.logits(want[:, -1]))
        np.testing.assert_allclose(host.logits(got[:, -1]), want_logits, atol=atol, rtol=1e-4)
    assert host_state.offset == mlx_state.offset


def test_host_decoder_equals_mlx_decoder(small_model):
    compare_steps(small_model, mx.random.normal((3, 1500, 64)), [0, 2, 5], 9, atol=1e-4)


def test_host_decoder_equals_mlx_decoder_tiny_en(tiny_en, data_dir):
    mel = pad_or_trim(log_mel_spectrogram(load_audio(str(data_dir / "jfk.flac"))), 3000, axis=0)
    features = MLXBackend(tiny_en).encode(np.array(mel)[None])
    compare_steps(tiny_en, mx.concatenate([features, features]), [0, 4], 12, atol=2e-3)


def test_host_and_mlx_decoders_decode_alike(small_model):
    """Whole greedy decodes, rows finishing at different steps (compaction), prompts of different
    lengths: the same tokens and log probabilities from both decoders."""
    model = Whisper(small_model.dims)
    model.update(small_model.parameters())
    embedding = np.array(model.decoder.token_embedding.weight)
    embedding[50256] = np.random.default_rng(2).standard_normal(64) * 0.4  # EOT now wins at random steps
    model.decoder.token_embedding.weight = mx.array(embedding)
    features = mx.random.normal((6, 1500, 64), key=mx.random.key(11))
    options = DecodingOptions(language="en", sample_len=24)
    prompts = [None, "a prompt of some words", "short", None, None, "another prompt"]
    host = CountingBackend(NumpyBackend(model))
    got = DecodingTask(model, options, backend=host).run(np.array(features), prompts)
    assert host.calls["step"] and host.calls["prefill"] == 1
    want = DecodingTask(model, options, backend=MLXBackend(model)).run(features, prompts)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    lengths = [len(r.tokens) for r in got]
    assert len(set(lengths)) > 2 and max(lengths) > min(lengths) + 3, (
        f"rows should finish at different steps: {lengths}"
    )
    for a, b in zip(got, want):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-5)


@pytest.mark.parametrize("rows", [[1, 3, 4], [0, 1], [2], [3, 0, 2]])
def test_compaction_keeps_the_chosen_rows_caches(small_model, rows):
    """take() moves ascending rows forward in place (no new buffers), others by indexing: either way
    the state holds exactly the kept rows' caches, in the given order, and decodes on from them."""
    host = host_decoder_for(small_model)
    features = np.array(mx.random.normal((5, 1500, 64), key=mx.random.key(4)))
    state = host.new_state(features, np.array([0, 1, 0, 2, 0]), small_model.dims.n_text_ctx)
    host.hidden(np.random.default_rng(1).integers(0, 50000, size=(5, 6)), state)
    before = [a.copy() for a in [*state.keys, *state.values, *(a for pair in state.cross_kv for a in pair)]]
    buffer = state.cross_kv[0][0]
    state.take(np.array(rows))
    after = [*state.keys, *state.values, *(a for pair in state.cross_kv for a in pair)]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old[rows])
    np.testing.assert_array_equal(state.pad, np.array([0, 1, 0, 2, 0])[rows])
    assert np.shares_memory(state.cross_kv[0][0], buffer) == (rows == sorted(rows))
    assert host.hidden(np.full((len(rows), 1), 440), state).shape == (len(rows), 1, 64)


def test_sampled_decoding_on_both_backends_draws_alike(small_model):
    """Temperature sampling (the fallback ladder's rungs, best_of candidates) with numpy filters and
    MLX's generator: the same draws as the MLX backend under the same seed."""
    features = mx.random.normal((2, 1500, 64), key=mx.random.key(5))
    options = DecodingOptions(language="en", sample_len=12, temperature=0.7, best_of=2)
    mx.random.seed(21)
    got = DecodingTask(small_model, options, backend=NumpyBackend(small_model)).run(
        np.array(features), [None, "some words"]
    )
    mx.random.seed(21)
    want = DecodingTask(small_model, options, backend=MLXBackend(small_model)).run(features, [None, "some words"])
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert all(r.tokens for r in got)
    for a, b in zip(got, want):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)


def test_host_decoder_follows_replaced_weights(small_model):
    backend = NumpyBackend(small_model)
    first = backend.decoder
    assert backend.decoder is first  # built once
    old = small_model.decoder.blocks[0].mlp1.weight
    try:
        small_model.decoder.blocks[0].mlp1.weight = old * 2
        rebuilt = backend.decoder
        assert rebuilt is not first
        np.testing.assert_array_equal(rebuilt.layers[0].mlp.mlp1.weight, np.array(old * 2))
    finally:
        small_model.decoder.blocks[0].mlp1.weight = old


def test_auto_selection_and_models_the_numpy_backend_refuses(small_model, monkeypatch):
    monkeypatch.delenv("WHISPER_MLX_BACKEND", raising=False)
    assert select_backend(small_model).name == "numpy"  # plain float32 on the CPU
    quantized = Whisper(small_model.dims)
    quantized.update(small_model.parameters())
    nn.quantize(quantized, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    half = Whisper(small_model.dims, mx.float16)
    half.update(small_model.parameters())
    half.update(tree_map(lambda a: a.astype(mx.float16), half.parameters()))
    for model, problem in ((quantized, "quantized"), (half, "float16")):
        assert select_backend(model).name == "mlx"  # auto: MLX serves it
        assert select_backend(model, "auto").name == "mlx"
        with pytest.raises(BackendError, match=problem):
            select_backend(model, "numpy")
    features = MLXBackend(quantized).encode(np.zeros((1, 3000, 80), np.float32))
    assert features.shape == (1, 1500, 64)
    chosen_before = Whisper(small_model.dims)
    chosen_before.update(small_model.parameters())
    backend = NumpyBackend(chosen_before)
    nn.quantize(chosen_before, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    with pytest.raises(BackendError, match="quantized"):  # a clear error, not a crash in a kernel
        backend.encode(np.zeros((1, 3000, 80), np.float32))
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        select_backend(small_model, "tpu")
    monkeypatch.setenv("WHISPER_MLX_BACKEND", "mlx")
    assert select_backend(small_model).name == "mlx"
    monkeypatch.setenv("WHISPER_MLX_BACKEND", "cuda")
    with pytest.raises(BackendError, match="WHISPER_MLX_BACKEND"):
        select_backend(small_model)


@pytest.fixture(params=["blas", "numpy"])
def products_from(request, monkeypatch):
    """Each product library: the preloaded BLAS's (the default) and numpy's."""
    monkeypatch.setattr(host_blas, "_NUMPY_PRODUCTS", request.param == "numpy")
    return request.param


def test_products_go_to_numpy_when_asked(monkeypatch):
    monkeypatch.setattr(host_blas, "_NUMPY_PRODUCTS", False)
    assert host_blas.products_library() is host_blas._blas()
    check = "from whisper_mlx.backends.numpy_backend import blas; assert blas.products_library() is None"
    env = {**os.environ, "WHISPER_MLX_PRODUCTS": "numpy"}
    assert subprocess.run([sys.executable, "-c", check], env=env).returncode == 0


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 300])
def test_blas_matmul_equals_numpy(rows, products_from):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96), dtype=np.float32)
    weight = rng.standard_normal((130, 96), dtype=np.float32)
    for b in (weight.T, np.ascontiguousarray(weight.T), weight.T[:, ::2]):  # a view, contiguous, strided
        np.testing.assert_allclose(host_blas.matmul(x, b), x.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        host_blas.matmul(x[:, :50], weight[:, :50].T), x[:, :50] @ weight[:, :50].T, rtol=1e-4, atol=1e-4
    )  # row strides longer than the rows
    with pytest.raises(ValueError):  # mismatched inner dimensions never reach the BLAS
        host_blas.matmul(x, weight)
    out = np.full((rows, 130), np.nan, np.float32)
    assert host_blas.matmul(x, weight.T, out=out) is out
    np.testing.assert_array_equal(out, host_blas.matmul(x, weight.T))
    strided_out = np.zeros((rows, 260), np.float32)[:, ::2]  # not a layout the BLAS writes: numpy does
    host_blas.matmul(x, weight.T, out=strided_out)
    np.testing.assert_allclose(strided_out, out, rtol=1e-5, atol=1e-5)


def test_vector_exp_equals_numpy_exp():
    x = np.concatenate([[-np.inf, 0.0, -0.0], np.linspace(-110, 88, 100_001)]).astype(np.float32).reshape(4, -1)
    exact = np.exp(x.astype(np.float64))
    out = np.empty_like(x)
    host_blas.exp_into(x, out)
    normal = exact > np.finfo(np.float32).tiny
    np.testing.assert_allclose(out[normal], exact[normal], rtol=2e-7)
    assert (out[~normal] < 2 * np.finfo(np.float32).tiny).all()  # flushed or tiny, never garbage
    assert out[0, 0] == 0 and out[0, 1] == out[0, 2] == 1  # exp(-inf): a masked score
    in_place = x.copy()
    host_blas.exp_into(in_place, in_place)
    np.testing.assert_array_equal(in_place, out)
    strided = x[:, ::2]  # numpy's exp serves what MKL cannot read in place
    strided_out = np.empty(strided.shape, np.float32)
    host_blas.exp_into(strided, strided_out)
    np.testing.assert_allclose(strided_out, np.exp(strided), rtol=3e-7)


@pytest.mark.skipif(not host_blas.has_exp(), reason="needs MKL preloaded")
def test_cpu_kernel_workers_hold_mkl_to_one_thread():
    """The workers share the cores out: MKL called from one of them must not start threads of its own."""
    import ctypes

    lib = host_blas._blas()
    lib.MKL_Get_Max_Threads.restype = ctypes.c_int
    seen = []
    schedule.run_blocks([lambda: seen.append(lib.MKL_Get_Max_Threads()) for _ in range(8)])
    assert seen == [1] * 8


needs_packing = pytest.mark.skipif(
    not hasattr(host_blas._blas(), "cblas_sgemm_pack"), reason="needs MKL's packed products"
)


@pytest.fixture
def mkl_products(monkeypatch):
    monkeypatch.setattr(host_blas, "_NUMPY_PRODUCTS", False)


@pytest.fixture
def without_panels(monkeypatch):
    """The BLAS paths the decoder takes where the panel kernel was not built (its decoders made after)."""
    monkeypatch.setattr(host_panels, "_library", [None])


@needs_packing
@pytest.mark.parametrize("rows", [1, 2, 6, 13])
def test_packed_operand_equals_the_plain_product(rows, mkl_products):
    rng = np.random.default_rng(rows)
    b = rng.standard_normal((96, 1000), dtype=np.float32)
    x = rng.standard_normal((rows, 96), dtype=np.float32)
    packed = host_blas.PackedOperand(b)
    got = packed.matmul(x)
    np.testing.assert_allclose(got, x.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    if rows > 1:  # the packed and plain MKL kernels agree bit for bit
        np.testing.assert_array_equal(got, host_blas.matmul(x, b))
    assert packed.matmul(x[:0]).shape == (0, 1000)
    with pytest.raises(ValueError):
        packed.matmul(x[:, :50])
    with pytest.raises(ValueError):  # only contiguous matrices are packed
        host_blas.PackedOperand(b[:, ::2])


@needs_packing
def test_logits_of_several_rows_read_the_packed_embedding(tiny_en, monkeypatch, mkl_products, without_panels):
    host = host_decoder_for(tiny_en)
    hidden = np.random.default_rng(0).standard_normal((4, 384), dtype=np.float32)
    plain = host_blas.matmul(hidden, host.embedding_t)
    np.testing.assert_array_equal(host.logits(hidden), plain)
    blocks = host.packed_blocks  # made on first use with several rows, one per worker, covering the vocabulary
    assert len(blocks) == schedule.worker_count() and blocks[0][0].start == 0
    assert all(a[0].stop == b[0].start for a, b in itertools.pairwise(blocks)) and blocks[-1][0].stop == 51864
    np.testing.assert_array_equal(host.logits(hidden[:1]), host_blas.matmul(hidden[:1], host.embedding_t))
    monkeypatch.setattr(host_blas.PackedOperand, "available", classmethod(lambda cls: False))  # e.g. OpenBLAS
    np.testing.assert_array_equal(host.logits(hidden), plain)


@pytest.mark.parametrize("rows", [host_model.OPENBLAS_LOGITS_MIN_ROWS, 60])
def test_logits_of_many_rows_are_numpys_product_in_column_blocks(tiny_en, products_from, rows, without_panels):
    """Beams' logits: each worker's block of vocabulary columns is numpy's product of that block on one
    BLAS thread, whichever library serves the other products. (Not always the bits of numpy's one
    product of all columns: OpenBLAS's kernels for some CPUs round a column by where it falls.)"""
    host = host_decoder_for(tiny_en)
    hidden = np.random.default_rng(rows).standard_normal((rows, 384), dtype=np.float32)
    logits = host.logits(hidden)
    assert len(host.column_blocks) == schedule.worker_count()
    with schedule.one_blas_thread():
        for columns in host.column_blocks:
            np.testing.assert_array_equal(logits[:, columns], hidden @ host.embedding_t[:, columns])
    exact = hidden.astype(np.float64) @ host.embedding_t.astype(np.float64)
    np.testing.assert_allclose(logits, exact, rtol=1e-5, atol=1e-5)


@needs_packing
def test_a_packed_product_writes_into_a_block_of_columns(mkl_products):
    rng = np.random.default_rng(5)
    b = rng.standard_normal((96, 300), dtype=np.float32)
    x = rng.standard_normal((6, 96), dtype=np.float32)
    out = np.full((6, 1000), np.nan, np.float32)
    host_blas.PackedOperand(b).matmul(x, out[:, 200:500])
    np.testing.assert_array_equal(out[:, 200:500], host_blas.matmul(x, b))
    assert np.isnan(out[:, :200]).all() and np.isnan(out[:, 500:]).all()  # nothing written beside the block
    with pytest.raises(ValueError, match="cannot write"):
        host_blas.PackedOperand(b).matmul(x, out[:, :299])


def test_windows_encoded_whole_per_thread_give_the_encoders_bits(small_model, monkeypatch):
    encoder = host_encoder_for(small_model)
    mels = np.random.default_rng(3).standard_normal((3, 3000, 80), dtype=np.float32)
    threads = []
    encode_one = HostEncoder.__call__

    def spied(self, mel):
        threads.append(threading.current_thread().name)
        return encode_one(self, mel)

    monkeypatch.setattr(HostEncoder, "__call__", spied)
    together = encoder.encode_windows(mels)
    assert len(threads) == 3
    if schedule.worker_count() > 1 and schedule._blas_limiter() is not None:
        assert all(name.startswith("whisper-mlx-cpu") for name in threads[:2])  # whole windows on the workers
    monkeypatch.undo()
    for i in range(3):
        np.testing.assert_array_equal(together[i], encoder(mels[i : i + 1])[0])
