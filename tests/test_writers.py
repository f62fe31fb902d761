"""Output writers: write each format, then parse it back."""

import itertools
import json
import os
import re

import pytest

from whisper_mlx.errors import WhisperMLXError
from whisper_mlx.writers import OUTPUT_FORMATS, WriteSRT, WriteVTT, format_timestamp, get_writer

SRT_TIME = r"(\d{2}):(\d{2}):(\d{2}),(\d{3})"
VTT_TIME = r"(?:(\d{2,}):)?(\d{2}):(\d{2})\.(\d{3})"


def _word(text, start, end):
    return {"word": text, "start": start, "end": end, "probability": 0.9}


def _segment(index, start, end, words):
    text = "".join(word["word"] for word in words)
    return {
        "id": index,
        "seek": 0,
        "start": start,
        "end": end,
        "text": text,
        "tokens": [50364, 1000 + index],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 1.3,
        "no_speech_prob": 0.01,
        "words": words,
    }


@pytest.fixture
def result():
    first = [
        _word(" And", 0.0, 0.4),
        _word(" so,", 0.4, 0.9),
        _word(" my", 1.2, 1.4),
        _word(" fellow", 1.4, 1.9),
        _word(" Americans,", 1.9, 2.8),
    ]
    second = [
        _word(" ask", 3.5, 3.8),
        _word(" not", 3.8, 4.1),
        _word(" what", 4.1, 4.4),
        _word(" your", 4.4, 4.6),
        _word(" country", 4.6, 5.0),
        _word(" can", 5.0, 5.2),
        _word(" do.", 5.2, 5.6),
    ]
    third = [
        _word(" Ça", 3700.0, 3700.5),
        _word(" va", 3700.5, 3701.0),
        _word(" très", 3701.0, 3701.4),
        _word(" bien.", 3701.4, 3702.0),
    ]
    segments = [_segment(0, 0.0, 2.8, first), _segment(1, 3.5, 5.6, second), _segment(2, 3700.0, 3702.0, third)]
    return {"text": "".join(s["text"] for s in segments), "language": "en", "segments": segments}


def _without_words(result):
    return {**result, "segments": [{k: v for k, v in s.items() if k != "words"} for s in result["segments"]]}


def _write(tmp_path, fmt, result, options=None, name="talk"):
    get_writer(fmt, str(tmp_path))(result, f"/some/where/{name}.wav", options)
    return (tmp_path / f"{name}.{fmt}").read_text(encoding="utf-8")


def _seconds(match):
    hours, minutes, seconds, millis = match
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def _parse_srt(text):
    cues = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        match = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert match, lines[1]
        groups = match.groups()
        cues.append((int(lines[0]), _seconds(groups[:4]), _seconds(groups[4:]), "\n".join(lines[2:])))
    return cues


def _parse_vtt(text):
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n") :].strip("\n").split("\n\n"):
        lines = block.split("\n")
        match = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert match, lines[0]
        groups = match.groups()
        cues.append((_seconds(groups[:4]), _seconds(groups[4:]), "\n".join(lines[1:])))
    return cues


@pytest.mark.parametrize(
    "seconds, kwargs, expected",
    [
        (0.0, {}, "00:00.000"),
        (1.0005, {}, "00:01.000"),  # rounds half to even at the millisecond
        (61.25, {}, "01:01.250"),
        (3600.0, {}, "01:00:00.000"),
        (5.5, {"always_include_hours": True, "decimal_marker": ","}, "00:00:05,500"),
        (59.9996, {}, "01:00.000"),
    ],
)
def test_format_timestamp(seconds, kwargs, expected):
    assert format_timestamp(seconds, **kwargs) == expected


def test_format_timestamp_rejects_negative_times():
    with pytest.raises(ValueError):
        format_timestamp(-1.0)


@pytest.mark.parametrize("use_words", [True, False])
def test_srt_indices_and_times_increase(tmp_path, result, use_words):
    cues = _parse_srt(_write(tmp_path, "srt", result if use_words else _without_words(result)))
    assert [cue[0] for cue in cues] == list(range(1, len(cues) + 1))
    assert [cue[3] for cue in cues] == [
        "And so, my fellow Americans,",
        "ask not what your country can do.",
        "Ça va très bien.",
    ]
    for previous, cue in itertools.pairwise(cues):
        assert previous[2] <= cue[1]
    assert all(start < end for _, start, end, _ in cues)
    assert cues[-1][1] == pytest.approx(3700.0)


def test_vtt_header_and_time_format(tmp_path, result):
    text = _write(tmp_path, "vtt", result)
    cues = _parse_vtt(text)
    assert len(cues) == 3
    assert "00:00.000 --> 00:02.800" in text  # no hours below one hour
    assert "01:01:40.000 --> 01:01:42.000" in text  # hours once needed
    assert all(start < end for start, end, _ in cues)


def test_segment_cues_escape_the_arrow(tmp_path, result):
    plain = _without_words(result)
    plain["segments"][0]["text"] = " a --> b"
    assert _parse_vtt(_write(tmp_path, "vtt", plain))[0][2] == "a -> b"


