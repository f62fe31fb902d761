"""Audio decoding and the streamed log-mel: identical to the whole-waveform computation, bounded memory."""

import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from whisper_mlx import audio as audio_module
from whisper_mlx.audio import (
    HOP_LENGTH,
    N_SAMPLES,
    SAMPLE_RATE,
    LogMelStream,
    iter_audio,
    load_audio,
    log_mel_array,
    log_mel_power,
    log_mel_spectrogram,
    normalize_log_mel,
)
from whisper_mlx.errors import AudioError, AudioTruncatedWarning

DATA = Path(__file__).parent / "data"
FILES = ["jfk", "ls_test", "french_tts", "alice_ch1"]  # all but alice are shorter than one 30-s piece


def whole_waveform_log_mel(waveform: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """The reference: pad the whole waveform, then one STFT over all of it (the non-streamed path)."""
    if padding:
        waveform = np.pad(waveform, (0, padding))
    return normalize_log_mel(log_mel_power(waveform, n_mels))


@pytest.fixture(scope="module")
def waveforms():
    return {name: load_audio(DATA / f"{name}.flac") for name in FILES}


@pytest.mark.parametrize("padding", [0, N_SAMPLES], ids=["no-padding", "30s-padding"])
@pytest.mark.parametrize("name", FILES)
def test_streamed_path_matches_whole_waveform(name, padding, waveforms):
    streamed = log_mel_array(DATA / f"{name}.flac", 80, padding)
    expected = whole_waveform_log_mel(waveforms[name], 80, padding)
    assert streamed.shape == expected.shape == ((waveforms[name].size + padding) // HOP_LENGTH, 80)
    assert streamed.dtype == np.float32
    np.testing.assert_allclose(streamed, expected, atol=1e-5, rtol=0)


def test_log_mel_spectrogram_is_the_streamed_array_as_mlx(waveforms):
    import mlx.core as mx

    mel = log_mel_spectrogram(str(DATA / "jfk.flac"), padding=N_SAMPLES)
    assert isinstance(mel, mx.array) and mel.dtype == mx.float32
    np.testing.assert_allclose(np.array(mel), whole_waveform_log_mel(waveforms["jfk"], 80, N_SAMPLES), atol=1e-5)


def test_128_mel_bins(waveforms):
    streamed = log_mel_array(DATA / "ls_test.flac", 128, N_SAMPLES)
    np.testing.assert_allclose(streamed, whole_waveform_log_mel(waveforms["ls_test"], 128, N_SAMPLES), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_into_pieces_gives_the_same_frames(seed, waveforms):
    """Pieces of random sizes, including ones shorter than the reflect padding and than one hop."""
    waveform = waveforms["jfk"][: 3 * SAMPLE_RATE]
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, waveform.size), size=40, replace=False))
    cuts = np.concatenate([[1, 7, 150, 199, 203], cuts[cuts > 203]])
    stream = LogMelStream(80)
    for piece in np.split(waveform, cuts):
        stream.feed(piece)
    np.testing.assert_allclose(stream.finish(), log_mel_power(waveform, 80), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_samples", [160, 200, 201, 202, 399, 400, 401, 561, 16000])
@pytest.mark.parametrize("padding", [0, 1000])
def test_very_short_arrays(n_samples, padding, waveforms):
    waveform = waveforms["ls_test"][:n_samples]
    streamed = log_mel_array(waveform, 80, padding)
    np.testing.assert_allclose(streamed, whole_waveform_log_mel(waveform, 80, padding), atol=1e-5, rtol=0)


def test_fewer_samples_than_one_hop_give_zero_frames():
    assert log_mel_array(np.full(100, 0.1, np.float32)).shape == (0, 80)


def test_a_path_is_decoded_in_pieces_never_whole(monkeypatch):
    """log_mel_spectrogram(path) must not call load_audio, and only sees pieces of at most 30 s."""
    sizes = []
    real_iter_audio = audio_module.iter_audio

    def recording_iter_audio(*args, **kwargs):
        for piece in real_iter_audio(*args, **kwargs):
            sizes.append(piece.size)
            yield piece

    def no_load_audio(*_args, **_kwargs):
        raise AssertionError("the whole waveform was loaded")

    monkeypatch.setattr(audio_module, "iter_audio", recording_iter_audio)
    monkeypatch.setattr(audio_module, "load_audio", no_load_audio)
    mel = log_mel_spectrogram(str(DATA / "alice_ch1.flac"), padding=N_SAMPLES)
    assert len(sizes) > 10 and max(sizes) <= 30 * SAMPLE_RATE
    assert mel.shape[0] == (sum(sizes) + N_SAMPLES) // HOP_LENGTH


def streamed_working_set(path: Path) -> int:
    """Bytes allocated at the peak of log_mel_array(path) beyond its result (tracemalloc sees numpy)."""
    tracemalloc.start()
    try:
        mel = log_mel_array(path, 80, N_SAMPLES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - mel.nbytes


def test_streamed_working_memory_does_not_grow_with_the_file():
    """Beyond the result itself, the working set is the same for 41 s (jfk + padding) and 7 minutes."""
    short, long = streamed_working_set(DATA / "jfk.flac"), streamed_working_set(DATA / "alice_ch1.flac")
    assert long < 48 * 2**20, f"working set {long / 2**20:.0f} MiB"
    assert long < short + 8 * 2**20, f"{short / 2**20:.0f} MiB for jfk, {long / 2**20:.0f} MiB for alice"


def test_load_audio_unchanged(waveforms):
    jfk = waveforms["jfk"]
    assert jfk.dtype == np.float32 and jfk.ndim == 1 and jfk.size == 11 * SAMPLE_RATE
    assert np.array_equal(jfk, np.concatenate(list(iter_audio(DATA / "jfk.flac", chunk_seconds=1.3))))


def test_iter_audio_pieces_have_the_requested_size():
    sizes = [piece.size for piece in iter_audio(DATA / "jfk.flac", chunk_seconds=2.0)]
    assert sizes == [2 * SAMPLE_RATE] * 5 + [SAMPLE_RATE]


def test_truncated_flac_raises_a_clear_error(tmp_path):
    data = (DATA / "jfk.flac").read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="corrupt or truncated"):
        log_mel_array(cut)


def test_truncated_mp3_with_a_duration_header_warns(tmp_path, waveforms):
    mp3 = tmp_path / "jfk.mp3"
    write_mp3(waveforms["jfk"], mp3)
    data = mp3.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(AudioTruncatedWarning, match=r"decoded only 5\.\d s of the 11\.0 s"):
        decoded = load_audio(cut)
    assert 4 * SAMPLE_RATE < decoded.size < 7 * SAMPLE_RATE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_audio(mp3).size >= 11 * SAMPLE_RATE  # the whole file: no warning


# ---- undecodable files: one clear line, whether or not the ffmpeg command is installed ----

FFMPEG_5_STDERR = b"""ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026 the FFmpeg developers
  built with gcc 12 (Debian 12.2.0-14+deb12u1)
  configuration: --prefix=/usr --extra-version=0+deb12u1 --toolchain=hardened
  libavutil      57. 28.100 / 57. 28.100
  libavdevice    59.  7.100 / 59.  7.100
[mp3 @ 0x555ee426a940] Format mp3 detected only with low score of 1, misdetection possible!
[mp3 @ 0x555ee426a940] Failed to read frame size: Could not seek to 1138.
/tmp/x/header_only.mp3: Invalid argument
"""
FFMPEG_7_STDERR = b"""[in#0 @ 0x600001b2c000] Error opening input: Invalid data found when processing input
Error opening input file /tmp/x/notes.wav.
Error opening input files: Invalid data found when processing input
"""


@pytest.mark.parametrize(
    ("stderr", "path", "reason"),
    [
        (
            FFMPEG_5_STDERR,
            "/tmp/x/header_only.mp3",
            "Failed to read frame size: Could not seek to 1138; Invalid argument",
        ),
        (FFMPEG_7_STDERR, "/tmp/x/notes.wav", "Error opening input: Invalid data found when processing input"),
        (b"  libavutil      57. 28.100 / 57. 28.100\n", "/tmp/x/a.wav", "ffmpeg cannot decode it"),
        (b"x" * 1000, "/tmp/x/a.wav", "x" * 197 + "..."),
    ],
    ids=["ffmpeg5-banner", "ffmpeg7-repeated-cause", "banner-only", "long-line"],
)
def test_ffmpeg_cli_reason_is_its_last_errors_on_one_line(stderr, path, reason):
    assert audio_module._ffmpeg_cli_reason(stderr, path) == reason


def write_notes(path: Path) -> Path:
    path.write_text("these are meeting notes, not audio\n" * 20)
    return path


def assert_one_line_unreadable(message: str, path: Path) -> None:
    assert message.startswith(f"{path}: not a readable audio file (") and message.endswith(")"), message
    assert "\n" not in message and "libav" not in message and "ffmpeg version" not in message, message


def test_an_undecodable_file_is_one_line_with_or_without_the_ffmpeg_command(tmp_path, ffmpeg_command):
    notes = write_notes(tmp_path / "notes.wav")
    assert (shutil.which("ffmpeg") is not None) == (ffmpeg_command == "ffmpeg_cli")
    with pytest.raises(AudioError) as caught:
        load_audio(notes)
    assert_one_line_unreadable(str(caught.value), notes)
    assert "Invalid data found when processing input" in str(caught.value)


def test_the_ffmpeg_cli_reports_one_line_without_its_banner(tmp_path):
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg command")
    notes = write_notes(tmp_path / "notes.wav")
    with pytest.raises(AudioError) as caught:
        audio_module._decode_with_ffmpeg_cli(str(notes), SAMPLE_RATE)
    assert_one_line_unreadable(str(caught.value), notes)


def test_the_ffmpeg_cli_decodes_what_pyav_cannot_open(monkeypatch, waveforms):
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg command")

    def pyav_cannot_open(path, sr, chunk_samples):
        raise audio_module._PyAVCannotOpen("simulated")
        yield  # a generator, as the real decoder is

    monkeypatch.setattr(audio_module, "_decode_with_pyav", pyav_cannot_open)
    # ls_test is 16 kHz mono s16: neither resampling nor downmixing, so both decoders agree exactly
    np.testing.assert_array_equal(load_audio(DATA / "ls_test.flac"), waveforms["ls_test"])


def write_mp3(waveform: np.ndarray, path: Path) -> None:
    """Encode a 16 kHz mono waveform as MP3 with PyAV (its muxer writes a Xing/Info duration header)."""
    import av

    pcm = np.clip(np.round(waveform * 32767), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w", format="mp3") as container:
        stream = container.add_stream("mp3", rate=SAMPLE_RATE, layout="mono")
        for start in range(0, pcm.size, 4608):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 4608], format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("name", ["jfk", "alice_ch1"])
def test_mel_frames_on_disk_equal_the_array(name):
    """transcribe reads windows from MelFrames (a file's frames in a temporary file): same values."""
    from whisper_mlx.audio import log_mel_frames

    path = DATA / f"{name}.flac"
    whole = log_mel_array(path, 80, N_SAMPLES)
    frames = log_mel_frames(path, 80, N_SAMPLES)
    assert not isinstance(frames.raw, np.ndarray), "a path's frames should not be held in memory"
    assert frames.n_frames == whole.shape[0]
    np.testing.assert_array_equal(frames.read(0, frames.n_frames), whole)
    np.testing.assert_array_equal(frames.read(1234, 4234), whole[1234:4234])
    np.testing.assert_allclose(frames.frame_means(), whole.mean(axis=-1), rtol=1e-6, atol=1e-6)
    in_memory = log_mel_frames(load_audio(path), 80, N_SAMPLES)
    np.testing.assert_array_equal(in_memory.read(0, in_memory.n_frames), whole)
