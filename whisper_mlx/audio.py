"""Audio loading (PyAV, ffmpeg CLI as fallback) and the log-mel spectrogram Whisper consumes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .errors import AudioError, AudioTruncatedWarning

if TYPE_CHECKING:
    import mlx.core as mx

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds of audio in one model window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's second conv has stride 2
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50 audio tokens per second (20 ms each)

AudioInput = Union[str, os.PathLike, np.ndarray, "mx.array"]


def _decode_with_pyav(path: str, sr: int, chunk_samples: int) -> Iterator[np.ndarray]:
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise _PyAVCannotOpen(_ffmpeg_reason(exc)) from exc
    with container:
        if not container.streams.audio:
            raise AudioError(f"{path}: the file has no audio stream")
        decoded = 0
        for block in _rechunk(_resampled_frames(container, path, sr), chunk_samples):
            decoded += block.size
            yield block
        _warn_if_truncated(path, container.duration, decoded / sr)


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's reason without the errno number and the repeated file name."""
    return getattr(exc, "strerror", None) or str(exc)


def _resampled_frames(container, path: str, sr: int) -> Iterator[np.ndarray]:
    """The first audio stream decoded and resampled to mono float32 at `sr`, one array per frame."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
    try:
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                yield out.to_ndarray().reshape(-1)
        for out in resampler.resample(None):
            yield out.to_ndarray().reshape(-1)
    except av.error.FFmpegError as exc:
        raise AudioError(f"{path}: audio stream is corrupt or truncated ({_ffmpeg_reason(exc)})") from exc


def _rechunk(arrays: Iterator[np.ndarray], chunk_samples: int) -> Iterator[np.ndarray]:
    """Regroup 1-D arrays into pieces of exactly chunk_samples (the last one shorter, never empty)."""
    pending: list[np.ndarray] = []
    pending_len = 0
    for array in arrays:
        pending.append(array)
        pending_len += array.size
        while pending_len >= chunk_samples:
            block = np.concatenate(pending)
            yield block[:chunk_samples]
            pending, pending_len = [block[chunk_samples:]], block.size - chunk_samples
    if pending_len:
        yield np.concatenate(pending)


def _warn_if_truncated(path: str, declared_us: int | None, decoded_seconds: float) -> None:
    """Warn when far less audio decoded than the container declares (e.g. a cut MP3 with a Xing header)."""
    if not declared_us:
        return
    declared = declared_us / 1_000_000
    if decoded_seconds < 0.9 * declared and declared - decoded_seconds > 1.0:
        warnings.warn(
            AudioTruncatedWarning(
                f"{path}: decoded only {decoded_seconds:.1f} s of the {declared:.1f} s the file declares; "
                "it is probably truncated (transcribing what could be decoded)"
            ),
            stacklevel=3,
        )


class _PyAVCannotOpen(Exception):
    pass


def _decode_with_ffmpeg_cli(path: str, sr: int) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg")
    # -hide_banner -loglevel error: stderr holds only the errors, not the version and library lines
    cmd = [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-threads",
        "0",
        "-i",
        path,
        "-f",
        "s16le",
        "-ac",
        "1",
        "-acodec",
        "pcm_s16le",
        "-ar",
        str(sr),
        "-",
    ]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise AudioError(f"{path}: not a readable audio file ({_ffmpeg_cli_reason(proc.stderr, path)})")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


_FFMPEG_BANNER_LINE = re.compile(r"^(ffmpeg version |\s)")  # the version line and its indented library lines
_FFMPEG_COMPONENT_TAG = re.compile(r"^\[[^\]]* @ (0x)?[0-9a-fA-F]+\]\s*")  # "[mp3 @ 0x55d0...] "
_FFMPEG_REASON_LINES = 2
_FFMPEG_REASON_CHARS = 200


def _ffmpeg_cli_reason(stderr: bytes, path: str) -> str:
    """The last error lines of ffmpeg's stderr as one short line, without banner, tags or file name."""
    by_cause: dict[str, str] = {}  # keyed by the final clause: ffmpeg 6.1+ states the same cause twice
    for line in stderr.decode(errors="replace").splitlines():
        message = _ffmpeg_error_line(line, path)
        if message:
            by_cause.setdefault(message.rsplit(": ", 1)[-1], message)
    reason = "; ".join(list(by_cause.values())[-_FFMPEG_REASON_LINES:]) or "ffmpeg cannot decode it"
    return reason if len(reason) <= _FFMPEG_REASON_CHARS else reason[: _FFMPEG_REASON_CHARS - 3] + "..."


def _ffmpeg_error_line(line: str, path: str) -> str:
    """One stderr line reduced to its message; empty for banner lines and lines that only repeat the path."""
    if not line.strip() or _FFMPEG_BANNER_LINE.match(line):
        return ""
    line = _FFMPEG_COMPONENT_TAG.sub("", line).strip().rstrip(".")
    if line.startswith(f"{path}: "):
        return line[len(path) + 2 :]
    return "" if path in line else line  # e.g. "Error opening input file PATH" adds nothing to the message


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


@cache
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


