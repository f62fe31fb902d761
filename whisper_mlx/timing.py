"""Word-level timestamps from the decoder's cross-attention (openai-whisper's algorithm, numpy only).

The alignment heads' cross-attention weights of a forced decode of the transcript are normalised,
median-filtered and averaged into a (tokens x audio frames) matrix; dynamic time warping through its
negative gives each token's first audio frame, from which word start/end times follow.

No numba, scipy or torch: the median filter and the DTW are plain (vectorised) numpy. The encoder is
never run here; callers hand in the window's already computed audio features.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .audio import HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND
from .backends import backend_for

# The punctuation openai's transcribe ignores when scoring segments for hallucinations.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS
SENTENCE_END_MARKS = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


# --------------------------------------------------------------------------- numeric kernels


def median_filter(x: np.ndarray, filter_width: int) -> np.ndarray:
    """Median over a sliding window of odd `filter_width` along the last axis, reflect-padded.

    Like openai's: inputs whose last axis is not longer than the half width come back unchanged.
    """
    x = np.asarray(x)
    if filter_width <= 0 or filter_width % 2 != 1:
        raise ValueError("`filter_width` should be an odd number")
    half = filter_width // 2
    if x.shape[-1] <= half:
        return x
    if half == 0:
        return x.copy()
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, filter_width, axis=-1)
    return np.partition(windows, half, axis=-1)[..., half]


def _dtw_trace(x: np.ndarray) -> np.ndarray:
    """Fill openai's dtw_cpu cost/trace tables, one anti-diagonal (i + j = const) at a time.

    Cells on a diagonal depend only on the two previous diagonals, so each is one vector step; the
    accumulated cost is stored in float32 after a float64 add, exactly as dtw_cpu does.
    """
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    for diagonal in range(2, n + m + 1):
        i = np.arange(max(1, diagonal - m), min(n, diagonal - 1) + 1)
        j = diagonal - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        pick0 = (c0 < c1) & (c0 < c2)
        pick1 = ~pick0 & (c1 < c0) & (c1 < c2)
        best = np.where(pick0, c0, np.where(pick1, c1, c2))
        cost[i, j] = (x[i - 1, j - 1] + best.astype(np.float64)).astype(np.float32)
        trace[i, j] = np.where(pick0, 0, np.where(pick1, 1, 2))
    return trace


def _backtrace(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walk from the bottom-right corner back to (0, 0); 0 = diagonal, 1 = up, 2 = left."""
    trace = trace.copy()
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        elif step == 2:
            j -= 1
        else:
            raise ValueError(f"unexpected DTW trace value {step} at ({i}, {j})")
    result = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return result[:, 0], result[:, 1]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment of the rows (text) to the columns (time) of `cost`, minimising the sum.

    Returns (text_indices, time_indices), both int64 of the path's length, with openai's dtw_cpu tie
    breaking (diagonal, then up, only when strictly cheaper; otherwise left).
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError("dtw expects a 2-D cost matrix")
    return _backtrace(_dtw_trace(cost))


# --------------------------------------------------------------------------- alignment


def _token_probabilities(logits: np.ndarray, tokenizer, text_tokens: list[int]) -> np.ndarray:
    """Probability the forced decode gave each text token (softmax over the non-special vocabulary)."""
    start = len(tokenizer.sot_sequence)
    sampled = logits[start : start + len(text_tokens), : tokenizer.eot].astype(np.float64)
    sampled = np.exp(sampled - sampled.max(axis=-1, keepdims=True))
    picked = sampled[np.arange(len(text_tokens)), text_tokens] / sampled.sum(axis=-1)
    return picked


def _alignment_matrix(weights: np.ndarray, num_frames: int, medfilt_width: int, qk_scale: float) -> np.ndarray:
    """(tokens, frames) attention matrix from the alignment heads' weights (heads, tokens, audio
    positions): re-softmaxed over the window's frames, z-scored over tokens per head, median-filtered
    along time, averaged over heads."""
    weights = weights[:, :, : num_frames // 2]
    # The weights come softmaxed over all audio positions; softmax(s * qk) restricted to the first
    # frames is w ** s renormalised there.
    if qk_scale != 1.0:
        weights = weights**qk_scale
    weights = weights / weights.sum(axis=-1, keepdims=True)
    mean = weights.mean(axis=-2, keepdims=True)
    std = weights.std(axis=-2, keepdims=True)
    weights = median_filter((weights - mean) / std, medfilt_width)
    return weights.mean(axis=0)


def _word_timings(tokenizer, text_tokens, token_probs, text_indices, time_indices) -> list[WordTiming]:
    """Cut the DTW path into words: a word starts where the path first reaches its boundary row."""
    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, tokenizer.eot])
    if len(word_tokens) <= 1:  # only eot
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    probabilities = [float(np.mean(token_probs[i:j])) for i, j in itertools.pairwise(boundaries)]
    return [
        WordTiming(word, tokens, float(start), float(end), probability)
        for word, tokens, start, end, probability in zip(words, word_tokens, starts, ends, probabilities)
    ]


