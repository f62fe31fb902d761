"""Golden transcripts with the real tiny.en / base weights, invariants, and the reuse guarantees."""

import re

import numpy as np
import pytest

import whisper_mlx
from whisper_mlx import transcribe
from whisper_mlx.backends import backend_for
from whisper_mlx.decoding import DecodingTask

from fake_backends import counting

JFK_TEXT = " And so my fellow Americans ask not what your country can do for you ask what you can do for your country"
# tiny.en mishears "good soul" and "shouldered" (mlx-whisper and faster-whisper do too on these weights)
LS_TEXT = (
    " Then the goods sold openly, shorted the burden she had borne so long in secret and bravely trudged on alone."
)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def check_invariants(result: dict, duration: float) -> None:
    segments = result["segments"]
    assert result["text"] == "".join(s["text"] for s in segments)
    previous_end = 0.0
    for i, s in enumerate(segments):
        assert s["id"] == i
        assert 0.0 <= s["start"] <= s["end"] <= duration + 0.02, s
        assert s["start"] >= previous_end - 1e-6, "segments overlap or go backwards"
        previous_end = s["end"]
        assert {"seek", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob"} <= set(s)
        assert all(isinstance(s[k], float) for k in ("start", "end", "avg_logprob", "no_speech_prob"))


def test_jfk_golden(tiny_en, data_dir):
    result = transcribe(str(data_dir / "jfk.flac"), model=tiny_en)
    assert result["text"] == JFK_TEXT
    assert words(result["text"]) == words((data_dir / "jfk.txt").read_text())
    assert result["language"] == "en"
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 7.74), (7.74, 10.74)]
    check_invariants(result, 11.0)


def test_ls_test_golden(tiny_en, data_dir):
    result = transcribe(str(data_dir / "ls_test.flac"), model=tiny_en)
    assert result["text"] == LS_TEXT
    reference = words((data_dir / "ls_test.txt").read_text())
    hypothesis = words(result["text"])
    assert len(hypothesis) == len(reference)
    assert sum(a != b for a, b in zip(reference, hypothesis)) == 3  # goods/sold/shorted
    check_invariants(result, 6.5)


def test_batched_equals_sequential_on_one_lane(tiny_en, data_dir):
    sequential = transcribe(str(data_dir / "jfk.flac"), model=tiny_en, batch_size=1)
    batched = transcribe(str(data_dir / "jfk.flac"), model=tiny_en, batch_size=8)
    assert batched["segments"] == sequential["segments"]


def test_lightning_drop_in(data_dir):
    from whisper_mlx import LightningWhisperMLX

    whisper = LightningWhisperMLX(batch_size=4)  # no model named: the installed tiny.en
    result = whisper.transcribe(str(data_dir / "jfk.flac"))
    assert result["text"] == JFK_TEXT
    assert isinstance(result["segments"][0], dict)


def test_french_detected_with_base(base_model, data_dir):
    with counting(base_model) as backend:
        result = transcribe(str(data_dir / "french_tts.flac"), model=base_model)
    assert result["language"] == "fr"
    assert "reconnaissance automatique de la parole" in result["text"]
    assert backend.calls["encode"] == 1, "language detection must reuse the first window's encoder output"
    check_invariants(result, 10.0)


def test_array_input_and_result_schema(tiny_en, data_dir):
    audio = whisper_mlx.load_audio(str(data_dir / "jfk.flac"))
    result = transcribe(audio, model=tiny_en, temperature=0.0, word_timestamps=True)
    assert result["text"] == JFK_TEXT
    for segment in result["segments"]:
        joined = "".join(w["word"] for w in segment["words"])
        assert joined == segment["text"]
        for w in segment["words"]:
            assert segment["start"] - 0.01 <= w["start"] <= w["end"] <= segment["end"] + 0.01


def test_clip_timestamps_several_clips(tiny_en, data_dir):
    result = transcribe(str(data_dir / "jfk.flac"), model=tiny_en, clip_timestamps="0,3.5,7.5,11")
    assert result["segments"], "both clips should produce text"
    for s in result["segments"]:
        assert (0 <= s["start"] <= 3.5 + 0.02) or (7.5 - 0.02 <= s["start"] <= 11.02)
    assert "country" in result["text"] and "Americans" in result["text"]


