"""Where the speech is, per mel frame, and the lane planner that splits it into stretches cut in pauses
(so batched decoding cuts no word).

Two detectors fill the same SpeechMap: Silero VAD (the default; silero.py computes its probabilities
from the waveform) and a fast energy detector on the log-mel we already have (vad="energy").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import FRAMES_PER_SECOND, HOP_LENGTH

VAD_METHODS = ("silero", "energy")
SMOOTH_FRAMES = 10  # 0.1 s moving average for the energy detector's speech/non-speech decision
CUT_SMOOTH_FRAMES = 30  # 0.3 s moving average when choosing where to cut
MIN_SKIPPED_SILENCE = 2 * FRAMES_PER_SECOND  # only silences this long are left undecoded
SPEECH_PAD = 30  # frames of context kept around speech (0.3 s)
LANE_CUT_SEARCH = 5 * FRAMES_PER_SECOND  # a lane boundary moves at most 5 s to find a pause
# Shorter lanes put more rows in each step, but each lane start costs a lead-in window (transcribe.lead_in_window).
MIN_LANE_FRAMES = 60 * FRAMES_PER_SECOND
SILERO_CHUNK = 512  # samples per Silero probability (silero.CHUNK)
SPEECH_THRESHOLD = 0.5  # Silero's own defaults: speech starts above it...
SILENCE_THRESHOLD = 0.35  # ...and lasts until the probability falls below this
MIN_SPEECH_CHUNKS = 8  # shorter bursts (256 ms, Silero's minimum speech) are noise


@dataclass
class SpeechMap:
    """Per mel frame: whether it holds speech, and how quiet it is (where a lane is best cut)."""

    speech: np.ndarray  # bool (n_frames,)
    quiet: np.ndarray  # float (n_frames,), lower is quieter
    pauses: np.ndarray | None = None  # bool (n_frames,): no speech at all; lanes are cut in the longest


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or len(x) == 0:
        return x.astype(np.float64)
    kernel = np.ones(width) / width
    return np.convolve(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, mode="valid")


def speech_frames(energy: np.ndarray, sensitivity: float = 0.2) -> np.ndarray:
    """Boolean speech mask: frames louder than the noise floor by `sensitivity` of the dynamic range."""
    if len(energy) == 0:
        return np.zeros(0, bool)
    smooth = moving_average(energy, SMOOTH_FRAMES)
    floor, peak = np.percentile(smooth, 5), np.percentile(smooth, 99)
    if peak - floor < 0.05:  # flat signal: silence or stationary noise, nothing to segment by
        return np.full(len(energy), peak > -0.9)
    return smooth > floor + sensitivity * (peak - floor)


def energy_speech_map(energy: np.ndarray) -> SpeechMap:
    """energy: the mean normalised log-mel of each frame (audio.MelFrames.frame_means)."""
    return SpeechMap(speech_frames(energy), np.asarray(energy, np.float64))


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) index spans where mask is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2])]


def silero_speech_chunks(probabilities: np.ndarray) -> np.ndarray:
    """Silero's hysteresis: a run of chunks above SILENCE_THRESHOLD is speech when it reaches
    SPEECH_THRESHOLD somewhere and lasts MIN_SPEECH_CHUNKS."""
    speech = np.zeros(len(probabilities), bool)
    for start, end in runs(probabilities >= SILENCE_THRESHOLD):
        if end - start >= MIN_SPEECH_CHUNKS and probabilities[start:end].max() >= SPEECH_THRESHOLD:
            speech[start:end] = True
    return speech


def silero_speech_map(probabilities: np.ndarray, n_frames: int) -> SpeechMap:
    """The map of n_frames mel frames from Silero's probabilities (one per SILERO_CHUNK samples)."""
    if len(probabilities) == 0:
        return SpeechMap(np.zeros(n_frames, bool), np.zeros(n_frames))
    chunk = np.minimum(np.arange(n_frames) * HOP_LENGTH // SILERO_CHUNK, len(probabilities) - 1)
    speech = silero_speech_chunks(probabilities)[chunk]
    return SpeechMap(speech, probabilities[chunk].astype(np.float64), probabilities[chunk] < SILENCE_THRESHOLD)


def speech_regions(speech: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of [start, end) that hold speech, joined across silences shorter than MIN_SKIPPED_SILENCE."""
    idx = np.flatnonzero(speech[start:end]) + start
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > MIN_SKIPPED_SILENCE)
    firsts = np.concatenate([[idx[0]], idx[breaks + 1]])
    lasts = np.concatenate([idx[breaks], [idx[-1]]])
    regions = [(max(start, int(a) - SPEECH_PAD), min(end, int(b) + 1 + SPEECH_PAD)) for a, b in zip(firsts, lasts)]
    # silences shorter than MIN_SKIPPED_SILENCE at the clip's edges are kept too
    if regions[0][0] - start < MIN_SKIPPED_SILENCE:
        regions[0] = (start, regions[0][1])
    if end - regions[-1][1] < MIN_SKIPPED_SILENCE:
        regions[-1] = (regions[-1][0], end)
    return regions


def clip_regions(speech_map: SpeechMap, clips: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The speech regions inside the clips, in order (the clips vad_filter decodes)."""
    n_frames = len(speech_map.speech)
    return [r for s, e in clips for r in speech_regions(speech_map.speech, s, min(e, n_frames))]


def cut_near(speech_map: SpeechMap, target: int, lo: int, hi: int) -> int:
    """Where to cut a lane within LANE_CUT_SEARCH of target, inside (lo, hi): in the longest pause
    there (a sentence's end, rather than a breath inside it), SPEECH_PAD before the speech resumes (as
    a region after a skipped silence starts; the pause stays with the lane before) or in its middle
    when it is shorter; else at the quietest frame (0.3 s average)."""
    start, end = max(lo + 1, target - LANE_CUT_SEARCH), min(hi - 1, target + LANE_CUT_SEARCH)
    if end <= start:
        return target
    if speech_map.pauses is not None:
        pauses = runs(speech_map.pauses[start:end])
        if pauses:
            first, last = max(pauses, key=lambda run: (run[1] - run[0], -abs(start + run[0] - target)))
            return start + max((first + last) // 2, last - SPEECH_PAD)
    smooth = moving_average(speech_map.quiet[start:end], CUT_SMOOTH_FRAMES)
    return start + int(np.argmin(smooth))


def plan_lanes(
    speech_map: SpeechMap, clips: list[tuple[int, int]], max_lanes: int, min_lane_frames: int = MIN_LANE_FRAMES
) -> list[list[tuple[int, int]]]:
    """Split the speech regions inside the clips into at most max_lanes lanes of similar speech
    duration, each cut at a quiet point; a lane is a list of (start, end) regions in mel frames."""
    regions = clip_regions(speech_map, clips)
    total = sum(e - s for s, e in regions)
    if total == 0:
        return []
    n_lanes = max(1, min(max_lanes, total // min_lane_frames))
    lanes: list[list[tuple[int, int]]] = [[]]
    budget, used = total / n_lanes, 0
    for start, end in regions:
        while len(lanes) < n_lanes and used + (end - start) > budget * len(lanes):
            cut = cut_near(speech_map, start + int(budget * len(lanes) - used), start, end)
            lanes[-1].append((start, cut))
            used += cut - start
            start = cut
            lanes.append([])
        lanes[-1].append((start, end))
        used += end - start
    return [[(s, e) for s, e in lane if e > s] for lane in lanes if any(e > s for s, e in lane)]
