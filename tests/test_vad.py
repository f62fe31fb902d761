"""Speech regions on a clip with known boundaries, speech-free input, the energy VAD and the CLI's
VAD options."""

import numpy as np
import pytest

import whisper_mlx
from benchmarks.noise import brown_noise
from whisper_mlx import transcribe
from whisper_mlx.errors import DecodingError
from whisper_mlx.silero import speech_probabilities
from whisper_mlx.vad import SPEECH_PAD, SpeechMap, clip_regions, cut_near, runs, silero_speech_map

from fake_backends import counting

SR = 16000


def test_speech_regions_on_a_clip_with_known_boundaries(data_dir):
    """Two stretches of continuous speech cut out of jfk, in digital silence: speech begins and ends
    exactly at the splices."""
    jfk = whisper_mlx.load_audio(str(data_dir / "jfk.flac"))
    first, second = jfk[int(5.6 * SR) : int(7.5 * SR)], jfk[int(8.7 * SR) : int(10.4 * SR)]
    silence = lambda seconds: np.zeros(int(seconds * SR), np.float32)  # noqa: E731
    clip = np.concatenate([silence(3.0), first, silence(3.0), second, silence(3.0)])
    truth = [(3.0, 4.9), (7.9, 9.6)]
    n_frames = len(clip) // 160
    speech_map = silero_speech_map(speech_probabilities(clip), n_frames)
    found = [(start / 100, end / 100) for start, end in runs(speech_map.speech)]
    assert len(found) == len(truth), found
    for (start, end), (true_start, true_end) in zip(found, truth):
        assert abs(start - true_start) <= 0.2 and abs(end - true_end) <= 0.2, (found, truth)
    # the regions decoded: the speech with SPEECH_PAD frames of context each side
    padded = [(start - SPEECH_PAD, end + SPEECH_PAD) for start, end in runs(speech_map.speech)]
    assert clip_regions(speech_map, [(0, n_frames)]) == padded


@pytest.mark.parametrize("kind", ["silence", "brown noise"])
def test_speech_free_input_gives_no_text(tiny_en, kind):
    samples = 30 * SR
    audio = np.zeros(samples, np.float32) if kind == "silence" else 0.1 * brown_noise(samples, seed=19)
    with counting(tiny_en, forbid=("encode",)):  # nothing is decoded: the VAD found no speech
        for options in ({"vad_filter": True}, {"batch_size": 12}, {"batch_size": 12, "vad_filter": True}):
            result = transcribe(audio, model=tiny_en, language="en", **options)
            assert result["text"] == "" and result["segments"] == [], (options, result["text"])
    if kind == "silence":  # what the filter prevents: openai's loop hears a word in digital silence
        assert transcribe(audio, model=tiny_en, language="en")["text"].strip() != ""


def test_a_window_silero_hears_speech_in_is_not_skipped_as_silence(tiny_en, data_dir):
    """Thresholds that make openai's rule take every window for silence (any no-speech probability, any
    log probability below 0): plain sequential mode drops jfk's only window; where Silero ran (batched,
    vad_filter) the window holds speech, so it falls back, every rung fails, and the most probable
    result (the greedy one, not the last rung's sample) is kept; with the energy VAD openai's rule stands."""
    from test_transcribe import JFK_TEXT

    path = str(data_dir / "jfk.flac")
    silence_rule = {"no_speech_threshold": 0.0, "logprob_threshold": 0.0, "temperature": (0.0, 1.0)}
    assert transcribe(path, model=tiny_en, **silence_rule)["text"] == ""
    assert transcribe(path, model=tiny_en, batch_size=12, vad="energy", **silence_rule)["text"] == ""
    for options in ({"batch_size": 12}, {"vad_filter": True}):
        assert transcribe(path, model=tiny_en, **options, **silence_rule)["text"] == JFK_TEXT, options


def test_energy_vad_stays_selectable(tiny_en, data_dir):
    from test_transcribe import JFK_TEXT

    path = str(data_dir / "jfk.flac")
    assert transcribe(path, model=tiny_en, batch_size=12, vad="energy")["text"] == JFK_TEXT
    assert transcribe(path, model=tiny_en, vad_filter=True, vad="energy")["text"] == JFK_TEXT
    with pytest.raises(DecodingError, match="vad must be one of"):
        transcribe(path, model=tiny_en, vad="webrtc")


def test_cli_passes_the_vad_options():
    from whisper_mlx.cli import build_parser, build_transcribe_options

    parser = build_parser()
    defaults = build_transcribe_options(parser.parse_args(["a.flac"]))
    assert (defaults["vad_filter"], defaults["vad"]) == (False, "silero")
    chosen = build_transcribe_options(parser.parse_args(["a.flac", "--vad-filter", "True", "--vad", "energy"]))
    assert (chosen["vad_filter"], chosen["vad"]) == (True, "energy")
    with pytest.raises(SystemExit):
        parser.parse_args(["a.flac", "--vad", "webrtc"])


def _map_with_pauses(n_frames: int, pauses: list[tuple[int, int]], quiet_at: int | None = None) -> SpeechMap:
    speech = np.ones(n_frames, bool)
    for start, end in pauses:
        speech[start:end] = False
    quiet = np.where(speech, 1.0, 0.0)
    if quiet_at is not None:  # a quieter stretch of speech (a breath), no pause
        quiet[quiet_at - 20 : quiet_at + 20] = 0.5
    return SpeechMap(speech, quiet, pauses=~speech)


def test_a_lane_is_cut_in_the_longest_pause_just_before_the_speech_resumes():
    """The lane after the cut starts SPEECH_PAD before its speech, as a region after a skipped silence
    does; a pause shorter than twice that is cut in its middle; without a pause, the quietest frame."""
    long_pause = _map_with_pauses(4000, [(1900, 1940), (2100, 2300)])
    assert cut_near(long_pause, 2000, 0, 4000) == 2300 - SPEECH_PAD
    short_pause = _map_with_pauses(4000, [(2010, 2050)])
    assert cut_near(short_pause, 2000, 0, 4000) == 2030
    no_pause = _map_with_pauses(4000, [], quiet_at=2200)  # then the quietest frame
    assert abs(cut_near(no_pause, 2000, 0, 4000) - 2200) <= 5
