"""Command line interface: `whisper_mlx audio.wav ...` or `python -m whisper_mlx audio.wav ...`.

Flags follow mlx-whisper's kebab-case spelling. Unlike mlx-whisper, every input gets its own output
set, named after its own stem, the CLI builds openai-whisper's temperature fallback tuple, and no
output ever replaces an input file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import WhisperMLXError, WhisperMLXWarning
from .writers import OUTPUT_FORMATS, SUBTITLE_OPTIONS, ensure_not_overwriting, get_writer, output_paths

PROG = "whisper_mlx"
STDIN = "-"
STDIN_OUTPUT_NAME = "stdin"
# Options that only matter when the user sets them; None leaves the library default in charge.
_DROP_WHEN_NONE = (
    "language",
    "best_of",
    "fp16",
    "suppress_tokens",
    "initial_prompt",
    "prepend_punctuations",
    "append_punctuations",
    "hallucination_silence_threshold",
)
_NOT_TRANSCRIBE_OPTIONS = (
    "audio",
    "model",
    "device",  # model loading's
    "model_dir",
    "output_dir",
    "output_name",
    "output_format",
    "quiet",
    "temperature_increment_on_fallback",
    *SUBTITLE_OPTIONS,
)


# ---- thin seams over the library, looked up at call time so tests can replace them ----


def default_model_path() -> Path:
    from .load_models import default_model_path as library_default_model_path

    return library_default_model_path()


def load_model(
    path_or_name: str | Path,
    fp16: bool | None = None,
    backend: str | None = None,
    device: str | None = None,
    download_root: str | None = None,
):
    """Load the model once; `fp16=None` keeps the loader's default dtype, `backend=None` the default
    choice (WHISPER_MLX_BACKEND or auto), `device=None` MLX's default device."""
    from .load_models import load_model as library_load_model

    dtype = None
    if fp16 is not None:
        import mlx.core as mx

        dtype = mx.float16 if fp16 else mx.float32
    return library_load_model(path_or_name, dtype=dtype, backend=backend, device=device, download_root=download_root)


def backend_summary(model) -> str:
    """One line on what runs the model: backend, device, dtype."""
    from .backends import backend_info

    info = backend_info(model)
    dtype = str(getattr(model, "dtype", info["default_dtype"])).replace("mlx.core.", "")
    return f"{info['backend']} on {info['device']} ({dtype})"


def transcribe(audio: str, **options) -> dict:
    from .transcribe import transcribe as library_transcribe

    return library_transcribe(audio, **options)


# ---- argument types ----


def str2bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


