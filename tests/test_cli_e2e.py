"""The command line end to end, with the real tiny.en model: every output format parsed back."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
JFK_SECONDS = 11.0
TIMEOUT = 300
TIME = re.compile(r"(?:(\d+):)?(\d{2}):(\d{2})[.,](\d{3})")
CUE = re.compile(rf"^({TIME.pattern}) --> ({TIME.pattern})$", re.MULTILINE)


def run_cli(*args: str, command=(sys.executable, "-m", "whisper_mlx")) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)


def seconds(text: str) -> float:
    hours, minutes, secs, millis = TIME.fullmatch(text).groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(secs) + int(millis) / 1000


def cue_times(subtitles: str) -> list:
    """(start, end) seconds of every cue in an SRT or WebVTT document."""
    return [(seconds(m.group(1)), seconds(m.group(6))) for m in CUE.finditer(subtitles)]


def assert_valid_timeline(times: list, duration: float = JFK_SECONDS) -> None:
    assert times, "no cues"
    previous_end = 0.0
    for start, end in times:
        assert 0.0 <= start <= end <= duration + 0.1, times
        assert start >= previous_end - 1e-6, f"cues overlap or go back in time: {times}"
        previous_end = end


def srt_blocks(srt: str) -> list:
    return [block.splitlines() for block in srt.strip().split("\n\n")]


@pytest.fixture(scope="module")
def jfk_all(tiny_en_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("all") / "out"
    done = run_cli(str(DATA / "jfk.flac"), "--model", tiny_en_dir, "-f", "all", "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_all_formats_are_written(jfk_all):
    assert sorted(p.name for p in jfk_all.iterdir()) == [f"jfk.{ext}" for ext in ("json", "srt", "tsv", "txt", "vtt")]


def test_txt(jfk_all):
    text = (jfk_all / "jfk.txt").read_text()
    assert "ask not what your country can do for you" in text
    assert all(line == line.strip() and line for line in text.splitlines())


def test_srt(jfk_all):
    srt = (jfk_all / "jfk.srt").read_text()
    blocks = srt_blocks(srt)
    assert [block[0] for block in blocks] == [str(i) for i in range(1, len(blocks) + 1)]
    assert all(re.fullmatch(r"\d{2}:\d{2}:\d{2},\d{3} --> \d{2}:\d{2}:\d{2},\d{3}", block[1]) for block in blocks)
    assert all(len(block) >= 3 for block in blocks), "a cue without text"
    assert_valid_timeline(cue_times(srt))


def test_vtt(jfk_all):
    vtt = (jfk_all / "jfk.vtt").read_text()
    assert vtt.startswith("WEBVTT\n")
    assert "," not in "".join(re.findall(r"^\S+ --> \S+$", vtt, re.MULTILINE))  # '.' before milliseconds
    assert_valid_timeline(cue_times(vtt))
    assert cue_times(vtt) == cue_times((jfk_all / "jfk.srt").read_text())


def test_tsv(jfk_all):
    header, *rows = (jfk_all / "jfk.tsv").read_text().splitlines()
    assert header == "start\tend\ttext"
    cells = [row.split("\t") for row in rows]
    assert all(len(c) == 3 and c[2] for c in cells)
    assert_valid_timeline([(int(start) / 1000, int(end) / 1000) for start, end, _ in cells])


def test_json_matches_txt(jfk_all):
    result = json.loads((jfk_all / "jfk.json").read_text())
    assert {"text", "segments", "language"} <= set(result) and result["language"] == "en"
    assert_valid_timeline([(s["start"], s["end"]) for s in result["segments"]])
    assert result["text"].split() == (jfk_all / "jfk.txt").read_text().split()
    assert "".join(s["text"] for s in result["segments"]) == result["text"]


def test_two_inputs_write_two_sets(tiny_en_dir, tmp_path):
    done = run_cli(
        str(DATA / "jfk.flac"), str(DATA / "ls_test.flac"), "--model", tiny_en_dir, "-f", "all", "-o", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    expected = sorted(f"{stem}.{ext}" for stem in ("jfk", "ls_test") for ext in ("json", "srt", "tsv", "txt", "vtt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    assert "country" in (tmp_path / "jfk.txt").read_text()
    assert "country" not in (tmp_path / "ls_test.txt").read_text()
    assert_valid_timeline(cue_times((tmp_path / "ls_test.srt").read_text()), duration=6.7)


def test_highlighted_words(tiny_en_dir, tmp_path):
    done = run_cli(
        str(DATA / "jfk.flac"),
        "--model",
        tiny_en_dir,
        "--word-timestamps",
        "True",
        "--highlight-words",
        "True",
        "-f",
        "srt",
        "-o",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    srt = (tmp_path / "jfk.srt").read_text()
    underlined = re.findall(r"<u>([^<]+)</u>", srt)
    assert len(underlined) >= 20 and "Americans" in underlined
    assert all(
        len(re.findall("<u>", block_text)) == 1 for block_text in ("\n".join(b[2:]) for b in srt_blocks(srt))
    )  # one word per cue
    assert_valid_timeline(cue_times(srt))


def test_a_failing_input_among_good_ones(tiny_en_dir, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio\n" * 50)
    out = tmp_path / "out"
    done = run_cli(str(DATA / "jfk.flac"), str(bad), str(DATA / "ls_test.flac"), "--model", tiny_en_dir, "-o", str(out))
    assert done.returncode == 1
    assert f"whisper_mlx: error: {bad}: not a readable audio file" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["jfk.txt", "ls_test.txt"]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("script", ["whisper_mlx", "whisper-mlx"])
def test_console_scripts(script, tiny_en_dir, tmp_path):
    path = shutil.which(script)
    if path is None:
        pytest.skip(
            f"console script {script!r} is not on PATH: the package is not pip-installed here "
            "(pip install -e . creates it from pyproject's [project.scripts])"
        )
    done = run_cli("--help", command=(path,))
    assert done.returncode == 0 and done.stdout.startswith("usage: whisper_mlx")
    done = run_cli(str(DATA / "ls_test.flac"), "--model", tiny_en_dir, "-o", str(tmp_path), command=(path,))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ls_test.txt").read_text().strip()


@pytest.mark.parametrize("backend", ["mlx", "numpy"])
def test_backend_flag_transcribes_and_reports_the_backend(tiny_en_dir, tmp_path, backend):
    import mlx.core as mx

    if backend == "numpy" and mx.default_device() != mx.cpu:
        pytest.skip("the numpy backend runs where MLX computes on the CPU")
    done = run_cli(
        str(DATA / "jfk.flac"), "--model", tiny_en_dir, "--backend", backend, "-f", "txt", "-o", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert re.search(rf"Backend: {backend} on (cpu|metal|cuda) \((float32|float16)\)", done.stdout)
    assert "ask not what your country can do for you" in (tmp_path / "jfk.txt").read_text()
