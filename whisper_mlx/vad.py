"""A fast energy voice-activity detector on the log-mel we already have, and the window planner
that packs speech into <= 30 s windows cut in silence (so batched decoding cuts no word)."""

from __future__ import annotations

import numpy as np

from .audio import FRAMES_PER_SECOND, N_FRAMES

SMOOTH_FRAMES = 10  # 0.1 s moving average for the speech/non-speech decision
CUT_SMOOTH_FRAMES = 30  # 0.3 s moving average when choosing where to cut
MIN_SKIPPED_SILENCE = 2 * FRAMES_PER_SECOND  # only silences this long are left undecoded
SPEECH_PAD = 30  # frames of context kept around speech (0.3 s)
CUT_SEARCH = 10 * FRAMES_PER_SECOND  # look for the quietest point in a window's last 10 s
CUT_TOLERANCE = 0.05  # normalised log-mel units (about 0.2 in log10 power)


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or len(x) == 0:
        return x.astype(np.float64)
    kernel = np.ones(width) / width
    return np.convolve(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), kernel, mode="valid")


def frame_energy(mel: np.ndarray) -> np.ndarray:
    """Mean normalised log-mel of each frame, (n_frames, n_mels) -> (n_frames,)."""
    return mel.mean(axis=-1).astype(np.float64)


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
    return [(max(start, int(a) - SPEECH_PAD), min(end, int(b) + 1 + SPEECH_PAD)) for a, b in zip(firsts, lasts)]


def cut_region(energy: np.ndarray, start: int, end: int, max_frames: int = N_FRAMES) -> list[tuple[int, int]]:
    """Split [start, end) into windows of at most max_frames, each cut at the quietest point of its
    last CUT_SEARCH frames."""
    smooth = moving_average(energy[start:end], CUT_SMOOTH_FRAMES)  # index 0 is frame `start`
    base = start
    windows = []
    while end - start > max_frames:
        lo = start + max_frames - min(CUT_SEARCH, max_frames // 2)
        hi = start + max_frames
        candidates = smooth[lo - base : hi - base]
        # the latest point almost as quiet as the quietest: long windows, cut in a pause
        quiet = np.flatnonzero(candidates <= candidates.min() + CUT_TOLERANCE)
        cut = lo + int(quiet[-1])
        windows.append((start, cut))
        start = cut
    windows.append((start, end))
    return windows


def plan_windows(mel: np.ndarray, clips: list[tuple[int, int]], max_frames: int = N_FRAMES) -> list[tuple[int, int]]:
    """Windows (start, end) in mel frames covering all speech inside the clips, each <= max_frames."""
    energy = frame_energy(mel)
    speech = speech_frames(energy)
    windows: list[tuple[int, int]] = []
    for clip_start, clip_end in clips:
        for start, end in speech_regions(speech, clip_start, min(clip_end, len(energy))):
            windows.extend(cut_region(energy, start, end, max_frames))
    return [(s, e) for s, e in windows if e > s]
