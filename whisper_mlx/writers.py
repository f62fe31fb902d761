"""Write a transcription result as txt, vtt, srt, tsv or json, with openai-whisper's semantics.

A result is the dict `transcribe()` returns: `{"text", "language", "segments": [...]}`; each segment has
`start`, `end` and `text`, and `words` (`[{"word", "start", "end", "probability"}]`) when word
timestamps were requested. Subtitle line wrapping (`max_line_width`, `max_line_count`,
`max_words_per_line`) and `highlight_words` need those words, as in openai-whisper.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from .errors import WhisperMLXError

OUTPUT_FORMATS = ("txt", "vtt", "srt", "tsv", "json")
SUBTITLE_OPTIONS = ("max_line_width", "max_line_count", "highlight_words", "max_words_per_line")

# Unlimited line width / words per line, as openai-whisper spells "no limit".
_NO_LIMIT = 1000
# A gap between words longer than this starts a new subtitle when lines are re-wrapped.
_LONG_PAUSE_SECONDS = 3.0


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """Format seconds as `[HH:]MM:SS<marker>mmm`, rounded to the millisecond.

    Hours are shown when `always_include_hours` is set or the time is an hour or more.
    """
    total_ms = round(seconds * 1000.0)
    if total_ms < 0:
        raise ValueError(f"non-negative timestamp expected, got {seconds}")
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    whole_seconds, milliseconds = divmod(rest_ms, 1_000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{whole_seconds:02d}{decimal_marker}{milliseconds:03d}"


def _same_file(path_a: str, path_b: str) -> bool:
    """True when both paths exist and name the same file (symlinks, hard links, case-folding file systems)."""
    try:
        return os.path.samefile(path_a, path_b)
    except OSError:
        return False


def ensure_not_overwriting(output_path: str, protected_paths: Iterable[str]) -> None:
    """Raise WhisperMLXError when writing `output_path` would replace one of `protected_paths` (the inputs)."""
    for protected in protected_paths:
        if protected and _same_file(output_path, protected):
            raise WhisperMLXError(
                f"refusing to write {output_path}: it is the input audio file {protected}; "
                "choose another --output-dir or --output-name"
            )


def output_name_for(audio_path_or_name: str) -> str:
    """The output base name openai-whisper derives from an input: the file name without its extension."""
    return os.path.splitext(os.path.basename(audio_path_or_name))[0]


class ResultWriter:
    """Writes one format to `<output_dir>/<name>.<extension>`; subclasses implement `write_result`."""

    extension: str

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def output_path(self, name: str) -> str:
        return os.path.join(self.output_dir, f"{name}.{self.extension}")

    def __call__(
        self,
        result: dict,
        audio_path: str,
        options: dict | None = None,
        *,
        output_name: str | None = None,
        protected_paths: Iterable[str] = (),
        **kwargs,
    ) -> str:
        """Write `result` for the input `audio_path` (a path or a bare name) and return the path written.

        The output is named after `audio_path`'s stem unless `output_name` is given. It never replaces
        `audio_path` itself nor any of `protected_paths`.
        """
        path = self.output_path(output_name or output_name_for(audio_path))
        ensure_not_overwriting(path, [audio_path, *protected_paths])
        os.makedirs(self.output_dir or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            self.write_result(result, file=file, options=options, **kwargs)
        return path

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        raise NotImplementedError


class WriteTXT(ResultWriter):
    """Plain text: one stripped segment per line."""

    extension = "txt"

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        for segment in result["segments"]:
            print(segment["text"].strip(), file=file)


def _segment_words(segment: dict) -> list:
    return segment.get("words") or []


def _first_word_start(segments: list) -> float | None:
    first_word = next((word for segment in segments for word in _segment_words(segment)), None)
    if first_word is not None:
        return first_word["start"]
    return segments[0]["start"] if segments else None


def _split_into_chunks(words: list, max_words_per_line: int) -> Iterator[list]:
    for chunk_start in range(0, len(words), max_words_per_line):
        yield words[chunk_start : chunk_start + max_words_per_line]


def _wrap_words_into_subtitles(
    segments: list, max_line_width: int, max_line_count: int | None, max_words_per_line: int, preserve_segments: bool
) -> Iterator[list]:
    """Group word timings into subtitles, openai-whisper's way; yields lists of word dicts (copies).

    A word that starts a line loses its leading space; a word that starts a second or later line of
    the same subtitle gets a leading newline. With `preserve_segments`, every chunk of up to
    `max_words_per_line` words starts a new subtitle; otherwise a subtitle ends after
    `max_line_count` lines or before a pause of more than 3 s.
    """
    subtitle: list[dict]
    line_len, line_count, subtitle = 0, 1, []
    last_start = _first_word_start(segments) or 0.0
    for segment in segments:
        for chunk in _split_into_chunks(_segment_words(segment), max_words_per_line):
            for index_in_chunk, original in enumerate(chunk):
                timing = dict(original)
                long_pause = not preserve_segments and timing["start"] - last_start > _LONG_PAUSE_SECONDS
                has_room = line_len + len(timing["word"]) <= max_line_width
                segment_break = index_in_chunk == 0 and len(subtitle) > 0 and preserve_segments
                if line_len > 0 and has_room and not long_pause and not segment_break:
                    line_len += len(timing["word"])  # continue the current line
                else:
                    timing["word"] = timing["word"].strip()
                    line_full = max_line_count is not None and (long_pause or line_count >= max_line_count)
                    if (len(subtitle) > 0 and line_full) or segment_break:
                        yield subtitle
                        subtitle, line_count = [], 1
                    elif line_len > 0:
                        line_count += 1
                        timing["word"] = "\n" + timing["word"]
                    line_len = len(timing["word"].strip())
                subtitle.append(timing)
                last_start = timing["start"]
    if subtitle:
        yield subtitle


def _underline_word(word: str) -> str:
    """`<u>` markup around a word, after any leading whitespace or newline."""
    return re.sub(r"^(\s*)(.*)$", r"\1<u>\2</u>", word, flags=re.DOTALL)


class SubtitlesWriter(ResultWriter):
    """Shared cue generation for VTT and SRT; subclasses set the timestamp style."""

    always_include_hours: bool
    decimal_marker: str

    def format_timestamp(self, seconds: float) -> str:
        return format_timestamp(seconds, self.always_include_hours, self.decimal_marker)

    def iterate_result(
        self,
        result: dict,
        options: dict | None = None,
        *,
        max_line_width: int | None = None,
        max_line_count: int | None = None,
        highlight_words: bool = False,
        max_words_per_line: int | None = None,
    ) -> Iterator[tuple]:
        """Yield `(start, end, text)` cues; keyword arguments take precedence over `options`."""
        options = options or {}
        max_line_width = max_line_width or options.get("max_line_width")
        max_line_count = max_line_count or options.get("max_line_count")
        highlight_words = highlight_words or options.get("highlight_words", False)
        max_words_per_line = max_words_per_line or options.get("max_words_per_line")
        segments = result["segments"]
        if not segments or "words" not in segments[0]:
            yield from self._segment_cues(segments)
            return
        preserve_segments = max_line_count is None or max_line_width is None
        subtitles = _wrap_words_into_subtitles(
            segments, max_line_width or _NO_LIMIT, max_line_count, max_words_per_line or _NO_LIMIT, preserve_segments
        )
        for subtitle in subtitles:
            if highlight_words:
                yield from self._highlighted_cues(subtitle)
            else:
                text = "".join(timing["word"] for timing in subtitle)
                yield self.format_timestamp(subtitle[0]["start"]), self.format_timestamp(subtitle[-1]["end"]), text

    def _segment_cues(self, segments: list) -> Iterator[tuple]:
        for segment in segments:
            text = segment["text"].strip().replace("-->", "->")
            yield self.format_timestamp(segment["start"]), self.format_timestamp(segment["end"]), text

    def _highlighted_cues(self, subtitle: list) -> Iterator[tuple]:
        """One cue per word with that word underlined, plus a plain cue for each gap between words."""
        words = [timing["word"] for timing in subtitle]
        plain_text = "".join(words)
        previous_end = self.format_timestamp(subtitle[0]["start"])
        for current_index, timing in enumerate(subtitle):
            start, end = self.format_timestamp(timing["start"]), self.format_timestamp(timing["end"])
            if previous_end != start:
                yield previous_end, start, plain_text
            marked = [_underline_word(word) if index == current_index else word for index, word in enumerate(words)]
            yield start, end, "".join(marked)
            previous_end = end


class WriteVTT(SubtitlesWriter):
    """WebVTT: `WEBVTT` header, `MM:SS.mmm` times (hours once needed)."""

    extension = "vtt"
    always_include_hours = False
    decimal_marker = "."

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        print("WEBVTT\n", file=file)
        for start, end, text in self.iterate_result(result, options, **kwargs):
            print(f"{start} --> {end}\n{text}\n", file=file)


class WriteSRT(SubtitlesWriter):
    """SubRip: cues numbered from 1, `HH:MM:SS,mmm` times."""

    extension = "srt"
    always_include_hours = True
    decimal_marker = ","

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        for cue_number, (start, end, text) in enumerate(self.iterate_result(result, options, **kwargs), start=1):
            print(f"{cue_number}\n{start} --> {end}\n{text}\n", file=file)


class WriteTSV(ResultWriter):
    """Tab-separated `start`, `end` (integer milliseconds) and `text`, one segment per row.

    Integer milliseconds avoid locale-dependent decimal separators in spreadsheets.
    """

    extension = "tsv"

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        print("start", "end", "text", sep="\t", file=file)
        for segment in result["segments"]:
            text = segment["text"].strip().replace("\t", " ").replace("\n", " ")
            print(round(1000 * segment["start"]), round(1000 * segment["end"]), text, sep="\t", file=file)


def _json_fallback(value):
    """Turn numpy / mlx scalars and arrays into plain Python for json."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class WriteJSON(ResultWriter):
    """The whole result dict as UTF-8 JSON (non-ASCII text kept as is)."""

    extension = "json"

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        json.dump(result, file, ensure_ascii=False, default=_json_fallback)