def find_alignment(
    model,
    tokenizer,
    text_tokens: list[int],
    audio_features,
    num_frames: int,
    *,
    medfilt_width: int = 7,
    qk_scale: float = 1.0,
) -> list[WordTiming]:
    """Word timings (seconds from the window start) for `text_tokens` given the window's encoder output
    `audio_features` (1, T, D); `num_frames` is the window's number of mel frames holding audio."""
    text_tokens = [int(t) for t in text_tokens]
    if len(text_tokens) == 0:
        return []
    tokens = np.array([[*tokenizer.sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]])
    heads = np.asarray(model.alignment_heads).reshape(-1, 2).tolist()
    logits, weights = backend_for(model).alignment_weights(tokens, audio_features, heads)
    token_probs = _token_probabilities(logits, tokenizer, text_tokens)
    matrix = _alignment_matrix(weights, num_frames, medfilt_width, qk_scale)
    matrix = matrix[len(tokenizer.sot_sequence) : -1]
    text_indices, time_indices = dtw(-matrix)
    return _word_timings(tokenizer, text_tokens, token_probs, text_indices, time_indices)


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening punctuation to the following word and closing punctuation to the preceding one,
    leaving emptied entries (word "", no tokens) in place."""
    following = len(alignment) - 1
    for i in range(len(alignment) - 2, -1, -1):
        previous, nxt = alignment[i], alignment[following]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            nxt.word = previous.word + nxt.word
            nxt.tokens = previous.tokens + nxt.tokens
            previous.word, previous.tokens = "", []
        else:
            following = i

    preceding = 0
    for j in range(1, len(alignment)):
        previous, nxt = alignment[preceding], alignment[j]
        if not previous.word.endswith(" ") and nxt.word in appended:
            previous.word = previous.word + nxt.word
            previous.tokens = previous.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            preceding = j


# --------------------------------------------------------------------------- segments


def _duration_limits(alignment: list[WordTiming]) -> tuple[float, float, bool]:
    """(median word duration capped at 0.7 s, twice that, whether any word has a nonzero duration)."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = float(np.median(durations)) if len(durations) > 0 else 0.0
    median = min(0.7, median)
    return median, median * 2, len(durations) > 0


def _truncate_at_sentence_ends(alignment: list[WordTiming], max_duration: float) -> None:
    """Words at sentence boundaries may last at most `max_duration` (they tend to swallow pauses)."""
    for i in range(1, len(alignment)):
        if alignment[i].end - alignment[i].start > max_duration:
            if alignment[i].word in SENTENCE_END_MARKS:
                alignment[i].end = alignment[i].start + max_duration
            elif alignment[i - 1].word in SENTENCE_END_MARKS:
                alignment[i].start = alignment[i].end - max_duration


def _take_segment_words(alignment, word_index: int, n_tokens: int, time_offset: float) -> tuple[list[dict], int]:
    """Consume alignment entries covering the segment's `n_tokens` text tokens into word dicts."""
    words, saved_tokens = [], 0
    while word_index < len(alignment) and saved_tokens < n_tokens:
        timing = alignment[word_index]
        if timing.word:
            words.append(
                {
                    "word": timing.word,
                    "start": round(float(time_offset + timing.start), 2),
                    "end": round(float(time_offset + timing.end), 2),
                    "probability": float(timing.probability),
                }
            )
        saved_tokens += len(timing.tokens)
        word_index += 1
    return words, word_index


def _fix_words_after_pause(words: list[dict], last_speech_timestamp: float, median: float, max_duration: float) -> None:
    """The first (and second) word after a pause should not stretch back into the silence."""
    first = words[0]
    too_long = first["end"] - first["start"] > max_duration or (
        len(words) > 1 and words[1]["end"] - first["start"] > max_duration * 2
    )
    if first["end"] - last_speech_timestamp > median * 4 and too_long:
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
            first["end"] = words[1]["start"] = boundary
        first["start"] = max(0, first["end"] - max_duration)


def _reconcile_segment_bounds(segment: dict, words: list[dict], median: float) -> None:
    """Prefer the segment's own start/end where the first/last word looks too long; else take the words'."""
    first, last = words[0], words[-1]
    if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
        first["start"] = max(0, min(first["end"] - median, segment["start"]))
    else:
        segment["start"] = first["start"]
    if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
        last["end"] = max(last["start"] + median, segment["end"])
    else:
        segment["end"] = last["end"]


def add_word_timestamps(
    *,
    segments: list[dict],
    model,
    tokenizer,
    audio_features,
    num_frames: int,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    last_speech_timestamp: float,
    **kwargs,
) -> None:
    """Align all `segments` of one window in a single pass and set each one's "words" (in place).

    `audio_features` is the window's encoder output (1, T, D); kwargs go to find_alignment.
    Segment start/end are updated from the words as openai-whisper does.
    """
    if len(segments) == 0:
        return
    tokens_per_segment = [[int(t) for t in segment["tokens"] if t < tokenizer.eot] for segment in segments]
    text_tokens = list(itertools.chain.from_iterable(tokens_per_segment))
    alignment = find_alignment(model, tokenizer, text_tokens, audio_features, num_frames, **kwargs)
    median, max_duration, any_duration = _duration_limits(alignment)
    if any_duration:
        _truncate_at_sentence_ends(alignment, max_duration)
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    word_index = 0
    for segment, segment_tokens in zip(segments, tokens_per_segment):
        words, word_index = _take_segment_words(alignment, word_index, len(segment_tokens), time_offset)
        if len(words) > 0:
            _fix_words_after_pause(words, last_speech_timestamp, median, max_duration)
            _reconcile_segment_bounds(segment, words, median)
            last_speech_timestamp = segment["end"]
        segment["words"] = words


# --------------------------------------------------------------------------- hallucination helpers


def word_anomaly_score(word: dict) -> float:
    """How implausible a word looks: improbable, very short or very long."""
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 0.0
    if probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: dict | None) -> bool:
    """Whether a segment's first (up to) 8 non-punctuation words look like a hallucination."""
    if segment is None or not segment.get("words"):
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION][:8]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def next_words_segment(segments: list[dict]) -> dict | None:
    """The first segment that has words, or None."""
    return next((s for s in segments if s.get("words")), None)
