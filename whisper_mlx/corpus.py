"""Corpus runs on Ray: `whisper_mlx corpus INPUT_DIR|LIST_FILE --output-dir OUT`.

Audio files are decoded in parallel Ray tasks; an actor pool (each actor loads the model once)
transcribes them several inputs at a time; the driver writes each input's outputs with the CLI's
writers and naming, and records every input in `OUT/manifest.jsonl`. A re-run skips what is done and
retries what failed. Ray is an optional extra (`pip install 'whisper_mlx[ray]'`): it is imported only
when a corpus run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE, load_audio
from .cli import positive_int
from .errors import WhisperMLXError, WhisperMLXWarning
from .writers import OUTPUT_FORMATS, WRITERS, format_paths, output_name_for

PROG = "whisper_mlx corpus"
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".manifest.lock"
RAY_MISSING = "corpus runs need Ray: pip install 'whisper_mlx[ray]'"
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".mp3", ".m4a", ".mp4", ".ogg", ".oga", ".opus", ".webm", ".aac", ".wma", ".aiff", ".aif"}
    | {".mka", ".mkv", ".mov", ".amr", ".3gp"}
)
# a decoding task's CPU share; the actors take up to one CPU each, leaving decoding at least this much
DECODE_TASK_CPUS = 0.5
ACTOR_CPUS = 1.0
ADDRESS_TIMEOUT_SECONDS = 5.0
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor names in its error messages
_RAISED_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


class CorpusError(WhisperMLXError):
    """A corpus run that cannot start (no inputs, an unwritable output directory, no Ray, no cluster) or
    that Ray stopped; one input's failure is recorded in the manifest instead."""


@dataclass(frozen=True)
class CorpusItem:
    """One input of the corpus and the base name of its outputs."""

    input: str
    name: str


@dataclass
class CorpusSummary:
    """What a corpus run did: inputs in the corpus, transcribed now, skipped as done, failed now."""

    total: int
    transcribed: int
    skipped: int
    failed: int
    manifest: str
    seconds: float
    errors: dict[str, str]
    warnings: dict[str, str]

    def line(self) -> str:
        return (
            f"{self.total} inputs: {self.transcribed} transcribed, {self.skipped} already done, "
            f"{self.failed} failed ({self.seconds:.1f} s); manifest {self.manifest}"
        )


# ---- the corpus: discovery, names, manifest ----


def discover_inputs(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The corpus's audio files as absolute paths, in a stable order, each once.

    `source` is a directory (its audio files, recursively, hidden ones skipped), a text file listing
    one path per line (blank lines and `#` comments skipped; relative paths are relative to the list's
    directory), or a sequence of paths. Listed files are taken as they are: a missing one is an error
    of that input, recorded in the manifest.
    """
    if isinstance(source, (str, os.PathLike)):
        paths = _paths_in_source(Path(source))
    else:
        paths = [Path(path) for path in source]
    inputs = list(dict.fromkeys(str(path.absolute()) for path in paths))
    if not inputs:
        raise CorpusError(f"{_label(source)}: empty corpus (no audio files)")
    return inputs


def _label(source: object) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the input list"


def _paths_in_source(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(
            path
            for path in source.rglob("*")
            if path.suffix.lower() in AUDIO_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(source).parts)
            and path.is_file()
        )
    if source.is_file():
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"{source}: cannot read the list file ({exc})") from None
        entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [source.parent / entry for entry in entries]
    raise CorpusError(f"{source}: no such input directory or list file")


def assign_names(inputs: Sequence[str], previous: dict[str, str]) -> list[CorpusItem]:
    """One output base name per input, the CLI's way (its stem, `-2`, `-3`, ... on a clash, compared
    case-insensitively); an input named in an earlier run keeps that name, and no new input takes a
    name an earlier run gave to another input."""
    names = {path: previous[path] for path in inputs if path in previous}
    taken = {name.casefold() for name in previous.values()}
    own_stems = {output_name_for(path).casefold() for path in inputs if path not in names}
    for path in inputs:
        if path in names:
            continue
        stem = output_name_for(path)
        name, counter = stem, 2
        while name.casefold() in taken or (name != stem and name.casefold() in own_stems):
            name, counter = f"{stem}-{counter}", counter + 1
        taken.add(name.casefold())
        names[path] = name
    return [CorpusItem(path, names[path]) for path in inputs]


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """The manifest's last entry per input; a line cut short by an interrupted run is ignored."""
    entries: dict[str, dict] = {}
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                    entries[entry["input"]] = entry
    except FileNotFoundError:
        pass
    return entries


