"""Beam search's bookkeeping on the host, for a batch of windows: openai-whisper's BeamSearchDecoder.

The device gives, per step, each live beam's top candidates (beam_size + 1 log probabilities and
tokens); this part ranks them per window, sets finished sequences (EOT) aside, picks the next beams
and says which beam each one continues. Everything here is small numpy arrays: beam_size rows per
window, a few candidates per row.

openai's semantics: a candidate's score is its beam's sum of log probabilities plus its own; per window
the candidates are sorted by score, an EOT candidate ranked before the beam_size-th live one finishes,
the first beam_size live ones are the next beams; a window is complete when it has round(beam_size *
patience) finished sequences (the latest ones beyond that are dropped), and then, or when the length
runs out, its live beams are added (with EOT) until it has beam_size candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Step:
    """What one step decided: the next token of every row, the row each continues, and the windows
    (positions among the active ones) that completed."""

    tokens: np.ndarray  # (rows,)
    sources: np.ndarray  # (rows,) row indices, each in its own window
    completed: np.ndarray  # positions of windows complete after this step


class BeamSearch:
    """Beams of the active windows, `beam_size` consecutive rows each (window-major, as the decoder
    state orders them), and the finished sequences of every window."""

    def __init__(self, n_windows: int, beam_size: int, patience: float | None, eot: int):
        self.beam_size = beam_size
        self.max_candidates = round(beam_size * (patience or 1.0))
        self.eot = eot
        self.windows = np.arange(n_windows)  # the request's index of each active window
        self.sequences = np.zeros((n_windows * beam_size, 0), np.int64)  # live beams' sampled tokens
        self.sums = np.zeros(n_windows * beam_size, np.float32)  # float32, as openai's running sums
        self.finished: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(n_windows)]
        self.complete = np.zeros(n_windows, bool)  # per active window

    @property
    def done(self) -> bool:
        return bool(self.complete.all())

    def advance(self, logprobs: np.ndarray, tokens: np.ndarray) -> Step:
        """Candidates (rows, k) of every live row, or of one row per window at the first step (a
        window's beams are alike then: openai's candidates of identical beams are one set)."""
        n_windows, per_window = len(self.windows), self.beam_size
        scores, tokens, beam = self._ranked(logprobs, tokens)
        is_eot = tokens == self.eot
        live_before = np.cumsum(~is_eot, axis=1) - ~is_eot  # live candidates ranked above each one
        chosen = ~is_eot & (live_before < per_window)
        self._collect(is_eot & (live_before < per_window), scores, beam)
        sources = (np.arange(n_windows)[:, None] * per_window + beam[chosen].reshape(n_windows, per_window)).ravel()
        next_tokens = tokens[chosen]
        self.sequences = np.concatenate([self.sequences[sources], next_tokens[:, None]], axis=1)
        self.sums = scores[chosen]
        return Step(next_tokens, sources, self._complete_now())

    def _ranked(self, logprobs: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each window's candidates (W, rows · k) best first: scores, tokens, and the beam (row within the
        window) each extends. Ties keep the order of openai's loop: beam by beam, a row's best first."""
        n_windows, k = len(self.windows), logprobs.shape[1]
        order = np.argsort(-logprobs, axis=1, kind="stable")
        logprobs, tokens = np.take_along_axis(logprobs, order, 1), np.take_along_axis(tokens, order, 1)
        rows_given = len(logprobs) // n_windows
        sums = self.sums.reshape(n_windows, self.beam_size)[:, :rows_given].reshape(-1, 1)
        scores = (sums + logprobs.astype(np.float32)).reshape(n_windows, -1)
        ranked = np.argsort(-scores, axis=1, kind="stable")
        tokens = np.take_along_axis(tokens.reshape(n_windows, -1), ranked, 1)
        return np.take_along_axis(scores, ranked, 1), tokens, ranked // k

    def _collect(self, finishing: np.ndarray, scores: np.ndarray, beam: np.ndarray) -> None:
        """Add each window's finishing candidates, best first, until it has max_candidates."""
        for position in np.flatnonzero(finishing.any(axis=1) & ~self.complete):
            finished = self.finished[self.windows[position]]
            for rank in np.flatnonzero(finishing[position]):
                if len(finished) >= self.max_candidates:
                    break
                row = position * self.beam_size + beam[position, rank]  # the beam it extends (still before the step)
                finished.append((tuple(self.sequences[row].tolist()), float(scores[position, rank])))

    def _complete_now(self) -> np.ndarray:
        """Windows that reached max_candidates this step: their candidates are final now."""
        counts = np.array([len(self.finished[w]) for w in self.windows])
        newly = np.flatnonzero((counts >= self.max_candidates) & ~self.complete)
        for position in newly:
            self._add_live_beams(int(position))
        self.complete[newly] = True
        return newly

    def _add_live_beams(self, position: int) -> None:
        """Too few finished sequences (patience < 1, or the length ran out): the live beams, best first."""
        finished = self.finished[self.windows[position]]
        rows = position * self.beam_size + np.arange(self.beam_size)
        for row in rows[np.argsort(self.sums[rows])[::-1]]:
            if len(finished) >= self.beam_size:
                break
            finished.append((tuple(self.sequences[row].tolist()), float(self.sums[row])))

    def finish(self) -> None:
        """The length ran out: every window still searching takes its live beams."""
        for position in np.flatnonzero(~self.complete):
            self._add_live_beams(int(position))
        self.complete[:] = True

    def compact(self) -> np.ndarray:
        """Drop the complete windows; returns the positions of the windows kept."""
        keep = np.flatnonzero(~self.complete)
        rows = (keep[:, None] * self.beam_size + np.arange(self.beam_size)).reshape(-1)
        self.windows, self.complete = self.windows[keep], self.complete[keep]
        self.sequences, self.sums = self.sequences[rows], self.sums[rows]
        return keep

    def candidates(self, window: int) -> tuple[list[list[int]], np.ndarray]:
        """A window's finished sequences (EOT excluded) and their sums of log probabilities."""
        finished = self.finished[window]
        return [list(tokens) for tokens, _ in finished], np.array([score for _, score in finished])
