"""A backend whose logits are a fixed pseudo-random function of a row's window and the tokens it has
sampled: decoding through the Backend interface can be compared with a reference that asks the same
function per sequence, without a model."""

from __future__ import annotations

import numpy as np


def scripted_logits(window: int, prompt: tuple, sampled: list[int], n_vocab: int, ts_begin: int, eot: int):
    """(n_vocab,) float32 logits: peaked text, timestamps more or less likely, EOT likelier as text grows."""
    rng = np.random.default_rng([window, len(prompt), *prompt[-3:], len(sampled), *sampled])
    logits = rng.normal(size=n_vocab) * 3.0
    logits[ts_begin:] += rng.uniform(-9.0, -2.0)
    logits[eot] += -4.0 + 1.2 * len(sampled) + rng.normal()
    return logits.astype(np.float32)


class ScriptedState:
    def __init__(self, windows: np.ndarray, pad: np.ndarray, rows_per_window: int):
        self.windows = [int(w) for w in windows]  # each window's seed
        self.pad = [int(p) for p in pad]
        self.rows_per_window = rows_per_window
        self.prompts: list[tuple] = []
        self.sampled: list[list[int]] = []  # per row
        self.offset = 0

    def row_window(self, row: int) -> int:
        return row // self.rows_per_window

    def take(self, windows) -> None:
        windows = [int(w) for w in np.asarray(windows)]
        rows = [w * self.rows_per_window + r for w in windows for r in range(self.rows_per_window)]
        self.sampled = [self.sampled[r] for r in rows]
        self.windows = [self.windows[w] for w in windows]
        self.prompts = [self.prompts[w] for w in windows]

    def rearrange(self, rows) -> None:
        rows = [int(r) for r in np.asarray(rows)]
        assert all(self.row_window(r) == self.row_window(i) for i, r in enumerate(rows)), "a beam left its window"
        self.sampled = [list(self.sampled[r]) for r in rows]


class ScriptedBackend:
    """The Backend interface over scripted_logits; `features` are (W, 1) window seeds."""

    name = "scripted"

    def __init__(self, xp, n_vocab: int, ts_begin: int, eot: int):
        self.xp, self.n_vocab, self.ts_begin, self.eot = xp, n_vocab, ts_begin, eot

    def logits(self, window: int, prompt: tuple, sampled: list[int]) -> np.ndarray:
        return scripted_logits(window, prompt, sampled, self.n_vocab, self.ts_begin, self.eot)

    def new_state(self, features, pad, rows_per_window: int = 1) -> ScriptedState:
        return ScriptedState(np.asarray(features)[:, 0], np.asarray(pad), rows_per_window)

    def prefill(self, state: ScriptedState, tokens: np.ndarray, sot_index: int):
        state.prompts = [tuple(int(t) for t in row[pad:]) for row, pad in zip(tokens, state.pad)]
        state.sampled = [[] for _ in range(len(state.windows) * state.rows_per_window)]
        state.offset = tokens.shape[1]
        logits = np.stack([self.logits(w, p, []) for w, p in zip(state.windows, state.prompts)])
        return self.xp.array(logits), self.xp.array(np.zeros_like(logits))

    def step(self, state: ScriptedState, tokens):
        rows = []
        for row, token in enumerate(np.asarray(tokens).tolist()):
            state.sampled[row].append(int(token))
            window = state.row_window(row)
            rows.append(self.logits(state.windows[window], state.prompts[window], state.sampled[row]))
        state.offset += 1
        return self.xp.array(np.stack(rows))

    def submit(self, *arrays) -> None:
        pass

    def to_host(self, array) -> np.ndarray:
        return np.array(array)