def normalize_log_mel_inplace(log_spec: np.ndarray, peak: float | None = None) -> np.ndarray:
    """normalize_log_mel without a second full-size array (log_spec is overwritten and returned)."""
    if log_spec.size:
        np.maximum(log_spec, (log_spec.max() if peak is None else np.float32(peak)) - 8.0, out=log_spec)
        log_spec += 4.0
        log_spec /= 4.0
    return log_spec


# ---- streamed log-mel: a long file is never held as one waveform ----

_EDGE = N_FFT // 2  # reflect padding on each side (torch.stft(center=True))
_STREAM_PIECE_SECONDS = 30.0
_MAX_PREALLOCATED_US = 12 * 3600 * 1_000_000  # a header claiming more is not trusted (the buffer grows)


class _FrameStore:
    """A growable (frames, n_mels) float32 array, preallocated from the expected frame count."""

    def __init__(self, n_mels: int, capacity: int):
        self.data = np.empty((max(capacity, 1), n_mels), np.float32)
        self.size = 0

    def append(self, rows: np.ndarray) -> None:
        needed = self.size + rows.shape[0]
        if needed > self.data.shape[0]:  # the duration estimate was short: grow (rare)
            grown = np.empty((max(needed, self.data.shape[0] * 5 // 4), self.data.shape[1]), np.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : needed] = rows
        self.size = needed


class _FileFrameStore:
    """Frames appended to an anonymous temporary file, so a long input's mel is not held in memory."""

    def __init__(self, n_mels: int, capacity: int = 0):
        self.file = tempfile.TemporaryFile(prefix="whisper_mlx-mel-")  # noqa: SIM115 - lives as long as the object
        self.n_mels = n_mels
        self.size = 0

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, np.float32).tobytes())
        self.size += rows.shape[0]


class MelFrames:
    """The normalised log-mel of one input, read window by window.

    Holds the log10 mel power (in memory, or in a temporary file for long inputs) and its peak; the
    clamp to 8 below the peak and the scaling are applied on read, so `read` returns exactly what
    `log_mel_array` would hold for those frames.
    """

    def __init__(self, raw, n_frames: int, n_mels: int):
        self.raw = raw  # np.ndarray (n_frames, n_mels), or a _FileFrameStore
        self.n_frames = n_frames
        self.n_mels = n_mels
        self.peak = max((float(block.max()) for block in self._blocks(0, n_frames) if block.size), default=0.0)

    def _raw(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(self.n_frames, stop)
        if stop <= start:
            return np.zeros((0, self.n_mels), np.float32)
        if isinstance(self.raw, np.ndarray):
            return self.raw[start:stop]
        row = 4 * self.n_mels
        data = os.pread(self.raw.file.fileno(), (stop - start) * row, start * row)
        return np.frombuffer(data, np.float32).reshape(stop - start, self.n_mels)

    def _blocks(self, start: int, stop: int, frames: int = 60 * FRAMES_PER_SECOND):
        for first in range(start, stop, frames):
            yield self._raw(first, min(stop, first + frames))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Normalised frames [start, stop) as a new (frames, n_mels) float32 array."""
        block = np.array(self._raw(start, stop), np.float32)
        return normalize_log_mel_inplace(block, self.peak)

    def frame_means(self, stop: int | None = None) -> np.ndarray:
        """Mean normalised log-mel of each frame up to `stop` (the VAD's energy), read in blocks."""
        stop = self.n_frames if stop is None else stop
        parts = [normalize_log_mel_inplace(np.array(b), self.peak).mean(axis=-1) for b in self._blocks(0, stop)]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


class LogMelStream:
    """log10 mel power computed piece by piece, identical to `log_mel_power` on the whole waveform.

    Frame i covers padded samples [HOP_LENGTH * i, HOP_LENGTH * i + N_FFT), where the padded
    signal is the audio with N_FFT // 2 samples of reflect padding at both ends. Only the samples
    of frames not yet computed (under N_FFT) and the last N_FFT // 2 + 1 samples are kept.
    """

    def __init__(self, n_mels: int, expected_samples: int = 0, store=None):
        self.n_mels = n_mels
        # a _FrameStore, or the store given (a _FileFrameStore: append only, no .data)
        self.frames: Any = store or _FrameStore(n_mels, expected_samples // HOP_LENGTH + 1)
        self.pending = np.zeros(0, np.float32)  # padded samples from the next frame's start on
        self.tail = np.zeros(0, np.float32)  # the last _EDGE + 1 audio samples, for the end padding
        self.n_samples = 0
        self.started = False  # the start padding needs the first _EDGE + 1 samples

    def feed(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        if samples.size == 0:
            return
        self.n_samples += samples.size
        self.tail = np.concatenate([self.tail, samples[-(_EDGE + 1) :]])[-(_EDGE + 1) :]
        self.pending = np.concatenate([self.pending, samples])
        if not self.started:
            if self.pending.size <= _EDGE:
                return
            self.pending = np.concatenate([self.pending[_EDGE:0:-1], self.pending])
            self.started = True
        self._compute_complete_frames()

    def _compute_complete_frames(self) -> None:
        if self.pending.size < N_FFT:
            return
        n_frames = 1 + (self.pending.size - N_FFT) // HOP_LENGTH
        self.frames.append(_log_mel_frames(self.pending, n_frames, self.n_mels))
        self.pending = self.pending[n_frames * HOP_LENGTH :].copy()

    def finish(self) -> np.ndarray:
        """The (n_samples // HOP_LENGTH, n_mels) log10 mel power (openai drops the last frame)."""
        if not self.started:  # shorter than the padding: the whole-array computation is exact
            return log_mel_power(self.pending, self.n_mels) if self.pending.size else self._empty()
        self.finish_frames()
        return self.frames.data[: self.n_samples // HOP_LENGTH]

    def finish_frames(self) -> int:
        """Compute the frames that need the end padding; returns the number of frames of the input."""
        if self.started:
            self.pending = np.concatenate([self.pending, self.tail[-2::-1]])
            self._compute_complete_frames()
        return self.n_samples // HOP_LENGTH

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.n_mels), np.float32)


def _log_mel_frames(padded: np.ndarray, n_frames: int, n_mels: int) -> np.ndarray:
    """log10 mel power of the first n_frames STFT frames of an (already padded) signal."""
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0])
    )
    spectrum = np.fft.rfft(frames * _hann_window(), axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return np.log10(np.maximum(power @ mel_filters(n_mels).T, 1e-10))


def _expected_samples(path: str, sr: int) -> int:
    """The container's duration in samples at `sr` (0 when unknown); only sizes a buffer."""
    try:
        import av

        with av.open(path) as container:
            duration = container.duration  # in av.time_base units (microseconds)
    except Exception:  # an estimate only; decoding reports real errors
        return 0
    if not duration or duration < 0:
        return 0
    return int(min(duration, _MAX_PREALLOCATED_US) * sr / 1_000_000) + sr


def _waveform_pieces(waveform: np.ndarray, piece: int) -> Iterator[np.ndarray]:
    for start in range(0, waveform.size, piece):
        yield waveform[start : start + piece]


def log_mel_array(audio: AudioInput, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """The normalised log-mel as a float32 numpy array (n_frames, n_mels), computed in pieces.

    A path is decoded piece by piece, so the whole waveform is never in memory: only the result
    (4 * n_mels bytes per 10 ms) is. `padding` zero samples are appended (transcribe uses N_SAMPLES).
    """
    return normalize_log_mel_inplace(_feed_stream(audio, n_mels, padding).finish())


def _feed_stream(audio: AudioInput, n_mels: int, padding: int, store_factory=None, on_samples=None) -> LogMelStream:
    """A LogMelStream fed with all of the input (decoded piece by piece) and `padding` zero samples;
    on_samples, if given, sees every piece of the input too (the VAD reads the waveform in the same pass)."""
    piece = int(_STREAM_PIECE_SECONDS * SAMPLE_RATE)
    if isinstance(audio, (str, os.PathLike)):
        path = _check_audio_path(audio)
        pieces = iter_audio(path, SAMPLE_RATE, _STREAM_PIECE_SECONDS)
        expected = _expected_samples(path, SAMPLE_RATE) + padding
    else:
        waveform = validate_waveform(audio)
        pieces = _waveform_pieces(waveform, piece)
        expected = waveform.size + padding
    store = store_factory(n_mels) if store_factory else None
    stream = LogMelStream(n_mels, expected, store)
    for samples in pieces:
        stream.feed(samples)
        if on_samples is not None:
            on_samples(samples)
    if stream.n_samples == 0:
        raise AudioError(f"{audio}: contains no audio samples")
    for start in range(0, max(padding, 0), piece):
        stream.feed(np.zeros(min(piece, padding - start), np.float32))
    return stream


def log_mel_frames(audio: AudioInput, n_mels: int = 80, padding: int = 0, on_samples=None) -> MelFrames:
    """The log-mel of a path or waveform as MelFrames: a path's frames go to a temporary file, so
    neither its waveform nor its mel is ever whole in memory (bounded memory for hours of audio).
    on_samples(piece) is called with each piece of the input's samples (not the padding)."""
    on_disk = isinstance(audio, (str, os.PathLike))
    stream = _feed_stream(audio, n_mels, padding, _FileFrameStore if on_disk else None, on_samples)
    if not stream.started:  # shorter than the STFT padding: computed whole, in memory
        raw = stream.finish()
        return MelFrames(raw, raw.shape[0], n_mels)
    n_frames = stream.finish_frames()
    if on_disk:
        stream.frames.file.flush()  # frames are read back with pread
    raw = stream.frames if on_disk else stream.frames.data[:n_frames]
    return MelFrames(raw, n_frames, n_mels)


def log_mel_spectrogram(audio: AudioInput, n_mels: int = 80, padding: int = 0):
    """Log-mel spectrogram as an mlx array of shape (n_frames, n_mels), as mlx-whisper returns it.

    audio: a path, or a 1-D float waveform at 16 kHz (numpy or mlx). padding: zero samples appended.
    A path is decoded and transformed in pieces (see log_mel_array).
    """
    import mlx.core as mx

    return mx.array(log_mel_array(audio, n_mels, padding))
