"""Long-form transcription: openai-whisper's sequential seek loop, and a batched mode that decodes
many windows at once, cut in silence by a voice-activity detector so that no word is lost.

The loop state lives in small objects and every step is a function of its own.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import cast

import mlx.core as mx
import numpy as np
import tqdm

from .audio import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    MelFrames,
    log_mel_frames,
    pad_or_trim,
)
from .backends import Backend, backend_for
from .decoding import DecodingOptions, DecodingResult, DecodingTask, detect_language, take_rows
from .errors import DecodingError
from .sampling import derive_key, random_keys
from .segments import clear_empty_segments, split_window
from .silero import SileroStream
from .tokenizer import LANGUAGES, TO_LANGUAGE_CODE, get_tokenizer
from .vad import VAD_METHODS, SpeechMap, clip_regions, energy_speech_map, plan_lanes, silero_speech_map
from .whisper import Whisper

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
HEARD_SPEECH_FRACTION = 0.5  # of a window's frames Silero takes for speech: not silence, whatever no_speech says
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class TranscribeOptions:
    """Long-form options (the per-window ones are in DecodingOptions)."""

    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # the fallback ladder
    compression_ratio_threshold: float | None = 2.4  # above it: too repetitive, fall back
    logprob_threshold: float | None = -1.0  # average log probability below it: fall back
    no_speech_threshold: float | None = 0.6  # with a low logprob too: the window is silence
    condition_on_previous_text: bool = True  # prompt each window with the text before it
    initial_prompt: str | None = None  # context for the first window (or every one, if carried)
    carry_initial_prompt: bool = False  # keep the initial prompt in front of every window's prompt
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    clip_timestamps: tuple[float, ...] = ()  # start,end,start,end... seconds; () = everything
    hallucination_silence_threshold: float | None = None  # seconds; needs word_timestamps
    batch_size: int = 1  # 1: sequential (openai semantics); >1: batched windows cut at silences
    verbose: bool | None = None  # True: print segments; False: progress bar; None: quiet
    vad_filter: bool = False  # sequential mode too decodes only the speech the VAD finds
    vad: str = "silero"  # the voice-activity detector: "silero" or "energy" (vad.VAD_METHODS)
    seed: int | None = 0  # fixes the samples of the fallback rungs; None: drawn from MLX's generator


def parse_clip_timestamps(clip_timestamps: str | Sequence[float]) -> tuple[float, ...]:
    if isinstance(clip_timestamps, str):
        parts = [p for p in clip_timestamps.split(",") if p.strip()]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise DecodingError(f"clip_timestamps must be comma-separated seconds, got {clip_timestamps!r}") from None
    else:
        values = tuple(float(v) for v in clip_timestamps)
    if any(v < 0 for v in values) or any(not np.isfinite(v) for v in values):
        raise DecodingError(f"clip_timestamps must be finite and >= 0, got {values}")
    return values


def seek_clips(clip_timestamps: tuple[float, ...], content_frames: int) -> list[tuple[int, int]]:
    """(start, end) mel-frame pairs to transcribe; an odd last start runs to the end of the audio."""
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps] or [0]
    if len(points) % 2 == 1:
        points.append(content_frames)
    clips = [(min(s, content_frames), min(e, content_frames)) for s, e in zip(points[::2], points[1::2])]
    for start, end in clips:
        if end < start:
            raise DecodingError(f"clip_timestamps: a clip ends ({end / 100}s) before it starts ({start / 100}s)")
    return clips


def needs_fallback(result: DecodingResult, options: TranscribeOptions, heard_speech: bool = False) -> bool:
    """openai's quality checks; a window that looks like silence (no_speech AND low logprob) passes,
    unless the VAD heard speech in it (heard_speech)."""
    failed = False
    if (
        options.compression_ratio_threshold is not None
        and result.compression_ratio > options.compression_ratio_threshold
    ):
        failed = True  # too repetitive
    if options.logprob_threshold is not None and result.avg_logprob < options.logprob_threshold:
        failed = True  # average log probability is too low
    if (
        options.no_speech_threshold is not None
        and result.no_speech_prob > options.no_speech_threshold
        and options.logprob_threshold is not None
        and result.avg_logprob < options.logprob_threshold
        and not heard_speech
    ):
        failed = False  # this is silence
    return failed


def should_skip_as_silence(result: DecodingResult, options: TranscribeOptions, heard_speech: bool = False) -> bool:
    """openai's no-speech rule; a window the VAD heard speech in (heard_speech) is never skipped."""
    if heard_speech or options.no_speech_threshold is None or result.no_speech_prob <= options.no_speech_threshold:
        return False
    # a confident transcript is kept despite the no-speech probability
    return not (options.logprob_threshold is not None and result.avg_logprob > options.logprob_threshold)


