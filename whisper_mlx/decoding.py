"""Decoding of 30-second windows, batched: openai-whisper's semantics with the per-step work kept on
the backend's device (logit filters are vectorised ops over the whole batch; one host sync per step).

The filters are written once over the backend's array module (`mlx.core` or `numpy`, see
`array_module`); the model work goes through the backend interface only. Built from small parts, as
openai's decoder is: a token sampler, logit filters, a ranker for best_of.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import mlx.core as mx
import numpy as np

from .audio import CHUNK_LENGTH, N_FRAMES
from .backends import Backend, backend_for
from .beam_search import BeamSearch, Step
from .errors import DecodingError
from .sampling import array_module, derive_key, gumbel_sample, random_keys
from .tokenizer import Tokenizer, get_tokenizer
from .whisper import Whisper

NEG_INF = float("-inf")


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    if array_module(x) is mx:
        return mx.logsumexp(x, axis=axis, keepdims=keepdims)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # an all -inf slice gives -inf, as in MLX
        total = top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))
    return total if keepdims else np.squeeze(total, axis=axis)


def logsumexp_columns(columns: list):
    """logsumexp over a few (B,) columns: in MLX as elementwise ops (they fuse when compiled; same
    result as mx.logsumexp of their stack), in numpy of their stack."""
    if array_module(columns[0]) is np:
        return logsumexp(np.stack(columns, -1), axis=-1)
    top = columns[0]
    for column in columns[1:]:
        top = mx.maximum(top, column)
    safe_top = mx.where(top == NEG_INF, 0.0, top)  # all -inf stays -inf, not NaN
    total = mx.exp(columns[0] - safe_top)
    for column in columns[1:]:
        total = total + mx.exp(column - safe_top)
    return safe_top + mx.log(total)


def take_rows(array, rows):
    """array[rows] for a list or numpy array of row indices, whichever array module holds it."""
    return array[array_module(array).array(np.asarray(rows))]


def compression_ratio(text: str) -> float:
    """How well the text compresses with zlib: highly repetitive (hallucinated) text scores high."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # "transcribe" or "translate" (X -> English)
    language: str | None = None  # None: detect it from the audio
    temperature: float = 0.0  # 0: greedy; otherwise sample from softmax(logits / temperature)
    sample_len: int | None = None  # maximum number of tokens to sample (default: half the context)
    best_of: int | None = None  # with temperature > 0: candidates sampled per window, best kept
    beam_size: int | None = None  # with temperature 0: beams per window (1 or None: greedy)
    patience: float | None = None  # beam search: stop at round(beam_size * patience) finished candidates
    length_penalty: float | None = None  # ranking: None = length normalisation; else Google NMT's alpha
    prompt: str | Sequence[int] | None = None  # previous text, as context (<|startofprev|> ...)
    prefix: str | Sequence[int] | None = None  # forced start of the text of the window
    suppress_tokens: str | Sequence[int] | None = "-1"  # "-1": openai's non-speech symbols
    suppress_blank: bool = True  # no blank or EOT as the first sampled token
    without_timestamps: bool = False  # sample <|notimestamps|> style text only
    max_initial_timestamp: float | None = 1.0  # first timestamp at most this many seconds
    fp16: bool | None = None  # None: float16 on a GPU, float32 on the CPU (compute dtype of the model)

    def __post_init__(self):
        """Each value on its own; how they combine is checked when decoding starts (verify_options),
        as openai does: transcribe's options carry beam_size for temperature 0 and best_of for the rest."""
        if self.task not in ("transcribe", "translate", "lang_id"):
            raise DecodingError(f"task must be 'transcribe', 'translate' or 'lang_id', got {self.task!r}")
        if self.temperature < 0:
            raise DecodingError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("best_of", "beam_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise DecodingError(f"{name} must be a positive integer, got {value!r}")
        if self.patience is not None and not self.patience > 0:
            raise DecodingError(f"patience must be > 0, got {self.patience}")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise DecodingError("length_penalty (alpha) should be a value between 0 and 1")


def verify_options(options: DecodingOptions) -> DecodingOptions:
    """openai's checks of the options one decoding runs with (DecodingTask's)."""
    if options.beam_size is not None and options.best_of is not None:
        raise DecodingError("beam_size and best_of can't be given together")
    if options.temperature == 0 and options.best_of is not None:
        raise DecodingError("best_of with greedy sampling (temperature=0) is not compatible")
    if options.beam_size is not None and options.temperature > 0:
        raise DecodingError("beam search decodes at temperature 0 (sampling uses best_of)")
    if options.patience is not None and options.beam_size is None:
        raise DecodingError("patience requires beam_size to be given")
    if options.beam_size is not None and round(options.beam_size * (options.patience or 1.0)) < 1:
        raise DecodingError(f"beam_size {options.beam_size} with patience {options.patience} keeps no candidate")
    if options.task == "lang_id":
        raise DecodingError("task='lang_id' only detects the language: decode() returns it without decoding text")
    return options


@dataclass
class DecodingResult:
    audio_features: Any
    language: str
    language_probs: dict[str, float] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = float("nan")
    no_speech_prob: float = float("nan")
    temperature: float = float("nan")
    compression_ratio: float = float("nan")


# --------------------------------------------------------------------------------- logit filters


class SuppressTokens:
    """Static suppression (suppress_tokens) plus, at the first sampled position, blank and EOT."""

    def __init__(self, n_vocab: int, suppressed: Sequence[int], blank: Sequence[int] | None):
        always = np.zeros(n_vocab, np.float32)
        always[list(suppressed)] = NEG_INF
        first = always.copy()
        if blank is not None:
            first[list(blank)] = NEG_INF
        self.masks: dict[Any, tuple[Any, Any]] = {np: (first, always), mx: (mx.array(first), mx.array(always))}
        mx.eval(self.masks[mx])  # compiled steps capture them as constants
        self.key = (tuple(suppressed), None if blank is None else tuple(blank))

    def apply(self, logits: mx.array, n_sampled: int) -> mx.array:
        first, always = self.masks[array_module(logits)]
        return logits + (first if n_sampled == 0 else always)


@dataclass(frozen=True)
class _VocabMasks:
    """The vocabulary-wide constants of the timestamp rules, in one array module."""

    vocab: Any  # (V,) token ids
    is_timestamp: Any
    is_text: Any  # text proper (EOT excluded)
    is_text_or_eot: Any
    first_mask: Any  # additive mask of the first sampled position
    special_bias: Any  # additive mask of the specials between EOT and the timestamps
    first_stamps: Any  # first_mask over the timestamps only
    ts_vocab: Any  # the timestamp token ids

    def to_mlx(self) -> _VocabMasks:
        return _VocabMasks(*(mx.array(getattr(self, f.name)) for f in fields(self)))


class ApplyTimestampRules:
    """openai's timestamp rules as batch-wide array ops, from a small per-row state on the device:

    - timestamps come in pairs (a start and an end), except directly before EOT;
    - timestamps never decrease, and a segment has non-zero length;
    - the first sampled token is a timestamp no later than max_initial_timestamp;
    - if the probability mass on timestamps beats every text token, a timestamp is sampled.
    """

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, max_initial_timestamp_index: int | None):
        self.ts_begin = tokenizer.timestamp_begin
        self.eot = tokenizer.eot
        self.no_timestamps = tokenizer.no_timestamps
        self.max_initial_timestamp_index = max_initial_timestamp_index
        vocab = np.arange(n_vocab)
        is_text_or_eot = vocab < self.ts_begin
        first = np.where(is_text_or_eot | (vocab == self.no_timestamps), NEG_INF, 0.0).astype(np.float32)
        if max_initial_timestamp_index is not None:
            first = np.where(vocab > self.ts_begin + max_initial_timestamp_index, NEG_INF, first).astype(np.float32)
        special = vocab[self.eot + 1 : self.ts_begin] == self.no_timestamps
        masks = _VocabMasks(
            vocab,
            vocab >= self.ts_begin,
            vocab < self.eot,
            is_text_or_eot,
            first,
            np.where(special, NEG_INF, 0.0).astype(np.float32),
            first[self.ts_begin :],
            vocab[self.ts_begin :],
        )
        self.masks = {np: masks, mx: masks.to_mlx()}
        mx.eval(*(getattr(self.masks[mx], f.name) for f in fields(masks)))  # constants of compiled steps

    def apply(self, logits, history: TimestampHistory, n_sampled: int):
        xp = array_module(logits)
        masks = self.masks[xp]
        if n_sampled == 0:
            logits = logits + masks.first_mask
        else:
            logits = xp.where(self._row_mask(history, n_sampled, masks), NEG_INF, logits)
        return self._prefer_timestamps(logits, masks)

    def _row_mask(self, history: TimestampHistory, n_sampled: int, masks: _VocabMasks):
        xp = array_module(history.last)
        last_ts = history.last >= self.ts_begin
        penultimate_ts = history.penultimate >= self.ts_begin if n_sampled >= 2 else xp.ones_like(last_ts)
        pair_closed = (last_ts & penultimate_ts)[:, None]  # two timestamps in a row: text must follow
        pair_open = (last_ts & ~penultimate_ts)[:, None]  # a lone timestamp: close it (or EOT)
        mask = (pair_closed & masks.is_timestamp) | (pair_open & masks.is_text)
        # no timestamp below the last one; strictly above it unless it closes the pair
        lowest = xp.where(last_ts & ~penultimate_ts, history.last_timestamp, history.last_timestamp + 1)
        below = masks.is_timestamp & (masks.vocab[None, :] < lowest[:, None])
        mask = mask | (below & (history.last_timestamp >= 0)[:, None])
        return mask | (masks.vocab == self.no_timestamps)

    def greedy(self, logits: mx.array, history: TimestampHistory, n_sampled: int) -> tuple[mx.array, mx.array]:
        """Greedy token and its log probability under the rules, without building the masked logits.

        Same result as argmax/log_softmax of apply(), but the 50k-wide text part is only reduced
        (max, argmax, logsumexp) and the per-row rules act on those statistics: MLX's CPU elementwise
        kernels are scalar, so each full-vocabulary pass costs milliseconds per step.
        """
        view = self._regions(logits, history, n_sampled)
        regions, allowed = view.regions, view.allowed
        maxima = [where_allowed(ok, r.max) for ok, r in zip(allowed, regions)] + [regions[3].max]
        best, tokens = first_maximum(maxima, [r.token for r in regions])
        logprob = best - logsumexp_columns(view.lse_columns())
        xp = array_module(logits)
        return tokens.astype(xp.int32), logprob.astype(logits.dtype)

    def top_candidates(self, logits, history: TimestampHistory, n_sampled: int, k: int):
        """The k most likely tokens of each row under the rules (unordered) and their log probabilities:
        top-k of log_softmax(apply()), from the regions' reductions and their own top-k."""
        xp = array_module(logits)
        view = self._regions(logits, history, n_sampled, argmax=False)
        eot_value = view.regions[1].max[:, None]
        parts = [
            (*top_k(view.text, k), 0, view.allowed[0]),
            (eot_value, xp.zeros(eot_value.shape, xp.int32), self.eot, view.allowed[1]),
            (*top_k(view.special, k), self.eot + 1, view.allowed[2]),
            (*top_k(view.stamps, k), self.ts_begin, None),  # the timestamps' bias is already applied
        ]
        values = xp.concatenate([v if ok is None else xp.where(ok[:, None], v, NEG_INF) for v, _, _, ok in parts], 1)
        tokens = xp.concatenate([t + first for _, t, first, _ in parts], 1)
        values, tokens = largest(values, tokens, k)
        return values - logsumexp(view.lses(), axis=-1)[:, None], tokens

    def _regions(self, logits, history: TimestampHistory, n_sampled: int, argmax: bool = True) -> _RuleRegions:
        """The vocabulary in four regions (text, EOT, the other specials, timestamps) with the rules
        applied: the timestamps' additive mask, and per row which other regions may be sampled (with
        argmax, each region's best token too)."""
        eot, ts_begin, xp = self.eot, self.ts_begin, array_module(logits)
        masks = self.masks[xp]
        text, special, stamps = logits[:, :eot], logits[:, eot + 1 : ts_begin], logits[:, ts_begin:]
        special = special + masks.special_bias  # <|notimestamps|> is never sampled
        flags = self._row_flags(history, n_sampled)
        stamps = stamps + self._timestamp_bias(history, flags, masks.first_stamps, masks.ts_vocab)
        text_ok, eot_ok = self._text_allowed(flags, logits.shape[0], xp)
        regions = [
            _Region.of(text, 0, argmax),
            _Region.constant(logits[:, eot], eot),  # one column: its max and logsumexp are itself
            _Region.of(special, eot + 1),
            _Region.of(stamps, ts_begin),
        ]
        allowed = [text_ok, eot_ok, eot_ok]
        best_text, _ = first_maximum([where_allowed(ok, r.max) for ok, r in zip(allowed, regions)])
        not_forced = ~(regions[3].lse > best_text)  # forced: timestamp mass beats every text token
        allowed = [not_forced if ok is None else ok & not_forced for ok in allowed]
        empty = ~(allowed[0] | allowed[1] | allowed[2]) & (regions[3].max == NEG_INF)
        allowed[1] = allowed[1] | empty  # defensive: a row keeps at least one candidate (EOT)
        regions[1] = _Region.constant(xp.where(empty, 0.0, regions[1].max).astype(logits.dtype), eot)
        return _RuleRegions(text, special, stamps, regions, allowed)

    def _row_flags(self, history: TimestampHistory, n_sampled: int):
        """Per row (B,): was the last token a timestamp, and the one before (True before the second
        token)? None before the first token."""
        if n_sampled == 0:
            return None
        last_ts = history.last >= self.ts_begin
        penultimate_ts = (
            history.penultimate >= self.ts_begin if n_sampled >= 2 else array_module(last_ts).ones_like(last_ts)
        )
        return last_ts, penultimate_ts

    def _timestamp_bias(self, history: TimestampHistory, flags, first_stamps, ts_vocab):
        """Additive (B, n_timestamps) mask of the timestamp tokens the rules forbid."""
        if flags is None:
            return first_stamps[None, :]
        xp = array_module(history.last)
        last_ts, penultimate_ts = flags
        lowest = xp.where(last_ts & ~penultimate_ts, history.last_timestamp, history.last_timestamp + 1)
        below = (ts_vocab[None, :] < lowest[:, None]) & (history.last_timestamp >= 0)[:, None]
        banned = below | (last_ts & penultimate_ts)[:, None]
        return xp.where(banned, NEG_INF, 0.0).astype(first_stamps.dtype)

    def _text_allowed(self, flags, batch: int, xp):
        """Per row: may text proper be sampled, and may EOT (and the other specials)? (None: yes, all)"""
        if flags is None:
            no = xp.zeros((batch,), xp.bool_)
            return no, no
        last_ts, penultimate_ts = flags
        return ~(last_ts & ~penultimate_ts), None  # None: every row

    def _prefer_timestamps(self, logits, masks: _VocabMasks):
        xp = array_module(logits)
        logprobs = logits - logsumexp(logits, axis=-1, keepdims=True)
        timestamp_mass = logsumexp(logprobs[:, self.ts_begin :], axis=-1)
        best_text = xp.max(logprobs[:, : self.ts_begin], axis=-1)
        force = (timestamp_mass > best_text)[:, None] & masks.is_text_or_eot
        logits = xp.where(force, NEG_INF, logits)
        # defensive: a row must keep at least one candidate (EOT)
        empty = xp.max(logits, axis=-1, keepdims=True) == NEG_INF
        return xp.where(empty & (masks.vocab == self.eot), 0.0, logits)