def append_manifest(path: str, entry: dict) -> None:
    # appended as each input finishes, so an interrupted run keeps what it did
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(entry, ensure_ascii=False) + "\n")


def rewrite_manifest(path: str, entries: Iterable[dict]) -> None:
    """Replace the manifest with one line per input (atomically: a crash leaves the old one)."""
    directory = os.path.dirname(path) or "."
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, suffix=".tmp", delete=False) as file:
        for entry in entries:
            file.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(file.name, path)


def is_done(entry: dict | None, output_dir: str, name: str, formats: Sequence[str]) -> bool:
    """Done: the manifest says ok and every requested output exists."""
    if entry is None or entry.get("status") != "ok":
        return False
    return all(os.path.isfile(path) for path in format_paths(formats, output_dir, name))


def previous_names(entries: dict[str, dict]) -> dict[str, str]:
    """Base names earlier runs wrote outputs under, per input."""
    return {
        path: output_name_for(entry["outputs"][0])
        for path, entry in entries.items()
        if entry.get("status") == "ok" and entry.get("outputs")
    }


def error_entry(path: str, message: str, duration: float | None = None, warning: str | None = None) -> dict:
    return {
        "input": path,
        "status": "error",
        "duration": duration,
        "language": None,
        "outputs": [],
        "error": message,
        "warning": warning,
    }


def one_line(exc: BaseException | str) -> str:
    message = str(exc) or type(exc).__name__
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


# ---- writing outputs ----


def file_identities(paths: Iterable[str]) -> set[tuple[int, int]]:
    """(device, inode) of each existing input: an output path is refused if it is one of them."""
    identities = set()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        identities.add((stat.st_dev, stat.st_ino))
    return identities


def write_outputs(result: dict, item: CorpusItem, output_dir: str, formats: Sequence[str], inputs: set) -> list[str]:
    """Write every requested format for one input; refuses (before writing any) to replace an input.
    Returns the paths written, relative to `output_dir` (the manifest's directory: a moved output
    directory keeps a valid manifest)."""
    targets = format_paths(formats, output_dir, item.name)
    for target in targets:
        try:
            stat = os.stat(target)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in inputs:
            raise CorpusError(f"refusing to write {target}: it is an input audio file; choose another --output-dir")
    written = [WRITERS[fmt](output_dir)(result, item.input, output_name=item.name) for fmt in formats]
    return [os.path.relpath(path, output_dir) for path in written]


