"""Command line: argument parsing, option building, output naming and exit codes, with a fake model."""

import io
import json
import os
import sys
import types

import pytest

from whisper_mlx import cli
from whisper_mlx.errors import AudioError, ModelNotFoundError


def _result_for(audio):
    text = f" heard {os.path.basename(audio)}"
    segment = {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": 1.5,
        "text": text,
        "tokens": [1, 2],
        "temperature": 0.0,
        "avg_logprob": -0.2,
        "compression_ratio": 1.1,
        "no_speech_prob": 0.0,
    }
    return {"text": text, "language": "en", "segments": [segment]}


class FakeBackend:
    """Replaces the model loader and transcribe(); records every call."""

    def __init__(self, failures=None):
        self.failures = failures or {}
        self.loaded, self.calls, self.stdin_bytes = [], [], None
        self.model = object()

    def load_model(self, path_or_name, fp16=None, backend=None, device=None, download_root=None):
        self.loaded.append((path_or_name, fp16))
        self.backend, self.device, self.download_root = backend, device, download_root
        return self.model

    def transcribe(self, audio, **options):
        self.calls.append((audio, options))
        if os.path.basename(audio).startswith("whisper_mlx_stdin_"):
            with open(audio, "rb") as handle:
                self.stdin_bytes = handle.read()
        for fragment, error in self.failures.items():
            if fragment in audio:
                raise error
        return _result_for(audio)


@pytest.fixture
def backend(monkeypatch):
    fake = FakeBackend()
    monkeypatch.setattr(cli, "load_model", fake.load_model)
    monkeypatch.setattr(cli, "transcribe", fake.transcribe)
    monkeypatch.setattr(cli, "default_model_path", lambda: "/offline/tiny.en")
    monkeypatch.setattr(cli, "backend_summary", lambda model: "fake")
    return fake


