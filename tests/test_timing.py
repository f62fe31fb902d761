"""Word timestamps: numpy DTW / median filter against pure-Python references, then real tiny.en alignment."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

import whisper_mlx  # noqa: F401  (preloads the fast BLAS before mlx.core)
from whisper_mlx import timing
from whisper_mlx.timing import WordTiming, dtw, median_filter, merge_punctuations

from fake_backends import counting

DATA = Path(__file__).parent / "data"
JFK_FIRST = " And so my fellow Americans,"
JFK_SECOND = " ask not what your country can do for you, ask what you can do for your country."
JFK_TEXT = JFK_FIRST + JFK_SECOND


# --------------------------------------------------------------------------- pure-Python references


def reference_dtw(x):
    """openai's dtw_cpu, written out cell by cell (column-major fill, float32 accumulated cost)."""
    n, m = len(x), len(x[0])
    cost = [[np.float32(np.inf)] * (m + 1) for _ in range(n + 1)]
    trace = [[-1] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = np.float32(0)
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1][j - 1], cost[i - 1][j], cost[i][j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i][j] = np.float32(float(x[i - 1][j - 1]) + float(c))
            trace[i][j] = t
    for j in range(m + 1):
        trace[0][j] = 2
    for i in range(n + 1):
        trace[i][0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i][j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    path.reverse()
    return [p[0] for p in path], [p[1] for p in path]


def reference_median_1d(row, width):
    half = width // 2
    n = len(row)
    if n <= half:
        return list(row)

    def reflect(k):
        if k < 0:
            return row[-k]
        if k >= n:
            return row[2 * (n - 1) - k]
        return row[k]

    return [sorted(reflect(k) for k in range(c - half, c + half + 1))[half] for c in range(n)]


def reference_median(x, width):
    x = np.asarray(x)
    rows = x.reshape(-1, x.shape[-1])
    return np.array([reference_median_1d(list(r), width) for r in rows], dtype=x.dtype).reshape(x.shape)


# --------------------------------------------------------------------------- kernels


DTW_SHAPES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 17), (17, 3), (12, 40), (25, 60)]


@pytest.mark.parametrize("shape", DTW_SHAPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "float32"])
def test_dtw_matches_reference(shape, kind):
    rng = np.random.default_rng([*shape, len(kind)])
    if kind == "ties":  # small integers: many equal costs exercise the tie breaking
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif kind == "float32":
        x = rng.standard_normal(shape).astype(np.float32)
    else:
        x = rng.standard_normal(shape) * 3
    text, time = dtw(x)
    ref_text, ref_time = reference_dtw(x.tolist() if kind != "float32" else x)
    assert text.tolist() == ref_text and time.tolist() == ref_time
    # a valid monotonic path from (0, 0) to (n-1, m-1)
    assert (text[0], time[0]) == (0, 0) and (text[-1], time[-1]) == (shape[0] - 1, shape[1] - 1)
    assert set(np.diff(text).tolist()) <= {0, 1} and set(np.diff(time).tolist()) <= {0, 1}


def test_dtw_follows_cheap_cells():
    cost = np.ones((4, 8))
    cells = [(0, 0), (1, 2), (2, 4), (3, 7)]
    for cell in cells:
        cost[cell] = -10
    text, time = dtw(cost)
    assert set(cells) <= set(zip(text.tolist(), time.tolist()))


@pytest.mark.parametrize("shape", [(1,), (2,), (4,), (9,), (50,), (1, 30), (30, 1), (3, 4), (5, 33), (2, 6, 40)])
@pytest.mark.parametrize("width", [1, 3, 5, 7])
def test_median_filter_matches_reference(shape, width):
    rng = np.random.default_rng(sum(shape) * 31 + width)
    x = rng.standard_normal(shape).astype(np.float32)
    out = median_filter(x, width)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, reference_median(x, width))


def test_median_filter_rejects_even_width():
    with pytest.raises(ValueError):
        median_filter(np.zeros((2, 10)), 4)