@dataclass
class _RuleRegions:
    """One step's logits in regions under the timestamp rules (ApplyTimestampRules._regions)."""

    text: Any  # (B, eot) text proper
    special: Any  # (B, ts_begin - eot - 1) the specials after EOT, <|notimestamps|> masked
    stamps: Any  # (B, n_timestamps) the timestamps, the rules' mask added
    regions: list[_Region]  # reductions of text, EOT, specials, timestamps
    allowed: list  # (B,) bool per row: may text, EOT, the specials be sampled (timestamps: by their mask)

    def lse_columns(self) -> list:
        """(B,) logsumexp of each region as far as allowed: their logsumexp is log_softmax's normaliser."""
        return [*(where_allowed(ok, r.lse) for ok, r in zip(self.allowed, self.regions)), self.regions[3].lse]

    def lses(self):
        """lse_columns stacked, (B, 4)."""
        return array_module(self.regions[3].lse).stack(self.lse_columns(), -1)


@dataclass
class _Region:
    """Reductions of one slice of the vocabulary: max, its token id, and logsumexp."""

    max: mx.array
    token: Any  # (B,) the best token (an int for a one-token region), or None where not asked for
    lse: mx.array

    @classmethod
    def of(cls, logits: mx.array, first_token: int, argmax: bool = True) -> _Region:
        xp = array_module(logits)
        top = xp.max(logits, axis=-1)
        lse = logsumexp(logits, axis=-1)  # one kernel in MLX; an all-masked row gives -inf
        token = xp.argmax(logits, axis=-1).astype(xp.int32) + first_token if argmax else None
        return cls(top, token, lse)

    @classmethod
    def constant(cls, value: mx.array, token: int) -> _Region:
        return cls(value, token, value)