def check_output_dir(output_dir: str) -> None:
    """Create the output directory and prove it writable, or raise CorpusError."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CorpusError(f"{output_dir}: the output directory is a file")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise CorpusError(f"{output_dir}: cannot write to the output directory ({exc.strerror or exc})") from None


@contextlib.contextmanager
def exclusive_output_dir(output_dir: str) -> Iterator[None]:
    """Hold OUT's lock for the run: two runs appending to one manifest would redo each other's work."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not guarded
        yield
        return
    with open(os.path.join(output_dir, LOCK_NAME), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CorpusError(f"{output_dir}: another corpus run is writing to this output directory") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def normalize_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    requested = (formats,) if isinstance(formats, str) else tuple(formats)
    if "all" in requested:
        return OUTPUT_FORMATS
    unknown = [fmt for fmt in requested if fmt not in OUTPUT_FORMATS]
    if unknown or not requested:
        expected = ", ".join(OUTPUT_FORMATS)
        raise CorpusError(f"unknown output format {unknown or requested!r}; expected {expected} or all")
    return tuple(dict.fromkeys(requested))


# ---- Ray: connection, decoding tasks, transcription actors ----


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise CorpusError(RAY_MISSING) from None
    return ray


def check_address_reachable(address: str) -> None:
    """Fail fast on a cluster address nothing listens on (ray.init would wait for minutes)."""
    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise CorpusError(f"{address}: not a Ray address (expected HOST:PORT, ray://HOST:PORT or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_SECONDS):
            pass
    except OSError as exc:
        raise CorpusError(f"{address}: cannot reach the Ray cluster ({exc.strerror or exc})") from None


def connect_ray(address: str | None, workers: int) -> bool:
    """Join the Ray instance this process already has, the cluster at `address`, or start a local one
    (quiet, no dashboard); True when this call connected and the run should disconnect at the end."""
    ray = import_ray()
    if address:
        check_address_reachable(address)
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # "local": a new instance even where `ray start` left one running (ray.init would join it)
            cpus = max(os.cpu_count() or 1, workers + 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
    except CorpusError:
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError for a bad cluster
        raise CorpusError(f"cannot start or join Ray{f' at {address}' if address else ''}: {one_line(exc)}") from None
    return True


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: one input decoded to 16 kHz mono, or the reason it cannot be; with the warnings the
    decoding issued (a truncated file), which would otherwise end in a worker's log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WhisperMLXWarning)
        try:
            audio = load_audio(row["input"])
        except Exception as exc:  # recorded in the manifest; the corpus goes on
            audio, error = np.zeros(0, np.float32), one_line(exc)
        else:
            error = ""
    issued = [one_line(str(w.message)) for w in caught if issubclass(w.category, WhisperMLXWarning)]
    return {**row, "audio": audio, "duration": audio.size / SAMPLE_RATE, "error": error, "warning": "; ".join(issued)}


def transcribe_waveforms(model, waveforms: Sequence[np.ndarray], batch_size: int, options: dict) -> list[Any]:
    """Each waveform's transcribe() result, or the exception it raised; the inputs' windows share
    decoding batches (transcribe_many), and each input gets what transcribe() gives it alone."""
    from .many import transcribe_many

    position = {id(waveform): index for index, waveform in enumerate(waveforms)}
    results: list[Any] = [None] * len(waveforms)
    for waveform, result in transcribe_many(waveforms, model=model, batch_size=batch_size, **options):
        results[position[id(waveform)]] = result
    return results


def root_reason(exc: BaseException) -> str:
    """The innermost `SomeError: message` line of a Ray error (its text holds the remote traceback)."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(exc)).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED_LINE.match(line)]
    return _shortened(raised[-1] if raised else one_line("; ".join(lines[:1]) or type(exc).__name__))


def _shortened(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Transcriber:
    """Ray actor: loads the model once, transcribes a batch of decoded inputs together."""

    def __init__(self, model: str | None, batch_size: int, options: dict):
        from .load_models import default_model_path, get_cached_model

        self.model = get_cached_model(model or default_model_path(), backend=options.get("backend"))
        self.batch_size = batch_size
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = [str(error) for error in batch["error"]]
        decoded = [index for index, error in enumerate(errors) if not error]
        results = transcribe_waveforms(self.model, [batch["audio"][i] for i in decoded], self.batch_size, self.options)
        as_json = [""] * len(errors)
        for index, result in zip(decoded, results):
            if isinstance(result, BaseException):
                errors[index] = one_line(result)
            else:
                as_json[index] = json.dumps(result, ensure_ascii=False, default=_json_default)
        return {
            "input": batch["input"],
            "name": batch["name"],
            "duration": batch["duration"],
            "warning": batch["warning"],
            "result": np.array(as_json, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def actor_cpus(workers: int) -> float:
    """Each actor's CPU share: up to one, and never so much that no decoding task could run beside
    the actors (Ray would wait forever for a free CPU)."""
    ray = import_ray()
    total = float(ray.cluster_resources().get("CPU", 0.0))
    share = min(ACTOR_CPUS, (total - DECODE_TASK_CPUS) / workers)
    if share < 0.1:
        raise CorpusError(f"{workers} workers do not fit the Ray cluster's {total:g} CPUs (use fewer --workers)")
    return round(share, 2)


def check_model(model: str | None) -> None:
    """A model that does not exist fails here, in one line, rather than in every actor's constructor."""
    if model is None:
        return
    from .load_models import resolve_model_path

    try:
        resolve_model_path(model)
    except (WhisperMLXError, OSError, ValueError) as exc:
        raise CorpusError(f"cannot load the model: {one_line(exc)}") from None


@contextlib.contextmanager
def quiet_ray_data(ray) -> Iterator[None]:
    """No progress bars and no logged tracebacks while the run goes (its errors end as one line)."""
    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    progress_bars, level = context.enable_progress_bars, logger.level
    context.enable_progress_bars = False
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        context.enable_progress_bars = progress_bars
        logger.setLevel(level)


def build_dataset(items: Sequence[CorpusItem], workers: int, model: str | None, batch_size: int, options: dict):
    """The Ray Data pipeline: a decoding task per input, then the actor pool, batch_size inputs per call."""
    ray = import_ray()
    cpus = actor_cpus(workers)
    rows = [{"input": item.input, "name": item.name} for item in items]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    dataset = dataset.map(decode_row, num_cpus=DECODE_TASK_CPUS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # max_restarts has no named parameter yet
        return dataset.map_batches(
            Transcriber,
            fn_constructor_kwargs={"model": model, "batch_size": batch_size, "options": options},
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=cpus,
            # Ray's default restarts a crashed actor and retries its batch forever: an input that crashes
            # the process would hang the run; without restarts the run stops and a re-run resumes. (Remote
            # args that differ from the decoding tasks' also keep Ray Data from fusing decoding into the actors.)
            max_restarts=0,
        )


def transcribed_rows(items: Sequence[CorpusItem], workers: int, model: str | None, batch_size: int, options: dict):
    """The pipeline's rows as inputs finish; a run Ray stops raises CorpusError."""
    ray = import_ray()
    dataset = build_dataset(items, workers, model, batch_size, options)
    try:
        with quiet_ray_data(ray):
            yield from dataset.iter_rows()
    except Exception as exc:  # a crashed actor or a lost node: what is done is in the manifest
        raise CorpusError(f"the Ray run stopped (re-run to resume): {root_reason(exc)}") from None


# ---- the run ----


def finish_row(row: dict, output_dir: str, formats: Sequence[str], inputs: set) -> dict:
    """Write a transcribed row's outputs; its manifest entry (ok, or the error that stopped it)."""
    item = CorpusItem(str(row["input"]), str(row["name"]))
    duration = round(float(row["duration"]), 3) if row["duration"] else None
    warning = str(row["warning"]) or None
    if row["error"]:
        return error_entry(item.input, str(row["error"]), duration, warning)
    result = json.loads(row["result"])
    try:
        outputs = write_outputs(result, item, output_dir, formats, inputs)
    except (WhisperMLXError, OSError, ValueError) as exc:
        return error_entry(item.input, one_line(exc), duration, warning)
    return {
        "input": item.input,
        "status": "ok",
        "duration": duration,
        "language": result.get("language"),
        "outputs": outputs,
        "error": None,
        "warning": warning,
    }


def transcribe_corpus(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    model: str | None = None,
    formats: str | Sequence[str] = ("txt",),
    workers: int = 1,
    address: str | None = None,
    batch_size: int = 12,
    **options,
) -> CorpusSummary:
    """Transcribe a corpus on Ray and write each input's outputs and `output_dir/manifest.jsonl`.

    inputs: a directory, a list file or a sequence of audio paths (see discover_inputs). model: a
    name, Hub repo id or path (default: the installed offline model). workers: transcription actors,
    each holding one model. address: a Ray cluster (default: this process's Ray, else a local
    instance). Remaining keywords are transcribe()'s options (language, task, ...). Inputs the manifest
    records as done, with their outputs present, are skipped; failed ones are retried. Raises
    CorpusError when the run cannot start; an input that fails is recorded, not raised.
    """
    started = time.monotonic()
    if workers < 1 or batch_size < 1:
        raise CorpusError("workers and batch_size must be >= 1")
    chosen_formats = normalize_formats(formats)
    corpus = discover_inputs(inputs)
    out = os.fspath(output_dir)
    check_output_dir(out)
    with exclusive_output_dir(out):
        todo, skipped, failed, warned = run_corpus(
            corpus, out, chosen_formats, workers, address, model, batch_size, options
        )
    return CorpusSummary(
        total=len(corpus),
        transcribed=todo - len(failed),
        skipped=skipped,
        failed=len(failed),
        manifest=os.path.join(out, MANIFEST_NAME),
        seconds=time.monotonic() - started,
        errors=failed,
        warnings=warned,
    )


def run_corpus(
    corpus: list[str],
    out: str,
    formats: tuple[str, ...],
    workers: int,
    address: str | None,
    model: str | None,
    batch_size: int,
    options: dict,
) -> tuple[int, int, dict[str, str], dict[str, str]]:
    """Transcribe what the manifest does not record as done; (inputs run, inputs skipped, each failed
    input's error, each warned input's warning)."""
    manifest_path = os.path.join(out, MANIFEST_NAME)
    entries = read_manifest(manifest_path)
    items = assign_names(corpus, previous_names(entries))
    todo = [item for item in items if not is_done(entries.get(item.input), out, item.name, formats)]
    failed: dict[str, str] = {}
    warned: dict[str, str] = {}
    if todo:
        ray = import_ray()
        check_model(model)
        connected = connect_ray(address, workers)
        try:
            protected = file_identities(corpus)
            for row in transcribed_rows(todo, workers, model, batch_size, options):
                entry = finish_row(row, out, formats, protected)
                append_manifest(manifest_path, entry)
                entries[entry["input"]] = entry
                if entry["status"] != "ok":
                    failed[entry["input"]] = entry["error"]
                if entry["warning"]:
                    warned[entry["input"]] = entry["warning"]
        finally:
            if connected:
                ray.shutdown()
    rewrite_manifest(manifest_path, _ordered_entries(entries, corpus))
    return len(todo), len(items) - len(todo), failed, warned


def _ordered_entries(entries: dict[str, dict], corpus: Sequence[str]) -> Iterator[dict]:
    """The corpus's entries in corpus order, then entries of inputs no longer in it (kept: their outputs are)."""
    in_corpus = set(corpus)
    yield from (entries[path] for path in corpus if path in entries)
    yield from (entry for path, entry in entries.items() if path not in in_corpus)


# ---- command line ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Transcribe a corpus of audio files on Ray; re-running resumes where it stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="a directory of audio files (searched recursively) or a file listing paths")
    parser.add_argument("--output-dir", "-o", required=True, help="directory for the outputs and manifest.jsonl")
    parser.add_argument("--format", "-f", default="txt", choices=[*OUTPUT_FORMATS, "all"], help="output format")
    parser.add_argument("--workers", type=positive_int, default=1, help="transcription actors, one model each")
    parser.add_argument("--model", default=None, help="model name, Hugging Face repo id or local path")
    parser.add_argument("--batch-size", type=positive_int, default=12, help="30-second windows decoded together")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray instance)")
    parser.add_argument("--language", default=None, help="spoken language (code or name); default: detect it")
    parser.add_argument("--task", default="transcribe", choices=["transcribe", "translate"], help="task")
    parser.add_argument("--backend", default=None, choices=["auto", "mlx", "numpy"], help="what computes")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from .cli import normalize_language

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.language = normalize_language(args.language)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """`whisper_mlx corpus ...`: 0 when every input is done, 1 when one failed or the run could not start,
    2 for usage errors."""
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:  # --help (0) or a usage error (2)
        return exit_request.code if isinstance(exit_request.code, int) else 2
    options = {"language": args.language, "task": args.task, "backend": args.backend}
    try:
        summary = transcribe_corpus(
            args.source,
            args.output_dir,
            model=args.model,
            formats=args.format,
            workers=args.workers,
            address=args.address,
            batch_size=args.batch_size,
            **{key: value for key, value in options.items() if value is not None},
        )
    except WhisperMLXError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (re-run to resume)", file=sys.stderr)
        return 130
    for path, message in summary.warnings.items():
        print(f"{PROG}: warning: {path}: {_without_path(message, path)}", file=sys.stderr)
    for path, message in summary.errors.items():
        print(f"{PROG}: error: {path}: {_without_path(message, path)}", file=sys.stderr)
    print(f"{PROG}: {summary.line()}")
    return 1 if summary.failed else 0


def _without_path(message: str, path: str) -> str:
    return message[len(path) + 2 :] if message.startswith(f"{path}: ") else message
