"""A straightforward per-row implementation of openai-whisper's logit filters (the specification the
vectorised on-device rules are tested against)."""

import numpy as np


def reference_filter(
    logits, sampled, *, ts_begin, eot, no_timestamps, suppress, blank, max_initial_index, with_timestamps=True
):
    """logits (B, V) float64; sampled: list of per-row sampled token lists (same length)."""
    logits = logits.copy()
    n_sampled = len(sampled[0])
    logits[:, suppress] = -np.inf
    if n_sampled == 0 and blank is not None:
        logits[:, blank] = -np.inf
    if not with_timestamps:
        return logits
    logits[:, no_timestamps] = -np.inf
    for k, seq in enumerate(sampled):
        last_was_ts = len(seq) >= 1 and seq[-1] >= ts_begin
        penultimate_was_ts = len(seq) < 2 or seq[-2] >= ts_begin
        if last_was_ts:
            if penultimate_was_ts:
                logits[k, ts_begin:] = -np.inf
            else:
                logits[k, :eot] = -np.inf
        timestamps = [t for t in seq if t >= ts_begin]
        if timestamps:
            last = timestamps[-1] if (last_was_ts and not penultimate_was_ts) else timestamps[-1] + 1
            logits[k, ts_begin:last] = -np.inf
    if n_sampled == 0:
        logits[:, :ts_begin] = -np.inf
        if max_initial_index is not None:
            logits[:, ts_begin + max_initial_index + 1 :] = -np.inf
    with np.errstate(invalid="ignore", divide="ignore"):
        top = logits.max(axis=-1, keepdims=True)
        logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
    for k in range(logits.shape[0]):
        ts = logprobs[k, ts_begin:]
        ts_mass = np.logaddexp.reduce(ts) if np.isfinite(ts).any() else -np.inf
        if ts_mass > logprobs[k, :ts_begin].max():
            logits[k, :ts_begin] = -np.inf
    return logits