WRITERS = {"txt": WriteTXT, "vtt": WriteVTT, "srt": WriteSRT, "tsv": WriteTSV, "json": WriteJSON}


def output_paths(output_format: str, output_dir: str, name: str) -> list:
    """The files `get_writer(output_format, output_dir)` would write for the output base name `name`."""
    return format_paths(OUTPUT_FORMATS if output_format == "all" else (output_format,), output_dir, name)


def format_paths(formats: Iterable[str], output_dir: str, name: str) -> list:
    """The file each of `formats` is written to for the output base name `name`."""
    return [os.path.join(output_dir, f"{name}.{fmt}") for fmt in formats]


def get_writer(output_format: str, output_dir: str) -> Callable[..., object]:
    """A writer for one format, or for `"all"` a callable that writes every format.

    Call it as `writer(result, audio_path_or_name, options)`; `options` may hold SUBTITLE_OPTIONS.
    """
    if output_format == "all":
        writers = [writer_class(output_dir) for writer_class in WRITERS.values()]

        def write_all(result: dict, audio_path: str, options: dict | None = None, **kwargs) -> list:
            # check every target first so that a refusal leaves no partial set behind
            name = kwargs.get("output_name") or output_name_for(audio_path)
            protected = [audio_path, *kwargs.get("protected_paths", ())]
            for writer in writers:
                ensure_not_overwriting(writer.output_path(name), protected)
            return [writer(result, audio_path, options, **kwargs) for writer in writers]

        return write_all
    if output_format not in WRITERS:
        raise ValueError(f"unknown output format {output_format!r}; expected one of {', '.join(WRITERS)} or all")
    return WRITERS[output_format](output_dir)
