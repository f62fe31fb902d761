"""Deterministic noise for the noisy benchmark files and the speech-free tests: brown noise, reversed
babble, and mixing at a signal-to-noise ratio."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
BROWN_FLOOR_HZ = 20.0  # below it the 1/f^2 spectrum is held flat (no drift)
BABBLE_TALKERS = 6


def brown_noise(n_samples: int, seed: int) -> np.ndarray:
    """Brown noise (power falling as 1/f^2 above BROWN_FLOOR_HZ), unit RMS, float32."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(n_samples))
    freqs = np.fft.rfftfreq(n_samples, 1 / SAMPLE_RATE)
    spectrum /= np.maximum(freqs, BROWN_FLOOR_HZ)
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n_samples)
    return (noise / np.sqrt(np.mean(noise**2))).astype(np.float32)


def babble_noise(talkers_source: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """Babble: BABBLE_TALKERS copies of a recording, each time-reversed (no word can be made out) and
    started at its own random offset, summed; unit RMS, float32."""
    rng = np.random.default_rng(seed)
    reversed_source = np.asarray(talkers_source, np.float64)[::-1]
    babble = np.zeros(n_samples)
    for offset in rng.integers(0, len(reversed_source), BABBLE_TALKERS):
        babble += np.resize(np.roll(reversed_source, -int(offset)), n_samples)
    return (babble / np.sqrt(np.mean(babble**2))).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that the speech's mean power is snr_db above the noise's."""
    speech_power = float(np.mean(np.asarray(speech, np.float64) ** 2))
    noise_power = float(np.mean(np.asarray(noise, np.float64) ** 2))
    scale = np.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
    return np.clip(speech + scale * noise[: len(speech)], -1.0, 1.0).astype(np.float32)