# --------------------------------------------------------------------------- punctuation merging


def _timings(words):
    return [WordTiming(w, [k], float(k), float(k + 1), 0.9) for k, w in enumerate(words)]


def test_merge_punctuations():
    alignment = _timings([" (", "Hello", ",", " world", "!", ' "', "Yes", '"', " ."])
    merge_punctuations(alignment, timing.PREPEND_PUNCTUATIONS, timing.APPEND_PUNCTUATIONS)
    assert [a.word for a in alignment] == ["", " (Hello,", "", " world!", "", "", ' "Yes"', "", " ."]
    assert alignment[1].tokens == [0, 1, 2] and alignment[6].tokens == [5, 6, 7]
    assert "".join(a.word for a in alignment) == ' (Hello, world! "Yes" .'
    assert sum(len(a.tokens) for a in alignment) == 9


# --------------------------------------------------------------------------- hallucination helpers


def _w(word, start, end, probability=0.9):
    return {"word": word, "start": start, "end": end, "probability": probability}


def test_word_anomaly_score():
    assert timing.word_anomaly_score(_w(" ok", 0.0, 0.5)) == 0.0
    assert timing.word_anomaly_score(_w(" ok", 0.0, 0.5, 0.1)) == 1.0
    assert math.isclose(timing.word_anomaly_score(_w(" ok", 0.0, 0.033)), 1.5)
    assert math.isclose(timing.word_anomaly_score(_w(" ok", 0.0, 3.5)), 1.5)
    assert timing.word_anomaly_score({"word": " x", "start": 0.0, "end": 0.5}) == 1.0  # no probability


def test_is_segment_anomaly():
    assert not timing.is_segment_anomaly(None)
    assert not timing.is_segment_anomaly({"words": []})
    good = {"words": [_w(" Hello", 0.0, 0.4), _w(" there", 0.4, 0.8), _w(".", 0.8, 0.8)]}
    assert not timing.is_segment_anomaly(good)
    # improbable words: score 2 >= 2 words (punctuation ignored)
    assert timing.is_segment_anomaly({"words": [_w(" uh", 0, 0.5, 0.1), _w(",", 0.5, 0.5), _w(" um", 1, 1.5, 0.05)]})
    # one long, improbable word among many ordinary ones: 1 + 3 = 4 >= 3
    long_word = [_w(" so", 0.0, 5.0, 0.1)] + [_w(" ok", k, k + 0.4) for k in range(6, 12)]
    assert timing.is_segment_anomaly({"words": long_word})
    # only the first 8 non-punctuation words count
    late = [_w(" ok", k, k + 0.4) for k in range(8)] + [_w(" bad", 9, 9.01, 0.0)] * 3
    assert not timing.is_segment_anomaly({"words": late})


def test_next_words_segment():
    segments = [{"words": []}, {"words": [_w(" a", 0, 1)]}, {"words": [_w(" b", 1, 2)]}]
    assert timing.next_words_segment(segments) is segments[1]
    assert timing.next_words_segment(segments[:1]) is None
    assert timing.next_words_segment([]) is None


# --------------------------------------------------------------------------- real model (tiny.en, jfk.flac)


@pytest.fixture(scope="module")
def jfk():
    from whisper_mlx.audio import N_FRAMES, log_mel_spectrogram, pad_or_trim
    from whisper_mlx.backends import backend_for
    from whisper_mlx.load_models import default_model_path, load_model
    from whisper_mlx.tokenizer import get_tokenizer

    model = load_model(default_model_path())
    tokenizer = get_tokenizer(model.is_multilingual)
    mel = log_mel_spectrogram(str(DATA / "jfk.flac"))
    features = backend_for(model).encode(pad_or_trim(mel, N_FRAMES, axis=0)[None])
    return model, tokenizer, features, mel.shape[0]


@pytest.fixture
def no_encoder(jfk):
    """Fail loudly if word timing runs the encoder: it must reuse the window's audio features."""
    with counting(jfk[0], forbid=("encode",)):
        yield jfk


