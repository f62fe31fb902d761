"""openai-whisper's beam search written out per window, as its BeamSearchDecoder and
MaximumLikelihoodRanker do it (one audio at a time, beams as rows of a list, candidates in a dict keyed
by their token sequence): the specification the batched, on-device beam search is tested against."""

import numpy as np


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """log_softmax in float64, returned as float32 (openai: F.log_softmax(logits.float()))."""
    with np.errstate(invalid="ignore", divide="ignore"):
        top = logits.max(axis=-1, keepdims=True)
        out = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
    return out.astype(np.float32)


def reference_beam_search(logits_of, filter_logits, *, beam_size, patience, eot, max_steps):
    """Beam search of one window. logits_of(sampled tokens) -> (V,) logits of the next position;
    filter_logits(logits (B, V) float64, sampled lists) -> filtered logits. Returns the finished
    candidates in openai's order: [(sampled tokens with EOT, sum logprob)]."""
    max_candidates = round(beam_size * (patience or 1.0))
    beams = [[] for _ in range(beam_size)]  # openai starts from beam_size copies of the prompt
    sums = np.zeros(beam_size, np.float32)
    finished: dict[tuple, float] = {}
    for _ in range(max_steps):
        logits = np.stack([logits_of(b) for b in beams]).astype(np.float64)
        logprobs = log_softmax32(filter_logits(logits, beams))
        scores: dict[tuple, np.float32] = {}
        for j, beam in enumerate(beams):
            for token in np.argsort(-logprobs[j], kind="stable")[: beam_size + 1]:
                scores[(*beam, int(token))] = np.float32(sums[j] + logprobs[j, token])
        beams, new_sums, newly = [], [], {}
        for sequence in sorted(scores, key=scores.get, reverse=True):
            if sequence[-1] == eot:
                newly[sequence] = scores[sequence]
            else:
                beams.append(list(sequence))
                new_sums.append(scores[sequence])
                if len(beams) == beam_size:
                    break
        sums = np.array(new_sums, np.float32)
        for sequence in sorted(newly, key=newly.get, reverse=True):
            if len(finished) >= max_candidates:
                break
            finished[sequence] = float(newly[sequence])
        if len(finished) >= max_candidates:
            break
    if len(finished) < beam_size:
        for j in list(np.argsort(sums))[::-1]:
            finished[(*beams[j], eot)] = float(sums[j])
            if len(finished) >= beam_size:
                break
    return list(finished.items())


def reference_rank(candidates, length_penalty):
    """MaximumLikelihoodRanker: the index of the best candidate (tokens up to the first EOT)."""
    scores = []
    for sequence, logprob in candidates:
        length = len(sequence) - 1  # each candidate ends with its one EOT
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        scores.append(logprob / max(penalty, 1e-9))  # openai divides by zero for an empty candidate
    return int(np.argmax(scores))
