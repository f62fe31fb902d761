"""Audio loading (PyAV, ffmpeg CLI as fallback) and the log-mel spectrogram Whisper consumes."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds of audio in one model window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's second conv has stride 2
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50 audio tokens per second (20 ms each)

AudioInput = Union[str, os.PathLike, np.ndarray, "mx.array"]  # noqa: F821


def _decode_with_pyav(path: str, sr: int, chunk_samples: int) -> Iterator[np.ndarray]:
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise _PyAVCannotOpen(str(exc)) from exc
    with container:
        if not container.streams.audio:
            raise AudioError(f"{path}: the file has no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        pending: list[np.ndarray] = []
        pending_len = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pending.append(out.to_ndarray().reshape(-1))
                    pending_len += pending[-1].size
                while pending_len >= chunk_samples:
                    block = np.concatenate(pending)
                    yield block[:chunk_samples]
                    pending, pending_len = [block[chunk_samples:]], block.size - chunk_samples
            for out in resampler.resample(None):
                pending.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise AudioError(f"{path}: audio stream is corrupt or truncated ({exc})") from exc
        if pending:
            yield np.concatenate(pending)


class _PyAVCannotOpen(Exception):
    pass


def _decode_with_ffmpeg_cli(path: str, sr: int) -> np.ndarray:
    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("ffmpeg")
    cmd = ["ffmpeg", "-nostdin", "-threads", "0", "-i", path, "-f", "s16le", "-ac", "1",
           "-acodec", "pcm_s16le", "-ar", str(sr), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise AudioError(f"{path}: ffmpeg cannot decode it: {proc.stderr.decode(errors='replace')[-300:]}")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


def _check_audio_path(file: str | os.PathLike) -> str:
    path = Path(file)
    if not path.exists():
        raise AudioError(f"{file}: no such audio file")
    if path.is_dir():
        raise AudioError(f"{file}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{file}: the file is empty")
    return str(path)


def iter_audio(file: str | os.PathLike, sr: int = SAMPLE_RATE, chunk_seconds: float = 60.0) -> Iterator[np.ndarray]:
    """Decode a file to mono float32 at `sr`, yielding pieces of `chunk_seconds` (the last may be shorter)."""
    path = _check_audio_path(file)
    chunk_samples = int(chunk_seconds * sr)
    try:
        yield from _decode_with_pyav(path, sr, chunk_samples)
        return
    except _PyAVCannotOpen as exc:
        pyav_error = exc
    try:
        audio = _decode_with_ffmpeg_cli(path, sr)
    except FileNotFoundError:
        raise AudioError(f"{file}: not a readable audio file ({pyav_error})") from None
    for start in range(0, audio.size, chunk_samples):
        yield audio[start : start + chunk_samples]


def load_audio(file: str | os.PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a whole file to a mono float32 waveform in [-1, 1] at `sr` Hz."""
    pieces = list(iter_audio(file, sr))
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if audio.size == 0:
        raise AudioError(f"{file}: contains no audio samples")
    return audio.astype(np.float32, copy=False)


def validate_waveform(audio) -> np.ndarray:
    """A 1-D finite float32 numpy waveform from a numpy or mlx array, or a clear AudioError."""
    array = np.asarray(audio) if not isinstance(audio, np.ndarray) else audio
    if array.dtype.kind != "f":
        raise AudioError(
            f"audio array must be floating point in [-1, 1], got dtype {array.dtype}"
            + (" (divide int16 PCM by 32768)" if array.dtype.kind in "iu" else "")
        )
    if array.ndim != 1:
        raise AudioError(f"audio array must be 1-D mono samples at {SAMPLE_RATE} Hz, got shape {array.shape}")
    if array.size == 0:
        raise AudioError("audio array is empty")
    if not np.all(np.isfinite(array)):
        raise AudioError("audio array contains NaN or infinite samples")
    return array.astype(np.float32, copy=False)


def pad_or_trim(array, length: int = N_SAMPLES, *, axis: int = -1):
    """Pad with zeros or trim along `axis` to `length` (works on numpy and mlx arrays)."""
    import mlx.core as mx

    xp = mx if isinstance(array, mx.array) else np
    size = array.shape[axis]
    if size > length:
        index = [slice(None)] * array.ndim
        index[axis] = slice(0, length)
        return array[tuple(index)]
    if size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        return xp.pad(array, widths)
    return array


@lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """The (n_mels, N_FFT // 2 + 1) mel filterbank openai ships (librosa's, precomputed)."""
    if n_mels not in (80, 128):
        raise ValueError(f"Unsupported n_mels: {n_mels}")
    with np.load(Path(__file__).parent / "assets" / "mel_filters.npz") as f:
        return f[f"mel_{n_mels}"].astype(np.float32)


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def log_mel_power(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """log10 mel power, (n_frames, n_mels), before Whisper's dynamic-range clamp.

    Matches torch.stft(center=True, reflect padding), dropping the last frame as openai does.
    """
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    n_frames = 1 + (padded.size - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0])
    )
    spectrum = np.fft.rfft(frames * _hann_window(), axis=-1)[:-1]
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return np.log10(np.maximum(power @ mel_filters(n_mels).T, 1e-10))


def normalize_log_mel(log_spec: np.ndarray, global_max: float | None = None) -> np.ndarray:
    """Whisper's clamp to 8 (log10 units) below the peak, then scaling to roughly [-1, 1]."""
    peak = log_spec.max() if global_max is None else global_max
    return (np.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


def to_waveform(audio: AudioInput) -> np.ndarray:
    if isinstance(audio, (str, os.PathLike)):
        return load_audio(audio)
    return validate_waveform(audio)


def log_mel_spectrogram(audio: AudioInput, n_mels: int = 80, padding: int = 0):
    """Log-mel spectrogram as an mlx array of shape (n_frames, n_mels), as mlx-whisper returns it.

    audio: a path, or a 1-D float waveform at 16 kHz (numpy or mlx). padding: zero samples appended.
    """
    import mlx.core as mx

    waveform = to_waveform(audio)
    if padding > 0:
        waveform = np.pad(waveform, (0, padding))
    return mx.array(normalize_log_mel(log_mel_power(waveform, n_mels)))