def optional_int(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


# ---- parser, one helper per group of flags ----


def _add_input_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", nargs="+", help="audio file(s) to transcribe; '-' reads audio bytes from stdin")
    parser.add_argument(
        "--model",
        default=None,
        help="model name, Hugging Face repo id or local path (default: the installed offline model)",
    )
    parser.add_argument("--output-dir", "-o", default=".", help="directory for the outputs")
    parser.add_argument("--output-name", default=None, help="output base name (only with a single input)")
    parser.add_argument(
        "--output-format", "-f", default="txt", choices=[*OUTPUT_FORMATS, "all"], help="format of the output file(s)"
    )
    parser.add_argument(
        "--verbose",
        type=str2bool,
        default=True,
        help="True prints segments as they are decoded; False shows a progress bar",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--task",
        default="transcribe",
        choices=["transcribe", "translate"],
        help="transcribe in the spoken language, or translate to English",
    )
    group.add_argument("--language", default=None, help="spoken language (code or name); default: detect it")
    group.add_argument(
        "--batch-size", type=positive_int, default=1, help="30-second windows decoded together; 1 is sequential"
    )
    group.add_argument(
        "--vad-filter",
        type=str2bool,
        default=False,
        help="decode only the speech the voice-activity detector finds (batched mode always does)",
    )
    group.add_argument(
        "--vad", default="silero", choices=["silero", "energy"], help="voice-activity detector: Silero VAD or energy"
    )
    group.add_argument(
        "--suppress-tokens",
        default="-1",
        help="comma-separated token ids to suppress; -1 suppresses most special characters",
    )
    group.add_argument("--initial-prompt", default=None, help="text used as the prompt of the first window")
    group.add_argument(
        "--carry-initial-prompt",
        type=str2bool,
        default=False,
        help="prepend the initial prompt to every window's prompt",
    )
    group.add_argument(
        "--condition-on-previous-text",
        type=str2bool,
        default=True,
        help="prompt each window with the previous window's text",
    )


def _add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and device")
    group.add_argument(
        "--backend",
        default=None,
        choices=["auto", "mlx", "numpy"],
        help="what computes: mlx (Metal, CUDA or CPU) or numpy (CPU, float32); default: $WHISPER_MLX_BACKEND or auto",
    )
    group.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda", "mps", "gpu"],
        help="the device MLX computes on (cuda, mps and gpu: the GPU); default: MLX's default device",
    )
    group.add_argument(
        "--model-dir",
        default=None,
        help="where models named by --model are downloaded; default: the Hugging Face cache",
    )
    group.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compute in float16 (--no-fp16: float32); default: the library's choice",
    )


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("beam search and sampling")
    group.add_argument(
        "--best-of", type=optional_int, default=5, help="candidates sampled when the temperature is not zero"
    )
    group.add_argument(
        "--beam-size",
        type=optional_int,
        default=None,
        help="beams searched at temperature 0 (openai's CLI uses 5); default: greedy decoding",
    )
    group.add_argument(
        "--patience",
        type=optional_float,
        default=None,
        help="beam search stops at beam size x patience finished candidates (arXiv:2204.05424); default 1.0",
    )
    group.add_argument(
        "--length-penalty",
        type=optional_float,
        default=None,
        help="rank candidates with Google NMT's length penalty alpha (0 to 1); default: length normalisation",
    )


def _add_fallback_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("temperature fallback")
    group.add_argument("--temperature", type=non_negative_float, default=0.0, help="first sampling temperature")
    group.add_argument(
        "--temperature-increment-on-fallback",
        type=optional_float,
        default=0.2,
        help="step up to 1.0 when a window fails the thresholds below; 0 or None: no fallback",
    )
    group.add_argument(
        "--compression-ratio-threshold",
        type=optional_float,
        default=2.4,
        help="fall back when the gzip compression ratio exceeds this",
    )
    group.add_argument(
        "--logprob-threshold",
        type=optional_float,
        default=-1.0,
        help="fall back when the average log probability is below this",
    )
    group.add_argument(
        "--no-speech-threshold",
        type=optional_float,
        default=0.6,
        help="treat a window as silence above this no-speech probability (with the logprob test)",
    )
    group.add_argument(
        "--seed",
        type=optional_int,
        default=0,
        help="fixes the samples drawn at temperatures above 0: the same text in every run; None: random",
    )


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timestamps")
    group.add_argument("--word-timestamps", type=str2bool, default=False, help="extract word-level timestamps")
    group.add_argument("--prepend-punctuations", default=None, help="punctuation merged into the next word")
    group.add_argument("--append-punctuations", default=None, help="punctuation merged into the previous word")
    group.add_argument(
        "--clip-timestamps", default="0", help="comma-separated start,end,start,end,... seconds of the clips to process"
    )
    group.add_argument(
        "--hallucination-silence-threshold",
        type=optional_float,
        default=None,
        help="with word timestamps, skip silences longer than this (seconds) around hallucinations",
    )