def where_allowed(allowed, values):
    """values where allowed (per row; None: every row), else -inf."""
    return values if allowed is None else array_module(values).where(allowed, values, NEG_INF)


def first_maximum(values: list, labels: list | None = None):
    """The elementwise maximum of (B,) arrays and, with labels (arrays or constants), the label of the
    first array reaching it: argmax over their stack, as elementwise ops only (they fuse when compiled)."""
    xp = array_module(values[0])
    best = values[0]
    for value in values[1:]:
        best = xp.maximum(best, value)
    if labels is None:
        return best, None
    chosen = labels[-1]
    for value, label in zip(values[-2::-1], labels[-2::-1]):
        chosen = xp.where(value == best, label, chosen)
    return best, chosen


@dataclass
class TimestampHistory:
    """What the timestamp rules need to know of each row's sampled tokens, kept on the device."""

    last: mx.array  # (B,) last sampled token (or -1)
    penultimate: mx.array  # (B,) the one before (or -1)
    last_timestamp: mx.array  # (B,) last sampled timestamp token (or -1)

    @classmethod
    def empty(cls, batch: int, xp=mx) -> TimestampHistory:
        none = xp.full((batch,), -1, xp.int32)
        return cls(none, none, none)

    def push(self, tokens: mx.array, ts_begin: int) -> TimestampHistory:
        last_timestamp = array_module(tokens).where(tokens >= ts_begin, tokens, self.last_timestamp)
        return TimestampHistory(tokens, self.last, last_timestamp)

    def take(self, rows: mx.array) -> TimestampHistory:
        return TimestampHistory(self.last[rows], self.penultimate[rows], self.last_timestamp[rows])