class TaskCache:
    """One DecodingTask per temperature (building one prepares the logit masks)."""

    def __init__(self, model: Whisper, options: DecodingOptions):
        self.tasks: dict[float, DecodingTask]
        self.model, self.options, self.tasks = model, options, {}

    def get(self, temperature: float) -> DecodingTask:
        if temperature not in self.tasks:
            self.tasks[temperature] = DecodingTask(self.model, rung_options(self.options, temperature))
        return self.tasks[temperature]


def rung_options(options: DecodingOptions, temperature: float) -> DecodingOptions:
    """openai's fallback ladder: beam search (beam_size, patience) at temperature 0, best_of sampling above."""
    if temperature > 0:
        return replace(options, temperature=temperature, beam_size=None, patience=None)
    return replace(options, temperature=temperature, best_of=None)


def decode_with_fallback(
    tasks: TaskCache,
    features,
    prompts: list,
    languages: list,
    keys: list[int],
    options: TranscribeOptions,
    heard_speech: list[bool] | None = None,
) -> list[DecodingResult]:
    """Decode every row; rows failing the quality checks are decoded again, together, at the next
    temperature of the ladder (their encoder output reused), until they pass or the ladder ends.
    keys: each row's sampling key (with the rung's temperature it fixes the row's samples);
    heard_speech: the rows the VAD heard speech in (never passed as silence; when every rung fails,
    the best of the ladder is kept rather than openai's last)."""
    heard = heard_speech or [False] * features.shape[0]
    tried: list[list[DecodingResult]] = [[] for _ in range(features.shape[0])]
    pending = list(range(features.shape[0]))
    for temperature in options.temperatures:
        batch = features if len(pending) == features.shape[0] else take_rows(features, pending)
        decoded = tasks.get(temperature).run(
            batch,
            [prompts[i] for i in pending],
            [languages[i] for i in pending],
            temperature=temperature,
            keys=[keys[i] for i in pending],
        )
        failed = []
        for row, result in zip(pending, decoded):
            tried[row].append(result)
            if needs_fallback(result, options, heard[row]):
                failed.append(row)
        pending = failed
        if not pending:
            break
    failed_heard = {row for row in pending if heard[row]}
    return [best_of_ladder(t, options) if row in failed_heard else t[-1] for row, t in enumerate(tried)]


def best_of_ladder(tried: list[DecodingResult], options: TranscribeOptions) -> DecodingResult:
    """faster-whisper's choice when every rung failed: the most probable result that is not too
    repetitive (the last rung's sample at temperature 1.0, openai's choice, is the least probable)."""
    threshold = options.compression_ratio_threshold
    fluent = [r for r in tried if threshold is None or r.compression_ratio <= threshold]
    return max(fluent or tried, key=lambda r: r.avg_logprob)


# ------------------------------------------------------------------------------ shared context


@dataclass
class Transcript:
    """What the loop has produced so far."""

    initial_prompt_tokens: list[int]
    all_tokens: list[int] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)
    prompt_reset_since: int = 0
    last_speech_timestamp: float = 0.0

    def add(self, segments: list[dict], result: DecodingResult, options: TranscribeOptions) -> None:
        first_id = len(self.segments)
        self.segments.extend({"id": first_id + i, **s} for i, s in enumerate(segments))
        self.all_tokens.extend(t for s in segments for t in s["tokens"])
        if not options.condition_on_previous_text or result.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)  # no prompt after a high temperature

    def prompt(self, options: TranscribeOptions, n_text_ctx: int) -> list[int]:
        """Previous text to condition the next window on (openai's rules, carry_initial_prompt too)."""
        if not options.carry_initial_prompt:
            return self.all_tokens[self.prompt_reset_since :]
        initial = self.initial_prompt_tokens
        remaining = n_text_ctx // 2 - 1 - len(initial)
        ignored = max(len(initial), self.prompt_reset_since)
        carried = self.all_tokens[ignored:][-remaining:] if remaining > 0 else []
        return initial + carried