def _add_subtitle_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("subtitles (need --word-timestamps True)")
    group.add_argument("--highlight-words", type=str2bool, default=False, help="underline each word as it is spoken")
    group.add_argument("--max-line-width", type=positive_int, default=None, help="maximum characters per line")
    group.add_argument("--max-line-count", type=positive_int, default=None, help="maximum lines per subtitle")
    group.add_argument("--max-words-per-line", type=positive_int, default=None, help="maximum words per line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Transcribe or translate speech with Whisper on MLX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_input_output_arguments(parser)
    _add_decoding_arguments(parser)
    _add_compute_arguments(parser)
    _add_search_arguments(parser)
    _add_fallback_arguments(parser)
    _add_timing_arguments(parser)
    _add_subtitle_arguments(parser)
    return parser


# ---- turning arguments into library options ----


def normalize_language(language: str | None) -> str | None:
    """Map a language name or code to its code; raise ValueError for an unknown one."""
    if language is None or language.lower() in ("none", "auto"):
        return None
    try:
        from .tokenizer import LANGUAGES, TO_LANGUAGE_CODE
    except ImportError:  # the tokenizer cannot load; let transcribe() judge the language
        return language
    lowered = language.lower()
    if lowered in LANGUAGES:
        return lowered
    if lowered in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[lowered]
    raise ValueError(f"unknown language {language!r}")


def build_temperatures(temperature: float, increment: float | None):
    """openai-whisper's fallback schedule: `temperature, temperature + increment, ... <= 1.0`.

    A missing or zero increment means a single temperature and no fallback.
    """
    if not increment:
        return temperature
    schedule = tuple(float(t) for t in np.arange(temperature, 1.0 + 1e-6, increment))
    return schedule or (temperature,)


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent flags the way openai-whisper does (parser.error exits with status 2)."""
    if args.output_name is not None and len(args.audio) != 1:
        parser.error("--output-name needs exactly one input file")
    if args.audio.count(STDIN) > 1:
        parser.error("'-' (stdin) can be given only once")
    if args.temperature_increment_on_fallback is not None and args.temperature_increment_on_fallback < 0:
        parser.error("--temperature-increment-on-fallback must be >= 0")
    if not args.word_timestamps:
        for option in SUBTITLE_OPTIONS:
            if getattr(args, option):
                parser.error(f"--{option.replace('_', '-')} requires --word-timestamps True")
    if args.max_line_count and not args.max_line_width:
        report_warning("--max-line-count has no effect without --max-line-width")
    if args.max_words_per_line and args.max_line_width:
        report_warning("--max-words-per-line has no effect with --max-line-width")
    try:
        args.language = normalize_language(args.language)
    except ValueError as exc:
        parser.error(str(exc))


def choose_verbose(verbose: bool, quiet: bool, stderr_is_tty: bool) -> bool | None:
    """True prints segments; False shows a progress bar (only on a terminal); None prints nothing."""
    if quiet:
        return None
    if verbose:
        return True
    return False if stderr_is_tty else None


def build_transcribe_options(args: argparse.Namespace, stderr_is_tty: bool = False) -> dict:
    """The keyword arguments for `transcribe()` (the model excluded)."""
    options = {key: value for key, value in vars(args).items() if key not in _NOT_TRANSCRIBE_OPTIONS}
    options["temperature"] = build_temperatures(args.temperature, args.temperature_increment_on_fallback)
    options["verbose"] = choose_verbose(args.verbose, args.quiet, stderr_is_tty)
    for key in _DROP_WHEN_NONE:
        if options.get(key) is None:
            options.pop(key, None)
    return options


def writer_options(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in SUBTITLE_OPTIONS}


# ---- running ----


def assign_output_names(inputs: Sequence[str], output_name: str | None = None) -> list:
    """One distinct output base name per input: its stem, with `-2`, `-3`, ... added on a clash.

    Names are compared case-insensitively (macOS file systems are), and an added suffix never takes
    a name that another input's own stem will use.
    """
    if output_name is not None:
        return [output_name] * len(inputs)
    stems = [STDIN_OUTPUT_NAME if path == STDIN else os.path.splitext(os.path.basename(path))[0] for path in inputs]
    own_stems = {stem.casefold() for stem in stems}
    taken, names = set(), []
    for stem in stems:
        name, counter = stem, 2
        while name.casefold() in taken or (name != stem and name.casefold() in own_stems):
            name, counter = f"{stem}-{counter}", counter + 1
        taken.add(name.casefold())
        names.append(name)
    return names


def read_stdin_to_file(stdin_bytes: bytes) -> str:
    """Store audio bytes from stdin in a temporary file (the caller deletes it) and return its path."""
    if not stdin_bytes:
        raise WhisperMLXError("no audio data on stdin")
    with tempfile.NamedTemporaryFile(prefix="whisper_mlx_stdin_", delete=False) as handle:
        handle.write(stdin_bytes)
    return handle.name


def report_error(label: str, message: str) -> None:
    print(f"{PROG}: error: {label}: {_one_line(message)}", file=sys.stderr)


def _one_line(message: str) -> str:
    """A message on one line: a multi-line exception text must not break the one-error-per-line output."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def report_warning(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def existing_inputs(inputs: Sequence[str]) -> list:
    """The inputs that can be read ('-' included); reports each missing file or directory."""
    usable = []
    for path in inputs:
        if path == STDIN or os.path.isfile(path):
            usable.append(path)
        else:
            report_error(path, "is a directory, not an audio file" if os.path.isdir(path) else "no such file")
    return usable


def _message_without_path(exc: BaseException | str, path: str) -> str:
    """The exception text without a leading `<path>: `, which report_error already shows."""
    message = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def transcribe_reporting_warnings(audio_file: str, label: str, model, options: dict) -> dict:
    """transcribe(), with each warning it issues (e.g. a truncated file) printed as one CLI line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WhisperMLXWarning)
        try:
            return transcribe(audio_file, model=model, **options)
        finally:
            for warning in caught:
                report_warning(f"{label}: {_message_without_path(warning.message, audio_file)}")


def refuse_overwriting_inputs(args: argparse.Namespace, name: str, protected: list) -> None:
    """Raise before anything is transcribed if one of this input's outputs would replace an input."""
    for target in output_paths(args.output_format, args.output_dir, name):
        ensure_not_overwriting(target, protected)


def transcribe_one(audio: str, name: str, model, args: argparse.Namespace, options: dict, protected: list) -> None:
    """Transcribe one input and write its output set; raises on failure."""
    refuse_overwriting_inputs(args, name, protected)
    audio_file = read_stdin_to_file(sys.stdin.buffer.read()) if audio == STDIN else audio
    try:
        result = transcribe_reporting_warnings(audio_file, "<stdin>" if audio == STDIN else audio, model, options)
    finally:
        if audio == STDIN:
            os.unlink(audio_file)
    writer = get_writer(args.output_format, args.output_dir)
    writer(result, audio_file, writer_options(args), output_name=name, protected_paths=protected)


def load_requested_model(args: argparse.Namespace):
    """The model from --model, or the library's default model; WhisperMLXError/OSError on failure."""
    path_or_name = args.model if args.model is not None else default_model_path()
    return load_model(
        path_or_name, fp16=args.fp16, backend=args.backend, device=args.device, download_root=args.model_dir
    )


def run_all(args: argparse.Namespace, inputs: Sequence[str], model) -> int:
    """Transcribe every input, reporting failures and carrying on; 1 if any failed."""
    options = build_transcribe_options(args, stderr_is_tty=sys.stderr.isatty())
    protected = [path for path in args.audio if path != STDIN]
    names = assign_output_names(inputs, args.output_name)
    os.makedirs(args.output_dir, exist_ok=True)
    if len(inputs) > 1 and engine_can_run(model):
        return run_many(args, inputs, names, model, options, protected)
    failed = False
    for audio, name in zip(inputs, names):
        label = "<stdin>" if audio == STDIN else audio
        try:
            transcribe_one(audio, name, model, args, options, protected)
        except Exception as exc:  # keep going with the other files
            report_failure(label, audio, exc)
            failed = True
    return 1 if failed else 0


def report_failure(label: str, audio: str, exc: BaseException) -> None:
    if isinstance(exc, (WhisperMLXError, OSError, ValueError)):
        report_error(label, _message_without_path(exc, audio))
    else:
        report_error(label, f"unexpected {type(exc).__name__}: {exc}")


def engine_can_run(model) -> bool:
    """Whether the batching engine can drive this model (a loaded Whisper; not a stand-in)."""
    from .whisper import Whisper

    return isinstance(model, Whisper)


MANY_BATCH_SIZE = 12  # windows per batch across files, whatever --batch-size cuts each file into


def run_many(args: argparse.Namespace, inputs: Sequence[str], names: list, model, options: dict, protected) -> int:
    """Several files through transcribe_many, each file's outputs written as it completes; each file
    transcribed as `transcribe` does it alone (its own --batch-size lanes)."""
    from .many import transcribe_many

    failed = False
    jobs: dict[str, list[tuple[str, str]]] = {}  # audio file -> (input as given, output name) per mention
    for audio, name in zip(inputs, names):
        try:
            refuse_overwriting_inputs(args, name, protected)
            audio_file = read_stdin_to_file(sys.stdin.buffer.read()) if audio == STDIN else audio
        except Exception as exc:
            report_failure("<stdin>" if audio == STDIN else audio, audio, exc)
            failed = True
            continue
        jobs.setdefault(audio_file, []).append((audio, name))
    verbose = options.pop("verbose", None)  # segments print per file, not interleaved across files
    input_batch_size = options.pop("batch_size", None) or 1
    batch_size = max(MANY_BATCH_SIZE, input_batch_size)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", WhisperMLXWarning)
            files = [audio_file for audio_file, mentions in jobs.items() for _ in mentions]
            try:
                for item, result in transcribe_many(
                    files, model=model, batch_size=batch_size, input_batch_size=input_batch_size, **options
                ):
                    audio, name = jobs[str(item)].pop(0)
                    report_caught_warnings(caught, jobs, inputs)
                    failed |= not write_completed(args, audio, str(item), name, result, protected, verbose)
            except Exception as exc:  # options every file shares are bad: each remaining file fails with them
                for audio_file, mentions in jobs.items():
                    for audio, _ in mentions:
                        report_failure("<stdin>" if audio == STDIN else audio, audio_file, exc)
                failed = True
            report_caught_warnings(caught, jobs, inputs)
    finally:
        for audio_file in jobs:
            if audio_file not in inputs:  # stdin's temporary file
                os.unlink(audio_file)
    return 1 if failed else 0


def report_caught_warnings(caught: list, jobs: dict, inputs: Sequence[str]) -> None:
    """Report (and forget) the warnings caught so far, each labelled with the file it names."""
    for warning in caught:
        message = str(warning.message)
        audio_file = next((f for f in jobs if message.startswith(f"{f}: ")), None)
        if audio_file is None:
            report_warning(message)
            continue
        label = audio_file if audio_file in inputs else "<stdin>"
        report_warning(f"{label}: {_message_without_path(message, audio_file)}")
    caught.clear()


def write_completed(args, audio: str, audio_file: str, name: str, result, protected, verbose) -> bool:
    """Write one completed file's outputs (or report its error); False if it failed."""
    label = "<stdin>" if audio == STDIN else audio
    if isinstance(result, BaseException):
        report_failure(label, audio, result)
        return False
    try:
        if verbose:
            from .transcribe import print_segments

            print_segments(result["segments"], verbose)
        writer = get_writer(args.output_format, args.output_dir)
        writer(result, audio_file, writer_options(args), output_name=name, protected_paths=protected)
    except Exception as exc:
        report_failure(label, audio, exc)
        return False
    return True


# subcommands with their own options and optional extras; their modules are imported only when used
SUBCOMMANDS = {"serve": "whisper_mlx.server", "corpus": "whisper_mlx.corpus"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 if any input or the model failed, 2 for usage errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS and not Path(argv[0]).exists():  # an audio file may be called "serve"
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        validate_args(parser, args)
    except SystemExit as exit_request:  # argparse: --help (0) or a usage error (2)
        return exit_request.code if isinstance(exit_request.code, int) else 2
    try:
        return run_cli(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def run_cli(args: argparse.Namespace) -> int:
    """Check the inputs, load the model once, transcribe everything; the exit status."""
    inputs = existing_inputs(args.audio)
    if not inputs:
        return 1
    try:
        model = load_requested_model(args)
    except (WhisperMLXError, OSError, ValueError, ImportError) as exc:
        print(f"{PROG}: error: cannot load the model: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a broken model must not dump a traceback on the user
        print(f"{PROG}: error: cannot load the model: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.verbose and not args.quiet:
        print(f"Backend: {backend_summary(model)}")  # beside "Detected language": stderr keeps errors only
    status = run_all(args, inputs, model)
    return 1 if len(inputs) < len(args.audio) else status


if __name__ == "__main__":
    sys.exit(main())