def _align(jfk, segments, **kwargs):
    model, tokenizer, features, num_frames = jfk
    timing.add_word_timestamps(
        segments=segments,
        model=model,
        tokenizer=tokenizer,
        audio_features=features,
        num_frames=num_frames,
        last_speech_timestamp=0.0,
        **kwargs,
    )
    return segments


def _check_words(words, low, high, eps=1e-6):
    for word in words:
        assert set(word) == {"word", "start", "end", "probability"}
        assert low <= word["start"] <= word["end"] <= high
        assert 0.0 <= word["probability"] <= 1.0
    for before, after in itertools.pairwise(words):
        assert before["end"] <= after["start"] + eps


# Measured once with tiny.en float32 on the CPU (identical to mlx-whisper 0.4.3 on the same weights).
PINNED = {" Americans,": (1.76, 2.28), " country": (6.04, 6.36), " country.": (10.22, 10.48)}


def test_jfk_word_timestamps(no_encoder):
    tokenizer = no_encoder[1]
    segment = {"seek": 0, "start": 0.0, "end": 11.0, "tokens": tokenizer.encode(JFK_TEXT), "text": JFK_TEXT}
    _align(no_encoder, [segment])
    words = segment["words"]
    assert "".join(w["word"] for w in words) == JFK_TEXT
    _check_words(words, 0.0, 11.1)
    found = {w["word"]: (w["start"], w["end"]) for w in words}
    for word, (start, end) in PINNED.items():
        assert abs(found[word][0] - start) <= 0.3 and abs(found[word][1] - end) <= 0.3, (word, found[word])
    assert segment["start"] == words[0]["start"] and segment["end"] == words[-1]["end"]
    assert all(isinstance(w[k], float) for w in words for k in ("start", "end", "probability"))


def test_jfk_two_segments_with_timestamps_and_offset(no_encoder):
    tokenizer = no_encoder[1]
    first, second = JFK_FIRST, JFK_SECOND
    tb = tokenizer.timestamp_begin
    segments = [
        {"seek": 100, "start": 1.0, "end": 3.5, "tokens": [tb, *tokenizer.encode(first), tb + 125]},
        {"seek": 100, "start": 4.5, "end": 11.0, "tokens": [tb + 175, *tokenizer.encode(second), tb + 500]},
    ]
    _align(no_encoder, segments, qk_scale=1.0, medfilt_width=7)
    assert "".join(w["word"] for w in segments[0]["words"]) == first
    assert "".join(w["word"] for w in segments[1]["words"]) == second
    words = segments[0]["words"] + segments[1]["words"]
    _check_words(words, 1.0, 12.1)  # times are shifted by the window offset (seek 100 = 1 s)
    americans = next(w for w in words if w["word"] == " Americans,")
    assert abs(americans["start"] - (PINNED[" Americans,"][0] + 1.0)) <= 0.3


def test_find_alignment_returns_word_timings(no_encoder):
    model, tokenizer, features, num_frames = no_encoder
    tokens = tokenizer.encode(" ask not what your country can do for you")
    alignment = timing.find_alignment(model, tokenizer, tokens, features, num_frames)
    assert [a.word for a in alignment] == [" ask", " not", " what", " your", " country", " can", " do", " for", " you"]
    assert [t for a in alignment for t in a.tokens] == tokens
    assert all(0.0 <= a.start <= a.end <= num_frames / 100 for a in alignment)
    assert timing.find_alignment(model, tokenizer, [], features, num_frames) == []


def test_empty_segments(no_encoder):
    tokenizer = no_encoder[1]
    _align(no_encoder, [])  # nothing to do
    segment = {"seek": 0, "start": 0.0, "end": 1.0, "tokens": [tokenizer.timestamp_begin]}
    _align(no_encoder, [segment])
    assert segment["words"] == [] and (segment["start"], segment["end"]) == (0.0, 1.0)