def test_tsv_has_header_and_integer_milliseconds(tmp_path, result):
    result["segments"][1]["text"] = " tab\there"
    lines = _write(tmp_path, "tsv", result).splitlines()
    assert lines[0] == "start\tend\ttext"
    rows = [line.split("\t") for line in lines[1:]]
    assert [row[:2] for row in rows] == [["0", "2800"], ["3500", "5600"], ["3700000", "3702000"]]
    assert rows[1][2] == "tab here"
    assert all(len(row) == 3 for row in rows)


def test_json_round_trips_and_keeps_unicode(tmp_path, result):
    text = _write(tmp_path, "json", result)
    assert json.loads(text) == result
    assert "Ça va très bien." in text  # not \u-escaped


def test_txt_has_one_stripped_segment_per_line(tmp_path, result):
    text = _write(tmp_path, "txt", result)
    assert text.splitlines() == [
        "And so, my fellow Americans,",
        "ask not what your country can do.",
        "Ça va très bien.",
    ]


def test_max_line_width_wraps_lines_and_limits_line_count(tmp_path, result):
    options = {"max_line_width": 16, "max_line_count": 2}
    cues = _parse_srt(_write(tmp_path, "srt", result, options))
    lines = [line for cue in cues for line in cue[3].split("\n")]
    assert all(len(line) <= 16 for line in lines), lines
    assert all(cue[3].count("\n") <= 1 for cue in cues)
    assert " ".join(lines).split() == result["text"].split()  # no word lost or repeated
    # segments are not kept together, but a pause of more than 3 s starts a new subtitle
    assert [cue[3] for cue in cues] == [
        "And so, my\nfellow",
        "Americans, ask\nnot what your",
        "country can do.",
        "Ça va très bien.",
    ]


def test_max_line_width_alone_keeps_segments_as_subtitles(tmp_path, result):
    cues = _parse_srt(_write(tmp_path, "srt", result, {"max_line_width": 12}))
    assert len(cues) == 3
    assert cues[0][3] == "And so, my\nfellow\nAmericans,"


def test_max_words_per_line(tmp_path, result):
    cues = _parse_srt(_write(tmp_path, "srt", result, {"max_words_per_line": 3}))
    assert all(len(line.split()) <= 3 for cue in cues for line in cue[3].split("\n"))
    assert [cue[3] for cue in cues[:3]] == ["And so, my", "fellow Americans,", "ask not what"]
    assert cues[0][1:3] == (0.0, 1.4)


def test_highlight_words_underlines_each_word_in_turn(tmp_path, result):
    cues = _parse_vtt(_write(tmp_path, "vtt", result, {"highlight_words": True}))
    highlighted = [cue for cue in cues if "<u>" in cue[2]]
    assert len(highlighted) == sum(len(s["words"]) for s in result["segments"])
    assert all(cue[2].count("<u>") == 1 and cue[2].count("</u>") == 1 for cue in highlighted)
    assert highlighted[0][2] == "<u>And</u> so, my fellow Americans,"
    assert highlighted[1][2] == "And <u>so,</u> my fellow Americans,"
    # the gap between "so," (ends 0.9) and "my" (starts 1.2) shows the plain text
    assert (0.9, 1.2, "And so, my fellow Americans,") in cues


def test_highlight_words_across_wrapped_lines(tmp_path, result):
    options = {"highlight_words": True, "max_line_width": 12}
    cues = _parse_srt(_write(tmp_path, "srt", result, options))
    assert "And so, my\n<u>fellow</u>\nAmericans," in [cue[3] for cue in cues]


def test_keyword_options_override_the_options_dict(result):
    cues = list(WriteSRT(".").iterate_result(result, {"max_words_per_line": 100}, max_words_per_line=2))
    assert cues[0][2] == "And so,"


def test_all_writes_every_format(tmp_path, result):
    get_writer("all", str(tmp_path))(result, "talk.flac", {})
    assert sorted(os.listdir(tmp_path)) == sorted(f"talk.{fmt}" for fmt in OUTPUT_FORMATS)


def test_output_dir_is_created(tmp_path, result):
    out = tmp_path / "new" / "dir"
    path = WriteVTT(str(out))(result, "talk.wav")
    assert path == str(out / "talk.vtt") and os.path.isfile(path)


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="docx"):
        get_writer("docx", ".")


@pytest.mark.parametrize("fmt", ["txt", "all"])
def test_never_overwrites_the_input_file(tmp_path, result, fmt):
    audio = tmp_path / "speech.txt"  # an odd name, but an input all the same
    audio.write_bytes(b"RIFF audio bytes")
    with pytest.raises(WhisperMLXError, match="input"):
        get_writer(fmt, str(tmp_path))(result, str(audio), {})
    assert audio.read_bytes() == b"RIFF audio bytes"
    assert sorted(os.listdir(tmp_path)) == ["speech.txt"]


def test_never_overwrites_a_protected_path_through_a_symlink(tmp_path, result):
    audio = tmp_path / "in" / "talk.json"
    audio.parent.mkdir()
    audio.write_bytes(b"data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "renamed.json").symlink_to(audio)
    writer = get_writer("json", str(tmp_path / "out"))
    with pytest.raises(WhisperMLXError):
        writer(result, "other.wav", {}, output_name="renamed", protected_paths=[str(audio)])
    assert audio.read_bytes() == b"data"