# ------------------------------------------------------------------------------ token selection

TOP_K_GROUP = 64  # columns per group of top_k: a row's group maxima are a 64th of its width


def top_k(x, k: int):
    """The k largest entries of each row of x (B, V), unordered, and their columns (int32). The columns
    fall into groups of TOP_K_GROUP (strided: column c in group c mod V // TOP_K_GROUP, so that the
    group maxima are one elementwise pass); the maxima name the k groups that hold the k largest (k
    groups hold k entries at least as large as any other group's), and only those are searched: a
    partition of whole 50k-wide rows is slow on the CPU (docs/performance.md)."""
    xp = array_module(x)
    rows, width = x.shape
    k = min(k, width)
    stride = width // TOP_K_GROUP
    if stride <= k:
        return largest(x, xp.broadcast_to(xp.arange(width, dtype=xp.int32)[None], (rows, width)), k)
    grouped = x[:, : stride * TOP_K_GROUP].reshape(rows, TOP_K_GROUP, stride)
    best = xp.argpartition(-xp.max(grouped, axis=1), k - 1, axis=-1)[:, :k].astype(xp.int32)
    columns = (best[:, :, None] + stride * xp.arange(TOP_K_GROUP, dtype=xp.int32)).reshape(rows, -1)
    tail = xp.arange(stride * TOP_K_GROUP, width, dtype=xp.int32)
    columns = xp.concatenate([columns, xp.broadcast_to(tail[None], (rows, tail.shape[0]))], axis=1)
    return largest(xp.take_along_axis(x, columns, axis=1), columns, k)


def largest(values, labels, k: int):
    """The k largest of each row of values (B, n) and their labels, unordered."""
    xp = array_module(values)
    k = min(k, values.shape[1])
    pick = xp.argpartition(-values, k - 1, axis=-1)[:, :k]
    return xp.take_along_axis(values, pick, axis=-1), xp.take_along_axis(labels, pick, axis=-1).astype(xp.int32)


def select_tokens(logits, temperature: float, row_keys=None, step: int = 0):
    """Greedy (temperature 0) or a true sample from softmax(logits / temperature), drawn from each
    row's key (uint32, (B,)) and the step (sampling.py): the same draws on every backend."""
    xp = array_module(logits)
    if temperature == 0:
        return xp.argmax(logits, axis=-1).astype(xp.int32)
    if row_keys is None:
        raise ValueError("sampling needs a key per row")
    return gumbel_sample(logits, temperature, row_keys, step)


def candidate_keys(window_keys: Sequence[int], temperature: float, n_candidates: int) -> np.ndarray:
    """The sampling key of each candidate row (n_candidates per window, window-major) at a rung."""
    rung = round(temperature * 1_000_000)
    keys = [derive_key(key, rung, j) for key in window_keys for j in range(n_candidates)]
    return np.array(keys, dtype=np.uint32)


