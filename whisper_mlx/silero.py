"""Silero VAD (MIT, Silero Team; see assets/silero_vad_LICENSE.txt) run in numpy from its published weights:
the speech probability of every 32 ms of a 16 kHz waveform, the signal faster-whisper, WhisperX and
whisper.cpp cut audio with. No onnxruntime and no torch.

The network, per chunk of 512 samples seen with the 64 samples before it: a 256-point STFT (a fixed
convolution, hop 128) to magnitudes, four convolutions with ReLU, one LSTM cell whose state runs from
chunk to chunk, and a sigmoid. Only the LSTM is sequential, so the rest runs on whole pieces at once.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
CHUNK = 512  # samples scored at once (32 ms)
CONTEXT = 64  # samples of the previous chunk each chunk is seen with
HIDDEN = 128  # LSTM state size
# chunks scored per call, counted from the stream's start: however the waveform is fed, every product
# has the same rows (some BLAS kernels round a row by where it falls in the product)
GROUP = 128
WEIGHTS = Path(__file__).parent / "assets" / "silero_vad_16k.npz"
_STFT_HOP, _STFT_SIZE, _BINS = 128, 256, 129
# the input gate, forget gate and output gate are sigmoids, the cell candidate a tanh (PyTorch's order)
_SIGMOID_GATES = np.r_[np.ones(2 * HIDDEN), np.zeros(HIDDEN), np.ones(HIDDEN)].astype(bool)


@functools.lru_cache(maxsize=1)
def model_weights() -> dict[str, np.ndarray]:
    """The weights, laid out for the products below (loaded once per process)."""
    with np.load(WEIGHTS) as raw:
        w = {key: raw[key].astype(np.float32) for key in raw.files if key != "source"}
    # sigmoid(x) = 0.5 * tanh(x / 2) + 0.5: the gates' rows halved, so one tanh serves every gate
    half = np.where(_SIGMOID_GATES, 0.5, 1.0).astype(np.float32)
    weights = {
        "stft": np.ascontiguousarray(w["stft"][:, 0, :].T),  # (256, 258): real parts, then imaginary
        "gates_in": np.ascontiguousarray(w["lstm.weight_ih"].T * half),
        "gates_bias": (w["lstm.bias_ih"] + w["lstm.bias_hh"]) * half,
        "gates_hidden": np.ascontiguousarray(w["lstm.weight_hh"].T * half),
        "out_weight": np.ascontiguousarray(w["out.weight"][0, :, 0]),
        "out_bias": w["out.bias"],
    }
    for i in range(4):  # (C_in, 3 * C_out): the three taps' products from one matrix product
        kernel = w[f"conv{i}.weight"]
        weights[f"conv{i}"] = np.ascontiguousarray(kernel.transpose(1, 2, 0).reshape(kernel.shape[1], -1))
        weights[f"conv{i}_bias"] = w[f"conv{i}.bias"]
    return weights


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's handle on the loaded BLAS libraries (None without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


def one_blas_thread():
    """The network's products are small: BLAS threads only wait on each other, and on a busy machine
    they wait for cores."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1)