@dataclass
class Context:
    """Per-call constants: the model, the mel, the tokenizer and the options."""

    model: Whisper
    backend: Backend
    mel: MelFrames  # n_frames + N_FRAMES of padding; a file's frames stay on disk until read
    content_frames: int
    options: TranscribeOptions
    tasks: TaskCache  # the decoding options, one prepared task per temperature
    language: str | None = None
    first_window: tuple[int, object] | None = None  # (seek, encoder output) kept from detection
    speech_probabilities: np.ndarray | None = None  # Silero's, one per 512 samples, when it ran
    seed: int = 0  # options.seed, or one drawn for this input

    @classmethod
    def for_input(cls, model, backend, loaded, options, tasks, language: str | None) -> Context:
        """One input's context from its (mel, speech probabilities), as mel_and_speech gives them."""
        mel, speech = loaded
        seed = int(random_keys(1)[0]) if options.seed is None else options.seed
        frames = mel.n_frames - N_FRAMES
        return cls(model, backend, mel, frames, options, tasks, language, speech_probabilities=speech, seed=seed)

    def window_key(self, seek: int) -> int:
        """The sampling key of the window starting at seek: alone or beside other inputs, the same."""
        return derive_key(self.seed, seek)

    def speech_map(self) -> SpeechMap:
        """Where the speech is, per mel frame, from Silero's probabilities or else the mel's energy."""
        if self.speech_probabilities is not None:
            return self.silero_map
        return energy_speech_map(self.mel.frame_means(self.content_frames))

    @functools.cached_property
    def silero_map(self) -> SpeechMap:
        return silero_speech_map(cast(np.ndarray, self.speech_probabilities), self.content_frames)

    def heard_speech(self, span: WindowSpan) -> bool:
        """Whether Silero heard speech in at least HEARD_SPEECH_FRACTION of the window: openai's
        no-speech rule then does not drop it (after a poor sample at a fallback rung, a window of read
        speech with a no-speech probability of 0.74 was skipped whole)."""
        if self.speech_probabilities is None:
            return False
        speech = self.silero_map.speech[span.seek : span.seek + span.size]
        return bool(speech.sum() >= HEARD_SPEECH_FRACTION * span.size)

    @property
    def tokenizer(self):
        return self.tasks.get(self.options.temperatures[0]).tokenizer

    def window_frames(self, start: int, size: int) -> np.ndarray:
        return pad_or_trim(self.mel.read(start, start + size), N_FRAMES, axis=0)

    def encode(self, starts_sizes: list[tuple[int, int]]):
        """Encoder outputs (B, n_audio_ctx, n_state) of windows, reusing the detection window."""
        if len(starts_sizes) == 1 and self.first_window is not None and self.first_window[0] == starts_sizes[0][0]:
            features = self.first_window[1]
            self.first_window = None
            return features
        return self.backend.encode(np.stack([self.window_frames(s, n) for s, n in starts_sizes]))


def detect_file_language(ctx: Context, start: int) -> str:
    """Language of the first window; its encoder output is kept for decoding that window."""
    if not ctx.model.is_multilingual:
        return "en"
    size = min(N_FRAMES, ctx.content_frames - start) if ctx.content_frames > start else N_FRAMES
    features = ctx.backend.encode(ctx.window_frames(start, size)[None])
    ctx.first_window = (start, features)
    return language_of(ctx, features)


def language_of(ctx: Context, features) -> str:
    """The most likely language of one encoded window."""
    if not ctx.model.is_multilingual:
        return "en"
    tokenizer = get_tokenizer(True, num_languages=ctx.model.num_languages, language="en")
    _, probs = detect_language(ctx.model, tokenizer=tokenizer, audio_features=features)
    language = max(probs[0], key=probs[0].get)
    if ctx.options.verbose:
        print(f"Detected language: {LANGUAGES[language].title()}")
    return language


def print_segments(segments: list[dict], verbose: bool | None) -> None:
    if not verbose:
        return
    from .writers import format_timestamp

    for s in segments:
        line = f"[{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}] {s['text']}"
        print(
            line.encode(sys.stdout.encoding or "utf-8", errors="replace").decode(sys.stdout.encoding or "utf-8"),
            flush=True,
        )