def rank_candidates(sum_logprobs: np.ndarray, lengths: np.ndarray, length_penalty: float | None) -> int:
    """Index of the best candidate by length-normalised log probability (openai's ranker)."""
    penalty = lengths.astype(np.float64) if length_penalty is None else ((5 + lengths) / 6) ** length_penalty
    return int(np.argmax(sum_logprobs / np.maximum(penalty, 1e-9)))


# --------------------------------------------------------------------------------- the task


@dataclass
class _Rows:
    """The rows still being decoded: which request each one serves, and their device state."""

    index: np.ndarray  # (B,) position of each active row in the request
    sum_logprobs: mx.array  # (B,)
    finished: mx.array  # (B,) bool
    history: TimestampHistory
    keys: Any  # (B,) uint32 sampling keys on the device, or None when greedy
    n_sampled: int = 0  # tokens sampled so far (steps built, not necessarily evaluated)

    @classmethod
    def start(cls, batch: int, xp, keys: np.ndarray | None = None) -> _Rows:
        return cls(
            np.arange(batch),
            xp.zeros((batch,), xp.float32),
            xp.zeros((batch,), xp.bool_),
            TimestampHistory.empty(batch, xp),
            None if keys is None else xp.array(keys),
        )

    def keep(self, kept: np.ndarray, xp) -> None:
        rows = xp.array(kept)
        self.index = self.index[kept]
        self.sum_logprobs, self.finished = self.sum_logprobs[rows], self.finished[rows]
        self.history = self.history.take(rows)
        self.keys = None if self.keys is None else self.keys[rows]


@dataclass
class _SampledStep:
    """One step's selection on its way to the host: `out` (2, B) float32 holds the tokens and the running
    sums of log probabilities of the rows `index` (request positions) as they were when it was built."""

    out: Any
    index: np.ndarray


class _HostRecord:
    """Every row's tokens and sum of log probabilities, filled in on the host as steps arrive."""

    def __init__(self, batch: int, max_steps: int, eot: int):
        self.tokens = np.full((batch, max(max_steps, 1)), eot, np.int64)
        self.sum_logprobs = np.zeros(batch, np.float64)
        self.finished = np.zeros(batch, bool)
        self.eot = eot

    def add(self, step: int, out: np.ndarray, index: np.ndarray) -> None:
        tokens = out[0].astype(np.int64)
        self.tokens[index, step] = tokens
        self.sum_logprobs[index] = out[1]
        self.finished[index] |= tokens == self.eot

    def sequence(self, row: int) -> list[int]:
        """The row's tokens up to its first EOT (excluded)."""
        seq = self.tokens[row].tolist()
        return seq[: seq.index(self.eot)] if self.eot in seq else seq


GREEDY_CACHE_SIZE = 32  # compiled greedy steps kept: one per (rules, phase, batch rows)
_compiled_greedy: OrderedDict[tuple, Any] = OrderedDict()


def compiled_greedy(key: tuple, build) -> Any:
    """mx.compile(build()) for `key`, from a bounded LRU cache: one entry per input shape, so evicting
    an entry releases its traced graph (batch shapes vary from batch to batch)."""
    function = _compiled_greedy.pop(key, None)
    if function is None:
        function = mx.compile(build())
    _compiled_greedy[key] = function
    while len(_compiled_greedy) > GREEDY_CACHE_SIZE:
        _compiled_greedy.popitem(last=False)
    return function