def _audio(path, content=b"fake audio"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


def _parse(*argv):
    parser = cli.build_parser()
    args = parser.parse_args(["a.wav", *argv])
    cli.validate_args(parser, args)
    return args


# ---- parsing ----


def test_defaults():
    args = _parse()
    assert (args.model, args.output_dir, args.output_format, args.output_name) == (None, ".", "txt", None)
    assert (args.verbose, args.quiet, args.task, args.language, args.batch_size) == (True, False, "transcribe", None, 1)
    assert (args.temperature, args.temperature_increment_on_fallback) == (0.0, 0.2)
    assert (args.compression_ratio_threshold, args.logprob_threshold, args.no_speech_threshold) == (2.4, -1.0, 0.6)
    assert args.condition_on_previous_text is True and args.word_timestamps is False
    assert args.fp16 is None and args.clip_timestamps == "0"


def test_kebab_case_flags():
    args = _parse(
        "--model",
        "mlx-community/whisper-tiny",
        "-o",
        "out",
        "-f",
        "srt",
        "--verbose",
        "False",
        "--task",
        "translate",
        "--language",
        "French",
        "--batch-size",
        "8",
        "--best-of",
        "3",
        "--condition-on-previous-text",
        "false",
        "--initial-prompt",
        "Hi",
        "--carry-initial-prompt",
        "True",
        "--word-timestamps",
        "True",
        "--highlight-words",
        "True",
        "--max-line-width",
        "40",
        "--max-line-count",
        "2",
        "--no-fp16",
        "--clip-timestamps",
        "1,5",
        "--logprob-threshold",
        "None",
        "--hallucination-silence-threshold",
        "2",
    )
    assert args.model == "mlx-community/whisper-tiny" and args.output_dir == "out" and args.output_format == "srt"
    assert args.verbose is False and args.task == "translate" and args.language == "fr"
    assert (args.batch_size, args.best_of, args.max_line_width, args.max_line_count) == (8, 3, 40, 2)
    assert args.condition_on_previous_text is False and args.carry_initial_prompt is True
    assert args.highlight_words is True and args.fp16 is False and args.logprob_threshold is None
    assert args.hallucination_silence_threshold == 2.0 and args.clip_timestamps == "1,5"


@pytest.mark.parametrize(
    "temperature, increment, expected",
    [
        (0.0, 0.2, (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)),
        (0.5, 0.25, (0.5, 0.75, 1.0)),
        (1.0, 0.2, (1.0,)),
        (0.3, None, 0.3),
        (0.0, 0.0, 0.0),
    ],
)
def test_build_temperatures(temperature, increment, expected):
    built = cli.build_temperatures(temperature, increment)
    if isinstance(expected, tuple):
        assert isinstance(built, tuple) and all(type(t) is float for t in built)
        assert built == pytest.approx(expected)
    else:
        assert built == expected


def test_transcribe_options_from_defaults():
    options = cli.build_transcribe_options(_parse())
    assert options["temperature"] == pytest.approx((0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    assert options["verbose"] is True and options["batch_size"] == 1 and options["task"] == "transcribe"
    assert options["best_of"] == 5 and options["suppress_tokens"] == "-1" and options["seed"] == 0
    for absent in (
        "fp16",
        "language",
        "initial_prompt",
        "audio",
        "model",
        "output_dir",
        "quiet",
        "max_line_width",
        "highlight_words",
        "temperature_increment_on_fallback",
    ):
        assert absent not in options


def test_transcribe_options_keep_set_values():
    options = cli.build_transcribe_options(
        _parse("--fp16", "--language", "de", "--initial-prompt", "x", "--temperature-increment-on-fallback", "0")
    )
    assert (options["fp16"], options["language"], options["initial_prompt"], options["temperature"]) == (
        True,
        "de",
        "x",
        0.0,
    )
    assert cli.build_transcribe_options(_parse("--seed", "7"))["seed"] == 7
    assert cli.build_transcribe_options(_parse("--seed", "None"))["seed"] is None


@pytest.mark.parametrize(
    "verbose, quiet, tty, expected",
    [(True, False, False, True), (False, False, True, False), (False, False, False, None), (True, True, True, None)],
)
def test_choose_verbose(verbose, quiet, tty, expected):
    assert cli.choose_verbose(verbose, quiet, tty) is expected


@pytest.mark.parametrize(
    "argv",
    [
        ["a.wav", "b.wav", "--output-name", "x"],
        ["a.wav", "-f", "docx"],
        ["a.wav", "--highlight-words", "True"],
        ["a.wav", "--max-words-per-line", "3"],
        ["a.wav", "--language", "klingon"],
        ["a.wav", "--batch-size", "0"],
        ["a.wav", "--temperature", "-1"],
        ["a.wav", "--verbose", "maybe"],
        ["a.wav", "--backend", "tpu"],
        ["-", "-"],
        [],
    ],
)
def test_usage_errors_exit_2(backend, argv, capsys):
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err
    assert backend.loaded == []


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "--temperature-increment-on-fallback" in capsys.readouterr().out


# ---- naming ----


def test_assign_output_names():
    assert cli.assign_output_names(["x/talk.wav", "y/talk.mp3", "talk-2.flac", "-"]) == [
        "talk",
        "talk-3",
        "talk-2",
        "stdin",
    ]
    assert cli.assign_output_names(["A.wav", "a.wav"]) == ["A", "a-2"]
    assert cli.assign_output_names(["x/one.wav"], "custom.name") == ["custom.name"]


# ---- running with the fake backend ----


def test_each_input_gets_its_own_outputs_and_one_model(backend, tmp_path):
    first, second = _audio(tmp_path / "x" / "talk.wav"), _audio(tmp_path / "y" / "talk.wav")
    third = _audio(tmp_path / "other.flac")
    out = tmp_path / "out"
    assert cli.main([first, second, third, "-o", str(out), "-f", "json", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["other.json", "talk-2.json", "talk.json"]
    assert json.loads((out / "talk.json").read_text())["text"] == " heard talk.wav"
    assert backend.loaded == [("/offline/tiny.en", None)]
    assert [audio for audio, _ in backend.calls] == [first, second, third]
    assert all(options["model"] is backend.model and options["verbose"] is None for _, options in backend.calls)


def test_model_flag_and_fp16_reach_the_loader(backend, tmp_path):
    audio = _audio(tmp_path / "a.wav")
    assert cli.main([audio, "--model", "mlx-community/whisper-base", "--fp16", "-o", str(tmp_path / "o")]) == 0
    assert backend.loaded == [("mlx-community/whisper-base", True)]
    assert backend.calls[0][1]["fp16"] is True


def test_backend_flag_reaches_the_loader_and_is_reported(backend, tmp_path, capsys):
    audio = _audio(tmp_path / "a.wav")
    assert cli.main([audio, "--backend", "numpy", "-o", str(tmp_path / "o")]) == 0
    assert backend.backend == "numpy"
    assert "Backend: fake" in capsys.readouterr().out
    assert cli.main([audio, "-o", str(tmp_path / "p"), "--quiet"]) == 0
    assert backend.backend is None  # the library's choice: WHISPER_MLX_BACKEND or auto
    assert "Backend" not in capsys.readouterr().out


def test_device_and_model_dir_reach_the_loader(backend, tmp_path):
    """openai's --device and --model_dir, in kebab case."""
    audio = _audio(tmp_path / "a.wav")
    assert cli.main([audio, "--device", "cpu", "--model-dir", str(tmp_path / "m"), "-o", str(tmp_path / "o")]) == 0
    assert (backend.device, backend.download_root) == ("cpu", str(tmp_path / "m"))
    assert cli.main([audio, "--device", "tpu", "-o", str(tmp_path / "o")]) == 2  # a usage error


def test_output_name_and_all_formats(backend, tmp_path):
    audio = _audio(tmp_path / "a.wav")
    assert cli.main([audio, "--output-name", "result", "-f", "all", "-o", str(tmp_path / "o")]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["result.json", "result.srt", "result.tsv", "result.txt", "result.vtt"]


def test_refuses_to_overwrite_an_input_and_continues(backend, tmp_path, capsys):
    victim = _audio(tmp_path / "notes.txt", b"precious")
    other = _audio(tmp_path / "b.wav")
    assert cli.main([victim, other, "-o", str(tmp_path), "--quiet"]) == 1
    assert (tmp_path / "notes.txt").read_bytes() == b"precious"
    assert (tmp_path / "b.txt").read_text() == "heard b.wav\n"
    err = capsys.readouterr().err
    assert f"whisper_mlx: error: {victim}: refusing to write" in err
    assert [audio for audio, _ in backend.calls] == [other]  # checked before transcribing


def test_refuses_to_overwrite_another_input(backend, tmp_path):
    audio = _audio(tmp_path / "talk.wav")
    other_input = _audio(tmp_path / "sub" / "talk.txt", b"keep me")
    code = cli.main([audio, other_input, "-o", str(tmp_path / "sub"), "--quiet"])
    assert code == 1  # talk.wav's output would be sub/talk.txt, the second input
    assert (tmp_path / "sub" / "talk.txt").read_bytes() == b"keep me"
    assert (tmp_path / "sub" / "talk-2.txt").read_text() == "heard talk.txt\n"


def test_a_failing_file_does_not_stop_the_others(backend, tmp_path, capsys):
    backend.failures = {"bad": AudioError("not a readable audio file"), "weird": RuntimeError("boom")}
    bad, weird = _audio(tmp_path / "bad.wav"), _audio(tmp_path / "weird.wav")
    good = _audio(tmp_path / "good.wav")
    missing = str(tmp_path / "missing.wav")
    assert cli.main([bad, weird, missing, good, "-o", str(tmp_path / "o"), "--quiet"]) == 1
    assert os.listdir(tmp_path / "o") == ["good.txt"]
    err = capsys.readouterr().err
    assert f"whisper_mlx: error: {bad}: not a readable audio file" in err
    assert f"whisper_mlx: error: {weird}: unexpected RuntimeError: boom" in err
    assert f"whisper_mlx: error: {missing}: no such file" in err
    assert "Traceback" not in err


def test_only_missing_inputs_skip_the_model(backend, tmp_path):
    assert cli.main([str(tmp_path / "missing.wav")]) == 1
    assert backend.loaded == []


@pytest.mark.parametrize("error", [ModelNotFoundError("no model at /nowhere"), KeyError("config")])
def test_model_loading_failure_exits_1_without_traceback(backend, monkeypatch, tmp_path, capsys, error):
    def failing_loader(path_or_name, fp16=None, **where):
        raise error

    monkeypatch.setattr(cli, "load_model", failing_loader)
    assert cli.main([_audio(tmp_path / "a.wav"), "--model", "/nowhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("whisper_mlx: error: cannot load the model") and "Traceback" not in err
    assert backend.calls == []


def test_missing_default_model_exits_1(backend, monkeypatch, tmp_path, capsys):
    def no_default():
        raise ModelNotFoundError("no offline model installed")

    monkeypatch.setattr(cli, "default_model_path", no_default)
    assert cli.main([_audio(tmp_path / "a.wav")]) == 1
    assert "no offline model installed" in capsys.readouterr().err


def test_stdin_audio_is_written_to_a_temporary_file(backend, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"RIFF....WAVE")))
    assert cli.main(["-", "-o", str(tmp_path), "--quiet"]) == 0
    assert backend.stdin_bytes == b"RIFF....WAVE"
    assert os.listdir(tmp_path) == ["stdin.txt"]
    assert not os.path.exists(backend.calls[0][0])  # the temporary file is removed


def test_empty_stdin_is_an_error(backend, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"")))
    assert cli.main(["-", "-o", str(tmp_path)]) == 1
    assert "whisper_mlx: error: <stdin>: no audio data on stdin" in capsys.readouterr().err


def test_subtitle_options_reach_the_writer(backend, monkeypatch, tmp_path):
    def transcribe_with_words(audio, **options):
        result = _result_for(audio)
        result["segments"][0]["words"] = [
            {"word": " heard", "start": 0.0, "end": 0.5, "probability": 1.0},
            {"word": " it", "start": 0.5, "end": 1.5, "probability": 1.0},
        ]
        return result

    monkeypatch.setattr(cli, "transcribe", transcribe_with_words)
    audio = _audio(tmp_path / "a.wav")
    argv = [audio, "-f", "vtt", "-o", str(tmp_path / "o"), "--word-timestamps", "True", "--highlight-words", "True"]
    assert cli.main(argv) == 0
    assert "<u>heard</u> it" in (tmp_path / "o" / "a.vtt").read_text()