def test_fallback_rebatches_failing_rows_only(tiny_en, data_dir):
    from whisper_mlx.audio import log_mel_spectrogram, pad_or_trim
    from whisper_mlx.decoding import DecodingOptions
    from whisper_mlx.transcribe import TaskCache, TranscribeOptions, decode_with_fallback

    mels = np.stack(
        [pad_or_trim(log_mel_spectrogram(str(data_dir / f)), 3000, axis=0) for f in ("jfk.flac", "ls_test.flac")]
    )
    features = backend_for(tiny_en).encode(mels)
    tasks = TaskCache(tiny_en, DecodingOptions(language="en"))
    greedy = tasks.get(0.0).run(features)
    # a threshold between the two rows' log probabilities: exactly one row falls back
    threshold = float(np.mean([r.avg_logprob for r in greedy]))
    failing = int(np.argmin([r.avg_logprob for r in greedy]))
    seen = []
    original_run = DecodingTask.run

    def spy(self, audio_features, *args, **kwargs):
        seen.append((kwargs.get("temperature"), audio_features.shape[0], np.array(audio_features)))
        return original_run(self, audio_features, *args, **kwargs)

    DecodingTask.run = spy
    try:
        options = TranscribeOptions(logprob_threshold=threshold, compression_ratio_threshold=None)
        results = decode_with_fallback(tasks, features, [None, None], ["en", "en"], [1, 2], options)
    finally:
        DecodingTask.run = original_run
    assert seen[0][:2] == (0.0, 2)
    assert all(batch == 1 for _, batch, _ in seen[1:]) and len(seen) >= 2
    np.testing.assert_array_equal(seen[1][2][0], np.array(features[failing]))  # encoder output reused
    assert results[1 - failing].temperature == 0.0
    assert results[failing].temperature > 0.0


def test_detect_language_reuses_features(base_model, data_dir):
    from whisper_mlx.audio import log_mel_spectrogram, pad_or_trim

    mel = pad_or_trim(log_mel_spectrogram(str(data_dir / "french_tts.flac")), 3000, axis=0)
    features = backend_for(base_model).encode(np.array(mel)[None])
    _, probs = whisper_mlx.detect_language(base_model, audio_features=features)
    assert max(probs[0], key=probs[0].get) == "fr"
    _, single = whisper_mlx.detect_language(base_model, mel)
    assert max(single, key=single.get) == "fr"


def test_lane_heads_are_prompted_with_the_speech_before_them(tiny_en, data_dir, monkeypatch):
    """Two lanes. Lane 2's lead-in (the 30 s before its cut) is decoded beside lane 1's opening window;
    lane 2's first window is then prompted with the lead-in's finished segments: the text that precedes
    it in the recording, as the sequential loop's window there would be."""
    import sys

    from whisper_mlx.segments import split_window
    from whisper_mlx.tokenizer import get_tokenizer

    module = sys.modules["whisper_mlx.transcribe"]
    batches, encoded, planned = [], [], []
    decode, encode, plan = module.decode_with_fallback, module.Context.encode, module.batched_lanes

    def spy_decode(tasks, features, prompts, languages, *rest):
        results = decode(tasks, features, prompts, languages, *rest)
        batches.append(([list(p) for p in prompts], results))
        return results

    def spy_encode(ctx, starts_sizes):
        encoded.append(list(starts_sizes))
        return encode(ctx, starts_sizes)

    def spy_plan(ctx, initial_prompt_tokens):
        planned[:] = plan(ctx, initial_prompt_tokens)
        return planned

    monkeypatch.setattr(module, "decode_with_fallback", spy_decode)
    monkeypatch.setattr(module.Context, "encode", spy_encode)
    monkeypatch.setattr(module, "batched_lanes", spy_plan)
    audio = whisper_mlx.load_audio(str(data_dir / "alice_ch1.flac"))[: 16000 * 130]  # two 60 s lanes
    result = transcribe(audio, model=tiny_en, language="en", batch_size=12)
    check_invariants(result, 130.0)
    first, second = planned
    cut = second.clips[0][0]
    assert first.clips[-1][1] == cut and cut > 3000
    assert encoded[0] == [(0, 3000), (cut - 3000, 3000)]  # lane 1's opening window and lane 2's lead-in
    assert batches[0][0] == [[], []]
    lead_in = split_window(get_tokenizer(False), batches[0][1][1], seek=cut - 3000, segment_size=3000)
    lead_in_text = [token for segment in lead_in.segments for token in segment["tokens"]]
    assert encoded[1][1][0] == cut and len(lead_in_text) > 50  # then lane 2's first window...
    assert batches[1][0][1] == lead_in_text  # ...prompted with the lead-in's text
    # the lead-in's own segments are not in the result: they belong to lane 1
    assert len(result["segments"]) == len(first.transcript.segments) + len(second.transcript.segments)
    assert all(s["start"] >= cut / 100 - 1e-6 for s in second.transcript.segments)
    # lane 1's windows inside its lane (same audio span, same prompt) are the sequential loop's windows
    sequential = transcribe(audio, model=tiny_en, language="en")

    def windows(r):
        return [[(s["start"], s["end"], s["tokens"]) for s in r["segments"] if s["seek"] == seek]
                for seek in dict.fromkeys(s["seek"] for s in r["segments"])]  # fmt: skip

    assert windows(result)[:2] == windows(sequential)[:2]

    encoded.clear()  # without conditioning on previous text there is no lead-in
    transcribe(audio, model=tiny_en, language="en", batch_size=12, condition_on_previous_text=False)
    assert encoded[0] == [(0, 3000), (cut, 3000)]


