"""Transcription results (openai-whisper's dict) in the response formats of OpenAI's audio API."""

from __future__ import annotations

import io
import json

from ..tokenizer import LANGUAGES
from ..writers import WriteSRT, WriteVTT

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SEGMENT_FIELDS = (
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
)
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "text/plain; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def language_name(code: str | None) -> str:
    """OpenAI reports the language by its English name in lower case ("english"), not its code."""
    return LANGUAGES.get(code or "", code or "")


def openai_segment(segment: dict) -> dict:
    return {field: segment[field] for field in SEGMENT_FIELDS if field in segment}


def openai_words(result: dict) -> list[dict]:
    """Every word of every segment as OpenAI sends them: the word without its leading space, start, end."""
    return [
        {"word": word["word"].strip(), "start": word["start"], "end": word["end"]}
        for segment in result["segments"]
        for word in segment.get("words", [])
    ]


def verbose_json(result: dict, *, task: str, duration: float, granularities: tuple[str, ...]) -> dict:
    body: dict = {
        "task": task,
        "language": language_name(result.get("language")),
        "duration": duration,
        "text": result["text"].strip(),
    }
    if "segment" in granularities or not granularities:
        body["segments"] = [openai_segment(segment) for segment in result["segments"]]
    if "word" in granularities:
        body["words"] = openai_words(result)
    return body


def subtitles(result: dict, writer_class: type[WriteSRT] | type[WriteVTT]) -> str:
    buffer = io.StringIO()
    writer_class("").write_result(result, file=buffer)
    return buffer.getvalue()


def render(result: dict, response_format: str, *, task: str, duration: float, granularities: tuple[str, ...]) -> str:
    """The response body for `response_format` (one of RESPONSE_FORMATS), as text."""
    if response_format == "json":
        return json.dumps({"text": result["text"].strip()}, ensure_ascii=False)
    if response_format == "verbose_json":
        body = verbose_json(result, task=task, duration=duration, granularities=granularities)
        return json.dumps(body, ensure_ascii=False)
    if response_format == "srt":
        return subtitles(result, WriteSRT)
    if response_format == "vtt":
        return subtitles(result, WriteVTT)
    return result["text"].strip() + "\n"


def sse_event(payload: dict) -> str:
    """One Server-Sent Event carrying `payload` as JSON (OpenAI's streams name the type inside the data)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def delta_event(text: str) -> str:
    return sse_event({"type": "transcript.text.delta", "delta": text})


def done_event(text: str) -> str:
    return sse_event({"type": "transcript.text.done", "text": text})
