"""Pure helpers that turn one window's decoded tokens into segments (openai-whisper's rules)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import HOP_LENGTH, SAMPLE_RATE
from .decoding import DecodingResult
from .tokenizer import Tokenizer

INPUT_STRIDE = 2  # mel frames per audio token (the encoder's stride-2 conv)
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token


@dataclass
class WindowSegments:
    segments: list[dict]
    seek_delta: int  # mel frames to advance the seek by (sequential mode)
    single_timestamp_ending: bool


def make_segment(
    tokenizer: Tokenizer, *, seek: int, start: float, end: float, tokens: list[int], result: DecodingResult
) -> dict:
    text_tokens = [t for t in tokens if t < tokenizer.eot]
    return {
        "seek": seek,
        "start": float(start),
        "end": float(end),
        "text": tokenizer.decode(text_tokens),
        "tokens": list(tokens),
        "temperature": result.temperature,
        "avg_logprob": result.avg_logprob,
        "compression_ratio": result.compression_ratio,
        "no_speech_prob": result.no_speech_prob,
    }


def split_window(tokenizer: Tokenizer, result: DecodingResult, *, seek: int, segment_size: int) -> WindowSegments:
    """Segments of one decoded window, and how far openai's seek moves after it.

    Pairs of consecutive timestamps close segments. A lone timestamp at the very end means no speech
    after it; otherwise the text after the last closed pair is unfinished: it is left out, and the
    seek stops at the last timestamp so the next window decodes it again.
    """
    tokens = np.array(result.tokens, dtype=np.int64)
    ts_begin = tokenizer.timestamp_begin
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    is_ts = tokens >= ts_begin
    single_ending = bool(len(tokens) >= 2 and not is_ts[-2] and is_ts[-1])
    consecutive = np.flatnonzero(is_ts[:-1] & is_ts[1:]) + 1
    new = lambda start, end, toks: make_segment(tokenizer, seek=seek, start=start, end=end, tokens=toks, result=result)  # noqa: E731
    if len(consecutive) > 0:
        slices = consecutive.tolist() + ([len(tokens)] if single_ending else [])
        segments, last_slice = [], 0
        for current in slices:
            piece = tokens[last_slice:current]
            segments.append(
                new(
                    time_offset + (piece[0] - ts_begin) * TIME_PRECISION,
                    time_offset + (piece[-1] - ts_begin) * TIME_PRECISION,
                    piece.tolist(),
                )
            )
            last_slice = current
        if single_ending:
            return WindowSegments(segments, segment_size, True)
        last_ts = int(tokens[last_slice - 1]) - ts_begin
        return WindowSegments(segments, last_ts * INPUT_STRIDE, False)
    duration = segment_size * HOP_LENGTH / SAMPLE_RATE
    timestamps = tokens[is_ts]
    if len(timestamps) > 0 and timestamps[-1] != ts_begin:
        duration = (int(timestamps[-1]) - ts_begin) * TIME_PRECISION  # no pair, but a timestamp: use it
    return WindowSegments([new(time_offset, time_offset + duration, tokens.tolist())], segment_size, single_ending)


def clear_empty_segments(segments: list[dict]) -> None:
    """An instantaneous segment, or one without text, keeps its place but loses its text."""
    for segment in segments:
        if segment["start"] == segment["end"] or segment["text"].strip() == "":
            segment["text"] = ""
            segment["tokens"] = []
            segment["words"] = []