@pytest.fixture(scope="module")
def alice_wer(tiny_en, data_dir):
    """WER of alice_ch1 (418 s) in one mode, computed once per mode for the module."""
    from benchmarks.normalize import word_error_rate

    reference = (data_dir / "alice_ch1.txt").read_text()
    cache = {}

    def run(batch_size: int) -> float:
        if batch_size not in cache:
            result = transcribe(str(data_dir / "alice_ch1.flac"), model=tiny_en, language="en", batch_size=batch_size)
            check_invariants(result, 418.6)
            cache[batch_size] = word_error_rate(reference, result["text"])["wer"]
        return cache[batch_size]

    return run


@pytest.mark.slow
def test_alice_sequential_wer(alice_wer):
    assert alice_wer(1) <= 0.12


@pytest.mark.slow
def test_alice_batched_quality_gate(alice_wer):
    # batched lanes may not cost more than 0.3 WER points against openai's sequential loop
    assert alice_wer(12) <= alice_wer(1) + 0.003


def test_hallucination_silence_threshold_on_word_timestamps(tiny_en, data_dir):
    audio = whisper_mlx.load_audio(str(data_dir / "jfk.flac"))
    padded = np.concatenate([np.zeros(16000 * 8, np.float32), audio, np.zeros(16000 * 8, np.float32)])
    result = transcribe(padded, model=tiny_en, word_timestamps=True, hallucination_silence_threshold=2.0)
    assert "Americans" in result["text"] and "country" in result["text"]
    check_invariants(result, len(padded) / 16000)
    for segment in result["segments"]:
        assert "".join(w["word"] for w in segment["words"]) == segment["text"]
    with pytest.raises(whisper_mlx.errors.DecodingError):
        transcribe(audio, model=tiny_en, hallucination_silence_threshold=2.0)  # needs word_timestamps


@pytest.mark.parametrize("heard", [False, True])
def test_the_no_speech_rule_yields_to_a_vad_that_heard_speech(heard):
    """openai's rule: a low log probability with a high no-speech probability is silence, neither a
    failure nor text; a window the VAD heard speech in falls back and is kept instead."""
    from whisper_mlx.decoding import DecodingResult
    from whisper_mlx.transcribe import TranscribeOptions, needs_fallback, should_skip_as_silence

    options = TranscribeOptions()
    quiet = DecodingResult(None, "en", avg_logprob=-1.5, no_speech_prob=0.8, compression_ratio=1.0)
    assert needs_fallback(quiet, options, heard) is heard
    assert should_skip_as_silence(quiet, options, heard) is not heard
    confident = DecodingResult(None, "en", avg_logprob=-0.2, no_speech_prob=0.8, compression_ratio=1.0)
    assert not needs_fallback(confident, options, heard) and not should_skip_as_silence(confident, options, heard)


def test_the_best_of_a_failed_ladder_is_the_most_probable_fluent_result():
    from whisper_mlx.decoding import DecodingResult
    from whisper_mlx.transcribe import TranscribeOptions, best_of_ladder

    def tried(logprob: float, ratio: float) -> DecodingResult:
        return DecodingResult(None, "en", avg_logprob=logprob, compression_ratio=ratio)

    rungs = [tried(-0.5, 3.1), tried(-1.2, 1.5), tried(-1.1, 1.6), tried(-2.0, 1.2)]
    assert best_of_ladder(rungs, TranscribeOptions()) is rungs[2]  # the repetitive -0.5 is passed over
    assert best_of_ladder(rungs, TranscribeOptions(compression_ratio_threshold=None)) is rungs[0]
    assert best_of_ladder(rungs[:1], TranscribeOptions()) is rungs[0]  # nothing fluent: the most probable