def conv_relu(x: np.ndarray, taps: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """ReLU(conv1d(x)) with kernel 3 and padding 1 over the frames of x (n, frames, channels)."""
    n, frames, channels = x.shape
    products = (x.reshape(n * frames, channels) @ taps).reshape(n, frames, 3, -1)
    out_frames = (frames - 1) // stride + 1
    out = np.empty((n, out_frames, products.shape[-1]), np.float32)
    out[:] = bias
    for tap in range(3):
        source = np.arange(out_frames) * stride + tap - 1
        inside = (source >= 0) & (source < frames)
        out[:, inside] += products[:, source[inside], tap]
    return np.maximum(out, 0, out=out)


def input_gates(windows: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The LSTM's input-side gate values (n, 4 * HIDDEN) of n windows of CONTEXT + CHUNK samples."""
    n = windows.shape[0]
    padded = np.concatenate([windows, windows[:, -2 : -CONTEXT - 2 : -1]], axis=1)  # reflect, as the model pads
    frames = np.stack([padded[:, i : i + _STFT_SIZE] for i in range(0, CHUNK, _STFT_HOP)], axis=1)
    spectrum = frames.reshape(-1, _STFT_SIZE) @ w["stft"]
    x = np.sqrt(spectrum[:, :_BINS] ** 2 + spectrum[:, _BINS:] ** 2).reshape(n, -1, _BINS)
    for i, stride in enumerate((1, 2, 2, 1)):
        x = conv_relu(x, w[f"conv{i}"], w[f"conv{i}_bias"], stride)
    return x[:, 0] @ w["gates_in"] + w["gates_bias"]


class SileroStream:
    """Speech probabilities of a waveform fed in pieces of any length: one per CHUNK samples, the
    same as running the model chunk after chunk over the whole waveform."""

    def __init__(self) -> None:
        self.weights = model_weights()
        self.pending = np.zeros(0, np.float32)  # samples of an incomplete chunk
        self.context = np.zeros(CONTEXT, np.float32)
        self.hidden = np.zeros(HIDDEN, np.float32)
        self.cell = np.zeros(HIDDEN, np.float32)
        self.parts: list[np.ndarray] = []
        self.n_samples = 0

    def feed(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        self.n_samples += samples.size
        pending = np.concatenate([self.pending, samples])
        size = GROUP * CHUNK
        whole = pending.size // size * size
        if whole:
            with one_blas_thread():
                self.parts += [self.score(pending[start : start + size]) for start in range(0, whole, size)]
        self.pending = pending[whole:]

    def finish(self) -> np.ndarray:
        """The probabilities of every chunk fed (the last one padded with zeros)."""
        if self.pending.size:
            padded = np.pad(self.pending, (0, -self.pending.size % CHUNK))
            with one_blas_thread():
                self.parts.append(self.score(padded))
            self.pending = np.zeros(0, np.float32)
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)

    def score(self, samples: np.ndarray) -> np.ndarray:
        chunks = samples.reshape(-1, CHUNK)
        before = np.concatenate([self.context[None], chunks[:-1, -CONTEXT:]])
        self.context = chunks[-1, -CONTEXT:].copy()
        gates = input_gates(np.concatenate([before, chunks], axis=1), self.weights)
        hidden = self.recur(gates)
        return 1 / (1 + np.exp(-(hidden @ self.weights["out_weight"] + self.weights["out_bias"])))

    def recur(self, gates: np.ndarray) -> np.ndarray:
        """Run the LSTM cell over the chunks; returns ReLU of each chunk's hidden state (n, HIDDEN)."""
        w_hidden, out = self.weights["gates_hidden"], np.empty((gates.shape[0], HIDDEN), np.float32)
        scale = np.where(_SIGMOID_GATES, 0.5, 1.0).astype(np.float32)
        shift = np.where(_SIGMOID_GATES, 0.5, 0.0).astype(np.float32)
        g, h, c, t = np.empty(4 * HIDDEN, np.float32), self.hidden, self.cell, np.empty(HIDDEN, np.float32)
        g_in, g_forget, g_cell, g_out = g[:HIDDEN], g[HIDDEN : 2 * HIDDEN], g[2 * HIDDEN : 3 * HIDDEN], g[3 * HIDDEN :]
        for i in range(gates.shape[0]):
            np.dot(h, w_hidden, out=g)
            g += gates[i]
            np.tanh(g, out=g)
            g *= scale  # the sigmoid gates from their tanh
            g += shift
            c *= g_forget
            np.multiply(g_in, g_cell, out=t)
            c += t
            np.tanh(c, out=t)
            np.multiply(g_out, t, out=h)
            out[i] = h
        return np.maximum(out, 0, out=out)


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """One speech probability per CHUNK samples of a 16 kHz waveform."""
    stream = SileroStream()
    stream.feed(audio)
    return stream.finish()