class DecodingTask:
    """Decodes batches of encoded windows with one set of options.

    Each row may have its own prompt (rows are left-padded) and, for multilingual models, its own
    language; every row shares the options, the temperature and the length of the SOT sequence.
    """

    def __init__(
        self,
        model: Whisper,
        options: DecodingOptions,
        backend: Backend | None = None,
        *,
        pipeline: bool = True,
        compile_steps: bool = True,
    ):
        self.model = model
        self.pipeline = pipeline  # False: the host waits for step i+1's forward pass with step i's flags
        self.compile_steps = compile_steps  # mx.compile the greedy step's filters and selection
        self.options = verify_options(options)
        self.backend = backend or backend_for(model)
        self.tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=options.language or "en",
            task=options.task,
        )
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = options.sample_len or self.n_ctx // 2
        self.prefix = self._encode_text(options.prefix)
        self.suppressor = SuppressTokens(
            model.dims.n_vocab, self._suppressed_tokens(), self._blank_tokens() if options.suppress_blank else None
        )
        self.timestamp_rules = None
        if not options.without_timestamps:
            precision = CHUNK_LENGTH / model.dims.n_audio_ctx  # 0.02 s per timestamp token
            max_index = None
            if options.max_initial_timestamp is not None:
                max_index = round(options.max_initial_timestamp / precision)
            self.timestamp_rules = ApplyTimestampRules(self.tokenizer, model.dims.n_vocab, max_index)

    def _encode_text(self, text: str | Sequence[int] | None) -> list[int]:
        if text is None:
            return []
        if isinstance(text, str):
            return self.tokenizer.encode(" " + text.strip())
        return list(text)

    def _blank_tokens(self) -> list[int]:
        return [*self.tokenizer.encode(" "), self.tokenizer.eot]

    def _suppressed_tokens(self) -> list[int]:
        spec = self.options.suppress_tokens
        if isinstance(spec, str):
            spec = [int(t) for t in spec.split(",") if t.strip()]
        tokens = set(spec or [])
        if -1 in tokens:
            tokens.discard(-1)
            tokens.update(self.tokenizer.non_speech_tokens)
        tok = self.tokenizer
        tokens.update([tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech])
        return sorted(t for t in tokens if 0 <= t < self.model.dims.n_vocab)

    def sot_sequence(self, language: str | None) -> list[int]:
        tok = self.tokenizer
        sequence = [tok.sot]
        if self.model.is_multilingual:
            sequence += [
                tok.to_language_token(language or self.options.language or "en"),
                tok.translate if self.options.task == "translate" else tok.transcribe,
            ]
        if self.options.without_timestamps:
            sequence.append(tok.no_timestamps)
        return sequence

    def initial_tokens(self, prompt: str | Sequence[int] | None, language: str | None) -> list[int]:
        """[<|startofprev|> prompt…] <|startoftranscript|> [lang task] [<|notimestamps|>] [prefix…]"""
        prompt_tokens = self._encode_text(prompt)
        head = []
        if prompt_tokens:
            head = [self.tokenizer.sot_prev, *prompt_tokens[-(self.n_ctx // 2 - 1) :]]
        return head + self.sot_sequence(language) + self.prefix

    def run(
        self,
        audio_features: mx.array,
        prompts: Sequence | None = None,
        languages: Sequence[str | None] | None = None,
        temperature: float | None = None,
        keys: Sequence[int] | None = None,
    ) -> list[DecodingResult]:
        """Decode each row of audio_features (B, T, D): beam search with beam_size > 1, else greedy, or
        best_of candidates per row when sampling. keys: one integer per row that, with the
        temperature, fixes its samples (default: drawn from MLX's generator)."""
        batch = audio_features.shape[0]
        temperature = self.options.temperature if temperature is None else temperature
        prompts = list(prompts) if prompts is not None else [self.options.prompt] * batch
        languages = list(languages) if languages is not None else [self.options.language] * batch
        if temperature == 0 and self.searches_beams:
            rows = [self.initial_tokens(p, lang) for p, lang in zip(prompts, languages)]
            found = self._decode_beams(audio_features, rows)
            return [self._result(audio_features[b], languages[b], *found[b], temperature) for b in range(batch)]
        n_candidates = (self.options.best_of or 1) if temperature > 0 else 1
        rows = [self.initial_tokens(p, lang) for p, lang in zip(prompts, languages) for _ in range(n_candidates)]
        features = audio_features
        if n_candidates > 1:
            features = take_rows(audio_features, np.repeat(np.arange(batch), n_candidates))
        row_keys = None
        if temperature > 0:
            window_keys = list(keys) if keys is not None else random_keys(batch).tolist()
            row_keys = candidate_keys(window_keys, temperature, n_candidates)
        tokens, sum_logprobs, no_speech = self._decode_rows(features, rows, temperature, row_keys)
        results = []
        for b in range(batch):
            group = range(b * n_candidates, (b + 1) * n_candidates)
            lengths = np.array([len(tokens[i]) for i in group])
            best = group[rank_candidates(sum_logprobs[list(group)], lengths, self.options.length_penalty)]
            results.append(
                self._result(
                    audio_features[b], languages[b], tokens[best], sum_logprobs[best], no_speech[best], temperature
                )
            )
        return results

    @property
    def searches_beams(self) -> bool:
        """Beam search unless it would be greedy decoding: one beam that stops at its first EOT."""
        beam_size = self.options.beam_size or 1
        return beam_size > 1 or round(beam_size * (self.options.patience or 1.0)) > 1

    def _result(self, features, language, tokens, sum_logprob, no_speech, temperature) -> DecodingResult:
        text = self.tokenizer.decode(tokens).strip()
        return DecodingResult(
            audio_features=features,
            language=language or self.options.language or ("en" if not self.model.is_multilingual else ""),
            tokens=tokens,
            text=text,
            avg_logprob=float(sum_logprob) / (len(tokens) + 1),
            no_speech_prob=float(no_speech),
            temperature=temperature,
            compression_ratio=compression_ratio(text),
        )

    def _filter_logits(self, logits, history: TimestampHistory, n_sampled: int):
        logits = self.suppressor.apply(logits, n_sampled)
        if self.timestamp_rules is not None:
            logits = self.timestamp_rules.apply(logits, history, n_sampled)
        return logits

    def _prefill(self, features, rows: list[list[int]], rows_per_window: int = 1):
        """Feed every window's initial tokens (left-padded); return the logits of the last position, the
        no-speech probability at <|startoftranscript|>, and the decoder state (rows_per_window rows per
        window, each holding the window's prompt)."""
        length = max(len(r) for r in rows)
        pad = [length - len(r) for r in rows]
        tokens = np.array([[self.tokenizer.eot] * p + r for p, r in zip(pad, rows)])
        sot_index = length - len(self.sot_sequence(None)) - len(self.prefix)
        state = self.backend.new_state(features, np.array(pad), rows_per_window)
        logits, sot_logits = self.backend.prefill(state, tokens, sot_index)
        no_speech = array_module(sot_logits).exp(sot_logits[:, self.tokenizer.no_speech] - logsumexp(sot_logits))
        return logits, no_speech, state

    def _sample_step(self, logits, rows: _Rows, temperature: float) -> _SampledStep:
        """Filter and select one token per row, updating the rows' device state (a finished row keeps
        emitting EOT and adds nothing to its sum); the selection is submitted to the device at once when
        pipelining, so that the host can wait on it alone."""
        xp = array_module(logits)
        if temperature == 0 and xp is mx and self.compile_steps:
            update = self._compiled_greedy_update(rows.n_sampled, logits.shape[0])
        else:
            update = self._row_update(rows.n_sampled, temperature, rows.keys)
        history = rows.history
        tokens, rows.sum_logprobs, rows.finished, last_timestamp, out = update(
            logits, history.last, history.penultimate, history.last_timestamp, rows.sum_logprobs, rows.finished
        )
        rows.history = TimestampHistory(tokens, history.last, last_timestamp)
        rows.n_sampled += 1
        if self.pipeline:
            self.backend.submit(out, tokens, rows.sum_logprobs, rows.finished, last_timestamp)
        return _SampledStep(out, rows.index)

    def _row_update(self, n_sampled: int, temperature: float, keys=None):
        """The step's selection and row bookkeeping as one pure function of device arrays (compilable;
        keys: the rows' sampling keys): (logits, last, penultimate, last_timestamp, sum_logprobs,
        finished) -> (tokens, sum_logprobs, finished, last_timestamp, out)."""
        eot, ts_begin = self.tokenizer.eot, self.tokenizer.timestamp_begin

        def update(logits, last, penultimate, last_timestamp, sum_logprobs, finished):
            xp = array_module(logits)
            history = TimestampHistory(last, penultimate, last_timestamp)
            tokens, chosen = self._select(logits, history, n_sampled, temperature, keys)
            sum_logprobs = sum_logprobs + xp.where(finished, 0.0, chosen)
            tokens = xp.where(finished, eot, tokens)
            finished = finished | (tokens == eot)
            last_timestamp = xp.where(tokens >= ts_begin, tokens, last_timestamp)
            out = xp.stack([tokens.astype(xp.float32), sum_logprobs.astype(xp.float32)])
            return tokens, sum_logprobs, finished, last_timestamp, out

        return update

    def _select(self, logits, history: TimestampHistory, n_sampled: int, temperature: float, keys=None):
        """Each row's token after the logit filters (greedy, or sampled) and its log probability."""
        xp = array_module(logits)
        if temperature == 0 and self.timestamp_rules is not None:
            logits = self.suppressor.apply(logits, n_sampled)
            return self.timestamp_rules.greedy(logits, history, n_sampled)
        logits = self._filter_logits(logits, history, n_sampled)
        tokens = select_tokens(logits, temperature, keys, n_sampled)
        logprobs = logits - logsumexp(logits, axis=-1, keepdims=True)
        return tokens, xp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]

    def _compiled_greedy_update(self, n_sampled: int, rows: int):
        """_row_update at temperature 0, compiled: the rules only tell apart the first, second and later
        steps, so three phases per batch size."""
        phase = min(n_sampled, 2)
        key = (self.rules_key, phase, rows)
        return compiled_greedy(key, lambda: self._row_update(phase, 0.0))

    @property
    def rules_key(self) -> tuple:
        """What the greedy step's filters depend on, for sharing compiled steps between tasks."""
        rules = self.timestamp_rules
        ts_rules = (
            None
            if rules is None
            else (rules.ts_begin, rules.eot, rules.no_timestamps, rules.max_initial_timestamp_index)
        )
        return (self.model.dims.n_vocab, self.suppressor.key, ts_rules, self.tokenizer.eot)

    def _decode_rows(self, features, rows_tokens: list[list[int]], temperature: float, keys=None):
        """Decode all rows (keys: their sampling keys when temperature > 0); returns per-row sampled
        tokens (EOT excluded), sum logprobs, no-speech probs.

        Pipelined as mlx-lm's generate_step: step i+1 is built and submitted before the host waits on
        step i's selection, which was submitted on its own earlier, so the device computes step i+1 while
        the host reads step i and builds the next graph. Rows are dropped on flags one step old."""
        backend, batch = self.backend, len(rows_tokens)
        logits, no_speech, state = self._prefill(features, rows_tokens)
        rows = _Rows.start(batch, backend.xp, keys)
        max_steps = min(self.sample_len, self.n_ctx - max(len(r) for r in rows_tokens))
        record = _HostRecord(batch, max_steps, self.tokenizer.eot)
        pending = self._sample_step(logits, rows, temperature)
        for step in range(max_steps):
            ahead = None
            if step + 1 < max_steps:
                ahead = self._sample_step(backend.step(state, rows.history.last), rows, temperature)
                if not self.pipeline:  # the old grouping: step i's selection evaluated with step i+1
                    backend.submit(ahead.out, pending.out)
            record.add(step, backend.to_host(pending.out), pending.index)  # the one host wait of the step
            finished = record.finished[rows.index]
            if ahead is None or finished.all():
                break
            if finished.sum() * 4 >= len(finished):  # drop finished rows so they stop costing compute
                kept = np.flatnonzero(~finished)
                state.take(backend.xp.array(kept))
                rows.keep(kept, backend.xp)
            pending = ahead
        return [record.sequence(i) for i in range(batch)], record.sum_logprobs, backend.to_host(no_speech)

    def _decode_beams(self, features, windows: list[list[int]]) -> list[tuple[list[int], float, float]]:
        """Beam search over every window at once: its beams are rows of each step; per window, the
        ranked best finished sequence (EOT excluded), its sum of log probabilities and no-speech
        probability. One host wait per step: the beams' top candidates."""
        backend, beam_size = self.backend, cast(int, self.options.beam_size)
        logits, no_speech, state = self._prefill(features, windows, rows_per_window=beam_size)
        search = BeamSearch(len(windows), beam_size, self.options.patience, self.tokenizer.eot)
        history = TimestampHistory.empty(len(windows), backend.xp)
        max_steps = min(self.sample_len, self.n_ctx - max(len(w) for w in windows))
        for step in range(max_steps):
            values, tokens = self._beam_candidates(logits, history, step, beam_size + 1)
            backend.submit(values, tokens)
            chosen = search.advance(backend.to_host(values), backend.to_host(tokens))
            if search.done or step + 1 == max_steps:
                break
            history = self._follow_beams(state, history, chosen, first=step == 0)
            next_tokens = chosen.tokens
            if np.count_nonzero(search.complete) * 4 >= len(search.complete):  # complete windows stop costing compute
                rows = self._drop_complete_windows(search, state)
                history, next_tokens = history.take(backend.xp.array(rows)), next_tokens[rows]
            logits = backend.step(state, backend.xp.array(next_tokens.astype(np.int32)))
        search.finish()
        no_speech = backend.to_host(no_speech)
        return [self._best_of_window(search, w, float(no_speech[w])) for w in range(len(windows))]

    def _beam_candidates(self, logits, history: TimestampHistory, n_sampled: int, k: int):
        """Each row's k most likely tokens after the logit filters, and their log probabilities."""
        logits = self.suppressor.apply(logits, n_sampled)
        if self.timestamp_rules is not None:
            return self.timestamp_rules.top_candidates(logits, history, n_sampled, k)
        values, tokens = top_k(logits, k)
        return values - logsumexp(logits, axis=-1, keepdims=True), tokens

    def _follow_beams(self, state, history: TimestampHistory, chosen: Step, first: bool) -> TimestampHistory:
        """Reorder the rows' caches and histories to the beams they continue; record the new tokens."""
        xp = self.backend.xp
        if first:  # a window's rows are alike until now
            history = TimestampHistory.empty(len(chosen.tokens), xp)
        else:
            sources = xp.array(chosen.sources)
            state.rearrange(sources)
            history = history.take(sources)
        return history.push(xp.array(chosen.tokens.astype(np.int32)), self.tokenizer.timestamp_begin)

    def _drop_complete_windows(self, search: BeamSearch, state) -> np.ndarray:
        """Compact the state to the windows still searching; returns the rows kept."""
        kept = search.compact()
        state.take(self.backend.xp.array(kept))
        return (kept[:, None] * search.beam_size + np.arange(search.beam_size)).reshape(-1)

    def _best_of_window(self, search: BeamSearch, window: int, no_speech: float) -> tuple[list[int], float, float]:
        tokens, sum_logprobs = search.candidates(window)
        lengths = np.array([len(t) for t in tokens])
        best = rank_candidates(sum_logprobs, lengths, self.options.length_penalty)
        return tokens[best], float(sum_logprobs[best]), no_speech


# ------------------------------------------------------------------------ language detection


def detect_language(model: Whisper, mel=None, tokenizer: Tokenizer | None = None, *, audio_features=None):
    """Most likely language per window: (language tokens (B,), [ {code: probability} per window ]).

    Pass `audio_features` to reuse an encoder output instead of encoding `mel` again.
    """
    if tokenizer is None:
        tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    if tokenizer.language is None or tokenizer.language_token not in tokenizer.sot_sequence:
        raise DecodingError("This model doesn't have language tokens so it can't perform language detection")
    backend = backend_for(model)
    single = False
    if audio_features is None:
        if mel is None:
            raise DecodingError("detect_language needs mel or audio_features")
        single = mel.ndim == 2
        audio_features = backend.encode(mel[None] if single else mel)
    batch = audio_features.shape[0]
    logits = backend.first_token_logits(audio_features, np.full((batch, 1), tokenizer.sot))
    language_tokens = np.array(tokenizer.all_language_tokens)
    probs = _softmax(backend.to_host(logits)[:, language_tokens])
    language_probs = [dict(zip(tokenizer.all_language_codes, map(float, row))) for row in probs]
    best = mx.array(language_tokens[probs.argmax(axis=-1)])
    if single:
        return best[0], language_probs[0]
    return best, language_probs


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def decode(model: Whisper, mel: mx.array, options: DecodingOptions = DecodingOptions(), **kwargs):
    """Decode one (n_frames, n_mels) window, or a batch (B, n_frames, n_mels) into a list of results."""
    if kwargs:
        options = replace(options, **kwargs)
    single = mel.ndim == 2
    mel = mel[None] if single else mel
    if mel.shape[1] != N_FRAMES:
        mel = _pad_frames(mel)
    features = backend_for(model).encode(mel)
    results = decode_features(model, features, options)
    return results[0] if single else results


def _pad_frames(mel: mx.array) -> mx.array:
    from .audio import pad_or_trim

    return pad_or_trim(mel, N_FRAMES, axis=1)


def decode_features(
    model: Whisper, audio_features, options: DecodingOptions, prompts: Sequence | None = None
) -> list[DecodingResult]:
    """Decode already-encoded windows, detecting each window's language first if none is set (with
    task="lang_id", only that: results carry `language` and `language_probs`, no text)."""
    if options.task == "lang_id":
        return identify_languages(model, audio_features)
    languages = None
    language_probs = None
    if options.language is None and model.is_multilingual:
        tokenizer = get_tokenizer(True, num_languages=model.num_languages, language="en", task=options.task)
        _, language_probs = detect_language(model, tokenizer=tokenizer, audio_features=audio_features)
        languages = [max(p, key=p.get) for p in language_probs]
    results = DecodingTask(model, options).run(audio_features, prompts, languages)
    for i, result in enumerate(results):
        if language_probs is not None:
            result.language_probs = language_probs[i]
    return results


def identify_languages(model: Whisper, audio_features) -> list[DecodingResult]:
    """openai's task="lang_id": each window's language and language probabilities, no decoding."""
    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    _, language_probs = detect_language(model, tokenizer=tokenizer, audio_features=audio_features)
    return [
        DecodingResult(audio_features=audio_features[i], language=max(probs, key=probs.get), language_probs=probs)
        for i, probs in enumerate(language_probs)
    ]