def last_word_end(segments: list[dict]) -> float | None:
    for segment in reversed(segments):
        words = segment.get("words") or []
        if words:
            return words[-1]["end"]
    return segments[-1]["end"] if segments else None


# ------------------------------------------------------------------------- word timing


@dataclass
class WindowSpan:
    seek: int  # first mel frame of the window
    size: int  # mel frames of audio in it (<= N_FRAMES)

    @property
    def time_offset(self) -> float:
        return self.seek * HOP_LENGTH / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return self.size * HOP_LENGTH / SAMPLE_RATE

    @property
    def end_time(self) -> float:
        """End of the 30 s window (not of its audio), as openai's hallucination rules use it."""
        return (self.seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE


def add_words(ctx: Context, transcript: Transcript, segments: list[dict], features, span: WindowSpan):
    from .timing import add_word_timestamps

    add_word_timestamps(
        segments=segments,
        model=ctx.model,
        tokenizer=ctx.tokenizer,
        audio_features=features,
        num_frames=span.size,
        prepend_punctuations=ctx.options.prepend_punctuations,
        append_punctuations=ctx.options.append_punctuations,
        last_speech_timestamp=transcript.last_speech_timestamp,
    )


def hallucination_cut(
    segments: list[dict], span: WindowSpan, threshold: float, last_speech: float, content_frames: int
) -> int | None:
    """openai's rule: drop an anomalous segment surrounded by silence (or more anomalies) and
    everything after it; returns the frame to seek to, or None when nothing is dropped."""
    from .timing import is_segment_anomaly, next_words_segment

    content_duration = content_frames * HOP_LENGTH / SAMPLE_RATE
    previous_end = last_speech
    for i, segment in enumerate(segments):
        if not segment.get("words"):
            continue
        if is_segment_anomaly(segment):
            following = next_words_segment(segments[i + 1 :])
            next_start = following["words"][0]["start"] if following else span.time_offset + span.duration
            silence_before = (
                segment["start"] - previous_end > threshold
                or segment["start"] < threshold
                or segment["start"] - span.time_offset < 2.0
            )
            silence_after = (
                next_start - segment["end"] > threshold
                or is_segment_anomaly(following)
                or span.end_time - segment["end"] < 2.0
            )
            if silence_before and silence_after:
                seek = round(max(span.time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                if content_duration - segment["end"] < threshold:
                    seek = content_frames
                del segments[i:]
                return seek
        previous_end = segment["end"]
    return None


def seek_after_words(
    segments: list[dict], span: WindowSpan, seek: int, single_ending: bool, threshold: float | None
) -> int:
    """With word timestamps, the next window starts at the last word's end (openai)."""
    if single_ending:
        return seek
    end = last_word_end(segments)
    if end is None or end <= span.time_offset:
        return seek
    if threshold is not None and span.end_time - end <= threshold:
        return span.seek + span.size
    return round(end * FRAMES_PER_SECOND)


def apply_word_timing(
    ctx: Context, transcript: Transcript, window, features, span: WindowSpan, seek: int
) -> tuple[int, bool]:
    """Adds words to window.segments; returns (next seek, whether to drop the whole window)."""
    from .timing import is_segment_anomaly, next_words_segment

    segments = window.segments
    add_words(ctx, transcript, segments, features, span)
    threshold = ctx.options.hallucination_silence_threshold
    seek = seek_after_words(segments, span, seek, window.single_timestamp_ending, threshold)
    if threshold is not None:
        first = next_words_segment(segments)
        if first is not None and is_segment_anomaly(first):
            gap = first["start"] - span.time_offset
            if gap > threshold:  # a likely hallucination after leading silence: skip the silence
                return span.seek + round(gap * FRAMES_PER_SECOND), True
        cut = hallucination_cut(segments, span, threshold, transcript.last_speech_timestamp, ctx.content_frames)
        if cut is not None:
            seek = cut
    end = last_word_end(segments)
    if end is not None:
        transcript.last_speech_timestamp = end
    return seek, False


# ------------------------------------------------------------------- sequential and batched


def process_window(
    ctx: Context, transcript: Transcript, span: WindowSpan, features, result: DecodingResult, heard_speech: bool
) -> int:
    """Turn one decoded window into segments and add them; returns where the next window starts
    (heard_speech: the VAD heard speech in the window, see Context.heard_speech)."""
    if should_skip_as_silence(result, ctx.options, heard_speech):
        return span.seek + span.size
    window = split_window(ctx.tokenizer, result, seek=span.seek, segment_size=span.size)
    seek = span.seek + window.seek_delta
    if seek <= span.seek:  # a zero-length advance would decode the same window forever
        seek = span.seek + span.size
    if ctx.options.word_timestamps:
        seek, drop = apply_word_timing(ctx, transcript, window, features, span, seek)
        if drop:
            return seek
    print_segments(window.segments, ctx.options.verbose)
    clear_empty_segments(window.segments)
    transcript.add(window.segments, result, ctx.options)
    return seek


@dataclass
class Lane:
    """One stretch of audio transcribed with openai's sequential seek loop, over its clips."""

    clips: list[tuple[int, int]]  # (start, end) mel frames
    transcript: Transcript
    clip_index: int = 0
    seek: int = 0
    lead_in: WindowSpan | None = None  # the audio before the lane, decoded first for its text only

    def window(self, content_frames: int) -> WindowSpan | None:
        """The next window to decode: the lead-in while it is pending, then the lane's own."""
        return self.lead_in if self.lead_in is not None else self.next_span(content_frames)

    def take_lead_in(self, ctx: Context, span: WindowSpan, result: DecodingResult, heard_speech: bool) -> None:
        """The lead-in's finished segments become the lane's previous text (its unfinished last words
        would be the model's guess: the audio stops at the cut); the segments are the previous lane's."""
        self.lead_in = None
        if should_skip_as_silence(result, ctx.options, heard_speech):
            return
        window = split_window(ctx.tokenizer, result, seek=span.seek, segment_size=span.size)
        self.transcript.all_tokens.extend(token for segment in window.segments for token in segment["tokens"])
        if result.temperature > 0.5:  # no prompt after a high temperature, as Transcript.add
            self.transcript.prompt_reset_since = len(self.transcript.all_tokens)

    def next_span(self, content_frames: int) -> WindowSpan | None:
        """The next window to decode, or None when the lane is done."""
        while self.clip_index < len(self.clips):
            start, end = self.clips[self.clip_index]
            self.seek = max(self.seek, start)
            if self.seek < end:
                return WindowSpan(self.seek, min(N_FRAMES, content_frames - self.seek, end - self.seek))
            self.clip_index += 1
        return None


def run_lanes(ctx: Context, lanes: list[Lane], progress) -> None:
    """Step all lanes together: one window of each unfinished lane per batch. Each lane keeps openai's
    semantics (seek to the last timestamp, prompt with its own previous text); a lane cut out of the
    speech before it first decodes that speech's last 30 s for its text (its lead-in), so that its
    first window is prompted with what precedes it in the recording."""
    while decode_batch(ctx, lanes, progress):
        pass


@dataclass
class LaneWindow:
    """The next window of one lane of one input: a row of a decoding batch."""

    ctx: Context
    lane: Lane
    span: WindowSpan


def next_windows(ctx: Context, lanes: list[Lane]) -> list[LaneWindow]:
    """The next window of each unfinished lane, in lane order."""
    return [LaneWindow(ctx, lane, span) for lane in lanes if (span := lane.window(ctx.content_frames)) is not None]


def decode_batch(ctx: Context, lanes: list[Lane], progress) -> bool:
    """Decode the next window of each unfinished lane together; False when every lane is done."""
    windows = next_windows(ctx, lanes)
    if not windows:
        return False
    decode_windows(windows, lambda _ctx, frames: progress(frames))
    return True


def encode_windows(windows: list[LaneWindow]):
    """Encoder outputs of the windows; one input's batch may reuse its language-detection window."""
    first = windows[0].ctx
    if all(w.ctx is first for w in windows):
        return first.encode([(w.span.seek, w.span.size) for w in windows])
    return first.backend.encode(np.stack([w.ctx.window_frames(w.span.seek, w.span.size) for w in windows]))


def decode_windows(windows: list[LaneWindow], progress=None) -> None:
    """Decode windows together, of one input or of several sharing their options (ctx.tasks and the
    fallback thresholds); each row depends only on its own lane, so each input's result is the same
    whatever else shares the batch. progress(ctx, frames) hears how far each lane moved."""
    features = encode_windows(windows)
    for i, w in enumerate(windows):
        if w.ctx.language is None:  # from the input's first window in its first batch, as alone
            w.ctx.language = language_of(w.ctx, features[i : i + 1])
    n_text_ctx = windows[0].ctx.model.dims.n_text_ctx
    prompts = [w.lane.transcript.prompt(w.ctx.options, n_text_ctx) for w in windows]
    languages = [w.ctx.language for w in windows]
    lead = windows[0].ctx
    keys = [w.ctx.window_key(w.span.seek) for w in windows]
    heard = [w.ctx.heard_speech(w.span) for w in windows]
    results = decode_with_fallback(lead.tasks, features, prompts, languages, keys, lead.options, heard)
    for i, (w, result) in enumerate(zip(windows, results)):
        if w.span is w.lane.lead_in:
            w.lane.take_lead_in(w.ctx, w.span, result, heard[i])
            continue
        w.lane.seek = process_window(w.ctx, w.lane.transcript, w.span, features[i : i + 1], result, heard[i])
        if progress is not None:
            progress(w.ctx, min(w.ctx.content_frames, w.lane.seek) - w.span.seek)
    del features, results
    lead.backend.free_cached_buffers()


def batched_lanes(ctx: Context, initial_prompt_tokens: list[int]) -> list[Lane]:
    """Split the speech (found by the VAD) into up to batch_size lanes, cut in pauses; with previous-text
    conditioning, each lane cut out of the speech before it gets a lead-in."""
    clips = seek_clips(ctx.options.clip_timestamps, ctx.content_frames)
    lanes = [
        Lane(lane_clips, Transcript(initial_prompt_tokens, list(initial_prompt_tokens)))
        for lane_clips in plan_lanes(ctx.speech_map(), clips, ctx.options.batch_size)
    ]
    if ctx.options.condition_on_previous_text:
        for before, lane in itertools.pairwise(lanes):
            lane.lead_in = lead_in_window(before, lane)
    return lanes


def lead_in_window(before: Lane, lane: Lane) -> WindowSpan | None:
    """Up to 30 s of the speech before a lane that was cut out of it; None where the previous lane
    ended in a skipped silence or at the end of a clip (there is nothing said just before)."""
    region_start, region_end = before.clips[-1]
    if region_end != lane.clips[0][0]:
        return None
    start = max(region_start, region_end - N_FRAMES)
    return WindowSpan(start, region_end - start)


def clamp_segment(segment: dict, end: float) -> dict:
    """The model may place a timestamp past the end of its audio (into the window's padding); keep the
    segment, and its words, inside the lane so that lanes never overlap."""
    segment = {**segment, "start": min(segment["start"], end), "end": min(segment["end"], end)}
    if segment.get("words"):
        segment["words"] = [{**w, "start": min(w["start"], end), "end": min(w["end"], end)} for w in segment["words"]]
    return segment


def merge_lanes(lanes: list[Lane]) -> list[dict]:
    """All lanes' segments in time order, numbered, each inside its lane's audio."""
    segments = []
    for lane in lanes:
        lane_end = lane.clips[-1][1] / FRAMES_PER_SECOND
        segments += [clamp_segment(s, lane_end) for s in lane.transcript.segments]
    return [{**s, "id": i} for i, s in enumerate(segments)]


# ------------------------------------------------------------------------------- entry point

_DECODING_FIELDS = {f.name for f in fields(DecodingOptions)}
_model_cache: dict = {}
_model_cache_lock = threading.Lock()


def resolve_model(
    model: Whisper | None, path_or_hf_repo: str | None, fp16: bool | None, backend: str | None = None
) -> tuple[Whisper, Backend]:
    """The model to use (given, or loaded and cached) and its backend."""
    if model is None:
        from .load_models import default_model_path, get_cached_model

        dtype = None if fp16 is None else (mx.float16 if fp16 else mx.float32)
        model = get_cached_model(path_or_hf_repo or default_model_path(), dtype, backend=backend)
    model = model if fp16 is None else model.with_dtype(mx.float16 if fp16 else mx.float32)
    return model, backend_for(model, backend)


def build_options(temperature, batch_size, verbose, clip_timestamps, **kwargs) -> TranscribeOptions:
    # the cast: np.isscalar's TypeIs narrows to numpy scalars, complex, str..., not to what float() takes
    temperatures = (
        (float(cast(float, temperature)),) if np.isscalar(temperature) else tuple(float(t) for t in temperature)
    )
    if not temperatures:
        raise DecodingError("temperature must be a number or a non-empty sequence")
    if batch_size is None:
        batch_size = 1
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DecodingError(f"batch_size must be a positive integer, got {batch_size!r}")
    options = TranscribeOptions(
        temperatures=temperatures,
        batch_size=int(batch_size),
        verbose=verbose,
        clip_timestamps=parse_clip_timestamps(clip_timestamps),
        **kwargs,
    )
    if options.hallucination_silence_threshold is not None and not options.word_timestamps:
        raise DecodingError("hallucination_silence_threshold requires word_timestamps=True")
    seed = options.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise DecodingError(f"seed must be an integer or None, got {seed!r}")
    if options.vad not in VAD_METHODS:
        raise DecodingError(f"vad must be one of {', '.join(VAD_METHODS)}, got {options.vad!r}")
    return options


def build_decoding_options(model: Whisper, decode_options: dict, temperatures: tuple[float, ...]) -> DecodingOptions:
    unknown = sorted(set(decode_options) - _DECODING_FIELDS)
    if unknown:
        raise TypeError(f"transcribe() got unexpected keyword arguments: {', '.join(unknown)}")
    decode_options = dict(decode_options)
    # each rung of the ladder gets its own temperature; best_of only applies to the sampling rungs
    decode_options["temperature"] = max(temperatures)
    if max(temperatures) == 0:
        decode_options.pop("best_of", None)
    language = decode_options.get("language")
    if language is not None:
        language = language.lower()
        language = TO_LANGUAGE_CODE.get(language, language)
        if language not in LANGUAGES:
            raise DecodingError(f"unsupported language: {decode_options['language']!r}")
        if not model.is_multilingual and language != "en":
            raise DecodingError(f"{language!r}: this model is English-only")
        decode_options["language"] = language
    if not model.is_multilingual:
        decode_options["language"] = "en"
        if decode_options.get("task", "transcribe") == "translate":
            raise DecodingError("an English-only model cannot translate")
    return DecodingOptions(**decode_options)


def transcribe(
    audio,
    *,
    path_or_hf_repo: str | None = None,
    model: Whisper | None = None,
    verbose: bool | None = None,
    temperature: float | Sequence[float] = DEFAULT_TEMPERATURES,
    compression_ratio_threshold: float | None = 2.4,
    logprob_threshold: float | None = -1.0,
    no_speech_threshold: float | None = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: str | None = None,
    carry_initial_prompt: bool = False,
    word_timestamps: bool = False,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    clip_timestamps: str | Sequence[float] = "0",
    hallucination_silence_threshold: float | None = None,
    batch_size: int | None = None,
    backend: str | None = None,
    vad_filter: bool = False,
    vad: str = "silero",
    seed: int | None = 0,
    **decode_options,
) -> dict:
    """Transcribe an audio file or waveform; returns openai-whisper's result dict
    {"text", "segments": [...], "language"}.

    batch_size=1 (default) runs openai's sequential loop (each window conditioned on the previous
    text); batch_size>1 decodes that many windows at once, cut at silences, each prompted with the
    initial prompt only. backend: "auto", "mlx" or "numpy" (default: the model's, see backends).
    vad_filter: decode only the speech the voice-activity detector finds (batched mode always does);
    vad: that detector, "silero" (Silero VAD, the default) or "energy" (the mel's loudness).
    seed: the fallback rungs' samples depend only on it and the window, so the same input gives the
    same text in every run, alone or batched with other inputs (None: a new draw per call).
    Remaining keywords are DecodingOptions fields (language, task, fp16, ...).
    """
    arguments = locals()
    model, model_backend = resolve_model(model, path_or_hf_repo, decode_options.get("fp16"), backend)
    options = long_form_options({name: arguments[name] for name in long_form_keywords()})
    decoding = build_decoding_options(model, decode_options, options.temperatures)
    loaded = mel_and_speech(audio, model.dims.n_mels, options)
    tasks = TaskCache(model, decoding)
    ctx = Context.for_input(model, model_backend, loaded, options, tasks, decoding.language)
    if word_timestamps and decoding.task == "translate":
        warnings.warn("Word-level timestamps on translations may not be reliable.", stacklevel=2)
    return run_transcription(ctx)


# transcribe()'s keywords that choose the model rather than how an input is transcribed
MODEL_KEYWORDS = ("model", "path_or_hf_repo", "backend")


@functools.cache
def long_form_keywords() -> tuple[str, ...]:
    """transcribe()'s keywords that set its TranscribeOptions (all but the model's and DecodingOptions')."""
    parameters = inspect.signature(transcribe).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in MODEL_KEYWORDS)


def long_form_options(named: dict) -> TranscribeOptions:
    """TranscribeOptions from a value for each of long_form_keywords(), checked."""
    named = dict(named)
    temperature, batch_size, verbose = named.pop("temperature"), named.pop("batch_size"), named.pop("verbose")
    return build_options(temperature, batch_size, verbose, named.pop("clip_timestamps"), **named)


def options_from_keywords(model: Whisper, keywords: dict) -> tuple[TranscribeOptions, DecodingOptions]:
    """transcribe()'s keywords (its defaults for the others) as the options it would run with; a
    keyword it does not take is a DecodingError here (one input's bad option, not a programming error)."""
    chosen = sorted(set(keywords) & set(MODEL_KEYWORDS))
    if chosen:
        raise DecodingError(f"{', '.join(chosen)}: fixed by the engine's model, not set per input")
    parameters = inspect.signature(transcribe).parameters
    named = {name: keywords.get(name, parameters[name].default) for name in long_form_keywords()}
    decode_options = {k: v for k, v in keywords.items() if k not in parameters}
    unknown = sorted(set(decode_options) - _DECODING_FIELDS)
    if unknown:
        raise DecodingError(f"unknown transcription option(s): {', '.join(unknown)}")
    options = long_form_options(named)
    return options, build_decoding_options(model, decode_options, options.temperatures)


def mel_and_speech(audio, n_mels: int, options: TranscribeOptions) -> tuple[MelFrames, np.ndarray | None]:
    """The log-mel, and where a Silero VAD is needed Silero's speech probabilities from the same pass."""
    needed = options.vad == "silero" and (options.batch_size > 1 or options.vad_filter)
    silero = SileroStream() if needed else None
    mel = log_mel_frames(audio, n_mels, padding=N_SAMPLES, on_samples=silero.feed if silero else None)
    return mel, silero.finish() if silero else None


def run_transcription(ctx: Context) -> dict:
    duration = ctx.content_frames / FRAMES_PER_SECOND
    with tqdm.tqdm(
        total=round(duration, 2),
        unit="s",
        unit_scale=False,
        disable=ctx.options.verbose is not False,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]",
    ) as bar:
        progress = lambda frames: bar.update(max(0, frames) / FRAMES_PER_SECOND)  # noqa: E731
        lanes = plan_input_lanes(ctx)
        run_lanes(ctx, lanes, progress)
    return lanes_result(ctx, lanes)


def plan_input_lanes(ctx: Context) -> list[Lane]:
    """One input's lanes: VAD lanes when batched, else one lane of openai's seek loop over the clips
    (the language detected from its first window, which is kept for decoding that window)."""
    options = ctx.options
    prompt_tokens = ctx.tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
    if options.batch_size > 1:
        return batched_lanes(ctx, prompt_tokens)
    clips = seek_clips(options.clip_timestamps, ctx.content_frames)
    if options.vad_filter:
        clips = clip_regions(ctx.speech_map(), clips)
    if ctx.language is None and clips:
        ctx.language = detect_file_language(ctx, clips[0][0])
    transcript = Transcript(initial_prompt_tokens=prompt_tokens, all_tokens=list(prompt_tokens))
    return [Lane(clips, transcript)] if clips else []


def lanes_result(ctx: Context, lanes: list[Lane]) -> dict:
    """openai's result dict from an input's finished lanes."""
    segments = merge_lanes(lanes)
    return {"text": "".join(s["text"] for s in segments), "segments": segments, "language": ctx.language or "en"}
