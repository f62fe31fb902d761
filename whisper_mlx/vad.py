"""A fast energy voice-activity detector on the log-mel we already have, and the lane planner that
splits the speech into stretches cut in silence (so batched decoding cuts no word)."""

from __future__ import annotations

import numpy as np

from .audio import FRAMES_PER_SECOND

SMOOTH_FRAMES = 10  # 0.1 s moving average for the speech/non-speech decision
CUT_SMOOTH_FRAMES = 30  # 0.3 s moving average when choosing where to cut
MIN_SKIPPED_SILENCE = 2 * FRAMES_PER_SECOND  # only silences this long are left undecoded
SPEECH_PAD = 30  # frames of context kept around speech (0.3 s)
LANE_CUT_SEARCH = 5 * FRAMES_PER_SECOND  # a lane boundary moves at most 5 s to find a pause
# Shorter lanes put more rows in each step, but each lane start loses the previous text (transcribe.prime_lanes).
MIN_LANE_FRAMES = 60 * FRAMES_PER_SECOND


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


def quietest_near(energy: np.ndarray, target: int, lo: int, hi: int) -> int:
    """The quietest frame (0.3 s average) within LANE_CUT_SEARCH of target, inside (lo, hi)."""
    start, end = max(lo + 1, target - LANE_CUT_SEARCH), min(hi - 1, target + LANE_CUT_SEARCH)
    if end <= start:
        return target
    smooth = moving_average(energy[start:end], CUT_SMOOTH_FRAMES)
    return start + int(np.argmin(smooth))


def plan_lanes(
    energy: np.ndarray, clips: list[tuple[int, int]], max_lanes: int, min_lane_frames: int = MIN_LANE_FRAMES
) -> list[list[tuple[int, int]]]:
    """Split the speech regions inside the clips into at most max_lanes lanes of similar speech
    duration, each cut at a quiet point; a lane is a list of (start, end) regions in mel frames.

    energy: the mean normalised log-mel of each frame (audio.MelFrames.frame_means).
    """
    speech = speech_frames(energy)
    regions = [r for s, e in clips for r in speech_regions(speech, s, min(e, len(energy)))]
    total = sum(e - s for s, e in regions)
    if total == 0:
        return []
    n_lanes = max(1, min(max_lanes, total // min_lane_frames))
    lanes: list[list[tuple[int, int]]] = [[]]
    budget, used = total / n_lanes, 0
    for start, end in regions:
        while len(lanes) < n_lanes and used + (end - start) > budget * len(lanes):
            cut = quietest_near(energy, start + int(budget * len(lanes) - used), start, end)
            lanes[-1].append((start, cut))
            used += cut - start
            start = cut
            lanes.append([])
        lanes[-1].append((start, end))
        used += end - start
    return [[(s, e) for s, e in lane if e > s] for lane in lanes if any(e > s for s, e in lane)]
