"""Corpus runs on Ray (whisper_mlx corpus): real tiny.en weights, a local Ray instance, a dozen short files."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from test_audio import write_mp3

from whisper_mlx.audio import SAMPLE_RATE, load_audio
from whisper_mlx.corpus import (
    LOCK_NAME,
    MANIFEST_NAME,
    CorpusError,
    CorpusItem,
    assign_names,
    build_dataset,
    discover_inputs,
    main,
    read_manifest,
    transcribe_corpus,
)
from whisper_mlx.transcribe import transcribe
from whisper_mlx.writers import OUTPUT_FORMATS

ray = pytest.importorskip("ray", reason="corpus runs need the ray extra: pip install 'whisper_mlx[ray]'")

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZE = 12
ALICE_SLICES = [(start, start + 7.0) for start in (0.0, 41.0, 83.0, 120.0, 171.0, 222.0, 260.0, 305.0, 340.0)]
BROKEN_BYTES = b"RIFF\x00\x00\x00\x00WAVEnot really audio"


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(pcm.tobytes())


def run_main(*args: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return code, stdout.getvalue(), stderr.getvalue()


def txt_of(result: dict) -> str:
    return "".join(segment["text"].strip() + "\n" for segment in result["segments"])


def mtimes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir() if path.name != MANIFEST_NAME}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> Path:
    """Eleven short wav files (jfk, ls_test, nine slices of alice_ch1; one in a subfolder) and a broken one."""
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "part2").mkdir()
    write_wav(directory / "jfk.wav", load_audio(data_dir / "jfk.flac"))
    write_wav(directory / "part2" / "ls_test.wav", load_audio(data_dir / "ls_test.flac"))
    alice = load_audio(data_dir / "alice_ch1.flac")
    for index, (start, end) in enumerate(ALICE_SLICES):
        write_wav(directory / f"alice_{index:02d}.wav", alice[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)])
    (directory / "broken.wav").write_bytes(BROKEN_BYTES)
    (directory / "notes.txt").write_text("not audio: not part of the corpus\n")
    return directory


@pytest.fixture(scope="module")
def references(corpus, tiny_en) -> dict[str, dict]:
    """transcribe()'s result for every good input, alone, at the corpus's batch size."""
    good = [path for path in sorted(corpus.rglob("*.wav")) if path.name != "broken.wav"]
    results = {str(path): transcribe(str(path), model=tiny_en, batch_size=BATCH_SIZE) for path in good}
    # the slices are chosen to decode at temperature 0: a sampled fallback would differ run to run
    assert {segment["temperature"] for result in results.values() for segment in result["segments"]} == {0.0}
    return results


@pytest.fixture(scope="module")
def first_run(local_ray, corpus, tmp_path_factory):
    """The CLI over the corpus directory, every format: (exit code, stdout, stderr, output directory)."""
    out = tmp_path_factory.mktemp("first") / "out"
    code, stdout, stderr = run_main(str(corpus), "--output-dir", str(out), "--format", "all", "--workers", "1")
    return code, stdout, stderr, out


def test_every_good_input_has_the_text_transcribe_gives(first_run, corpus, references):
    _, stdout, _, out = first_run
    entries = read_manifest(out / MANIFEST_NAME)
    assert sorted(entries) == sorted([*references, str(corpus / "broken.wav")])
    for path, reference in references.items():
        entry = entries[path]
        name = Path(path).stem
        assert entry["status"] == "ok" and entry["error"] is None, entry
        assert entry["language"] == "en"
        assert entry["outputs"] == [f"{name}.{fmt}" for fmt in OUTPUT_FORMATS]
        assert entry["duration"] == pytest.approx(len(load_audio(path)) / SAMPLE_RATE, abs=1e-3)
        assert (out / f"{name}.txt").read_text(encoding="utf-8") == txt_of(reference)
        written = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert written["text"] == reference["text"]
        assert [s["text"] for s in written["segments"]] == [s["text"] for s in reference["segments"]]
        assert [(s["start"], s["end"]) for s in written["segments"]] == [
            (s["start"], s["end"]) for s in reference["segments"]
        ]
    assert "11 transcribed, 0 already done, 1 failed" in stdout


def test_the_broken_input_is_recorded_and_the_exit_code_says_so(first_run, corpus):
    code, _, stderr, out = first_run
    assert code == 1
    entry = read_manifest(out / MANIFEST_NAME)[str(corpus / "broken.wav")]
    assert entry["status"] == "error" and entry["outputs"] == [] and entry["language"] is None
    assert "not a readable audio file" in entry["error"]
    assert stderr.splitlines() == [
        f"whisper_mlx corpus: error: {corpus / 'broken.wav'}: {entry['error'].split(': ', 1)[1]}"
    ]
    assert not list(out.glob("broken.*"))
    manifest_lines = (out / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    assert len(manifest_lines) == 12  # compacted: one line per input


def test_rerun_redoes_only_what_is_missing_or_failed(first_run, corpus, references, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[3], out)  # outputs are named relative to the manifest: a moved directory resumes
    before, entries_before = mtimes(out), read_manifest(out / MANIFEST_NAME)
    again = transcribe_corpus(corpus, out, formats="all", batch_size=BATCH_SIZE)
    assert (again.transcribed, again.skipped, again.failed) == (0, 11, 1)
    assert mtimes(out) == before
    assert read_manifest(out / MANIFEST_NAME) == entries_before

    redo = str(corpus / "alice_03.wav")
    (out / "alice_03.srt").unlink()
    once_more = transcribe_corpus(corpus, out, formats="all", batch_size=BATCH_SIZE)
    assert (once_more.transcribed, once_more.skipped, once_more.failed) == (1, 10, 1)
    after = mtimes(out)
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed == {f"alice_03.{fmt}" for fmt in OUTPUT_FORMATS}
    assert (out / "alice_03.txt").read_text(encoding="utf-8") == txt_of(references[redo])
    assert read_manifest(out / MANIFEST_NAME) == entries_before


def test_a_fixed_input_is_retried(first_run, corpus, data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[3], out)
    broken = corpus / "broken.wav"
    try:
        write_wav(broken, load_audio(data_dir / "jfk.flac"))
        fixed = transcribe_corpus(corpus, out, formats="all", batch_size=BATCH_SIZE)
        entry = read_manifest(out / MANIFEST_NAME)[str(broken)]
        assert (fixed.transcribed, fixed.skipped, fixed.failed) == (1, 11, 0)
        assert entry["status"] == "ok" and entry["outputs"] == [f"broken.{fmt}" for fmt in OUTPUT_FORMATS]
        assert (out / "broken.txt").read_text(encoding="utf-8") == (out / "jfk.txt").read_text(encoding="utf-8")
    finally:
        broken.write_bytes(BROKEN_BYTES)


def test_a_list_file_with_two_workers(local_ray, corpus, references, tmp_path):
    chosen = [path for path in references if "alice_0" in path][:4]
    out = tmp_path / "out"
    out.mkdir()
    # audio whose txt output would be the file itself: refused, never overwritten
    in_the_way = out / "clip.txt"
    shutil.copyfile(chosen[0], in_the_way)
    cut = tmp_path / "cut.mp3"  # an MP3 cut in half: its decodable half is transcribed, with a warning
    write_mp3(load_audio(chosen[1]), tmp_path / "whole.mp3")
    cut.write_bytes((tmp_path / "whole.mp3").read_bytes()[: (tmp_path / "whole.mp3").stat().st_size // 2])
    listing = tmp_path / "inputs.txt"
    missing = tmp_path / "missing.wav"
    entries = [*chosen, str(missing), "out/clip.txt", "cut.mp3"]
    listing.write_text("# four inputs, two that fail, one cut short\n\n" + "\n".join(entries) + "\n")
    summary = transcribe_corpus(listing, out, workers=2, batch_size=BATCH_SIZE)
    assert (summary.transcribed, summary.failed) == (5, 2)
    assert list(summary.warnings) == [str(cut)] and "probably truncated" in summary.warnings[str(cut)]
    assert read_manifest(out / MANIFEST_NAME)[str(cut)]["warning"] == summary.warnings[str(cut)]
    assert "no such audio file" in summary.errors[str(missing)]
    assert summary.errors[str(in_the_way)].startswith(f"refusing to write {in_the_way}: it is an input audio file")
    assert in_the_way.read_bytes() == Path(chosen[0]).read_bytes()
    for path in chosen:
        assert (out / f"{Path(path).stem}.txt").read_text(encoding="utf-8") == txt_of(references[path])


def test_decoding_runs_in_ray_tasks_beside_the_actor_pool(local_ray, corpus, references):
    chosen = list(references)[:2]
    dataset = build_dataset([CorpusItem(path, Path(path).stem) for path in chosen], 1, None, BATCH_SIZE, {})
    rows = list(dataset.iter_rows())
    assert sorted(row["input"] for row in rows) == sorted(chosen)
    assert all(json.loads(row["result"])["text"] == references[row["input"]]["text"] for row in rows)
    stats = dataset.stats()
    assert "Map(decode_row): 2 tasks executed" in stats  # one task per input, not fused into the actors
    assert "MapBatches(Transcriber)" in stats and "Map(decode_row)->" not in stats


def test_inputs_and_names():
    clash = ["/a/talk.wav", "/b/talk.wav", "/b/talk-2.wav", "/c/TALK.mp3"]
    names = [item.name for item in assign_names(clash, {})]
    assert names == ["talk", "talk-3", "talk-2", "TALK-4"]
    # a name given by an earlier run stays, and no new input takes another input's earlier name
    kept = [item.name for item in assign_names(["/new/talk.wav", "/b/talk.wav"], {"/b/talk.wav": "talk", "/x/y": "y"})]
    assert kept == ["talk-2", "talk"]


def test_discovery(corpus, tmp_path):
    found = discover_inputs(corpus)
    assert [Path(path).relative_to(corpus).as_posix() for path in found] == [
        *(f"alice_{index:02d}.wav" for index in range(len(ALICE_SLICES))),
        "broken.wav",
        "jfk.wav",
        "part2/ls_test.wav",
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("  jfk.wav\n# comment\n\njfk.wav\n/abs/other.flac\n")
    assert discover_inputs(listing) == [str(tmp_path / "jfk.wav"), "/abs/other.flac"]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda c, t: [str(t / "nowhere"), "-o", str(t / "out")], "no such input directory or list file"),
        (lambda c, t: [str(t / "empty"), "-o", str(t / "out")], "empty corpus"),
        (lambda c, t: [str(c), "-o", str(c / "jfk.wav")], "the output directory is a file"),
        (lambda c, t: [str(c), "-o", str(c / "jfk.wav" / "out")], "cannot write to the output directory"),
        (lambda c, t: [str(c), "-o", str(t / "out"), "--address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
        (lambda c, t: [str(c), "-o", str(t / "out"), "--address", "nonsense"], "not a Ray address"),
        (lambda c, t: [str(c), "-o", str(t / "out"), "--model", str(t / "no_model")], "cannot load the model"),
    ],
)
def test_errors_are_one_line(corpus, tmp_path, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no audio here")
    code, stdout, stderr = run_main(*make_args(corpus, tmp_path))
    assert code == 1 and stdout == ""
    assert len(stderr.splitlines()) == 1 and stderr.startswith("whisper_mlx corpus: error: ") and message in stderr


def test_a_model_the_actors_cannot_load_stops_the_run_in_one_line(local_ray, corpus, tmp_path):
    (tmp_path / "model").mkdir()
    code, stdout, stderr = run_main(str(corpus), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "model"))
    assert (code, stdout) == (1, "")
    [line] = stderr.splitlines()
    assert line.startswith(
        "whisper_mlx corpus: error: the Ray run stopped (re-run to resume): whisper_mlx.errors.ModelFormatError: "
    )
    assert f"{tmp_path / 'model'}: no Whisper weights found" in line


def test_two_runs_cannot_share_an_output_directory(corpus, tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="the output directory lock uses flock")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a run in another process holds it
        code, stdout, stderr = run_main(str(corpus), "-o", str(out))
    assert (code, stdout) == (1, "")
    assert stderr == f"whisper_mlx corpus: error: {out}: another corpus run is writing to this output directory\n"
    assert not (out / MANIFEST_NAME).exists()


def test_python_api_raises_typed_errors(tmp_path):
    with pytest.raises(CorpusError, match="empty corpus"):
        transcribe_corpus([], tmp_path / "out")


def test_without_ray_one_line_names_the_extra(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    code, stdout, stderr = run_main(str(corpus), "-o", str(tmp_path / "out"))
    assert (code, stdout) == (1, "")
    assert stderr == "whisper_mlx corpus: error: corpus runs need Ray: pip install 'whisper_mlx[ray]'\n"


def test_the_core_package_does_not_import_ray():
    probe = "import sys, whisper_mlx, whisper_mlx.cli, whisper_mlx.corpus; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
