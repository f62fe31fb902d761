"""The multipart form of OpenAI's transcription and translation requests, checked into engine options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..tokenizer import LANGUAGES
from ..transcribe import DEFAULT_TEMPERATURES
from .errors import bad_request
from .formats import RESPONSE_FORMATS

GRANULARITIES = ("word", "segment")
TEXT_FIELDS = ("model", "language", "prompt", "temperature", "response_format", "stream")
GRANULARITY_FIELDS = ("timestamp_granularities[]", "timestamp_granularities")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off", "")


@dataclass
class AudioRequest:
    """One checked request: what to decode, how, and how to answer."""

    task: str
    response_format: str = "json"
    stream: bool = False
    granularities: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


def single_value(form, name: str) -> str | None:
    """The field's one text value; None when absent, a 400 when repeated or given as a file."""
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise bad_request(f"field '{name}' was given {len(values)} times", param=name)
    if not isinstance(values[0], str):
        raise bad_request(f"field '{name}' must be text, not a file", param=name)
    return values[0]


def parse_temperature(value: str | None) -> tuple[float, ...]:
    """OpenAI: 0 (the default) lets the server raise the temperature on poor output; others are fixed."""
    if value is None or value.strip() == "":
        return DEFAULT_TEMPERATURES
    try:
        temperature = float(value)
    except ValueError:
        raise bad_request(f"temperature must be a number between 0 and 1, got {value!r}", param="temperature") from None
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 1.0:
        raise bad_request(f"temperature must be between 0 and 1, got {value!r}", param="temperature")
    return DEFAULT_TEMPERATURES if temperature == 0.0 else (temperature,)


def parse_bool(value: str | None, name: str) -> bool:
    if value is None or value.strip().lower() in FALSE_WORDS:
        return False
    if value.strip().lower() in TRUE_WORDS:
        return True
    raise bad_request(f"field '{name}' must be true or false, got {value!r}", param=name)


def parse_granularities(form, task: str, response_format: str) -> tuple[str, ...]:
    values = [v for name in GRANULARITY_FIELDS for v in form.getlist(name)]
    if not values:
        return ()
    if task == "translate":
        raise bad_request("timestamp_granularities is not supported for translations", param="timestamp_granularities")
    unknown = [v for v in values if v not in GRANULARITIES]
    if unknown:
        raise bad_request(
            f"timestamp_granularities must be 'word' or 'segment', got {unknown[0]!r}", param="timestamp_granularities"
        )
    if response_format != "verbose_json":
        raise bad_request(
            "timestamp_granularities needs response_format 'verbose_json'", param="timestamp_granularities"
        )
    return tuple(g for g in GRANULARITIES if g in values)


def parse_language(value: str | None, english_only: bool) -> str | None:
    if value is None or value.strip() == "":
        return None
    code = value.strip().lower()
    if code not in LANGUAGES:
        raise bad_request(f"language must be an ISO-639-1 code such as 'en', got {value!r}", param="language")
    if english_only and code != "en":
        raise bad_request(f"the served model is English-only; language {value!r} is not available", param="language")
    return code


def check_field_names(form, task: str) -> None:
    allowed = {"file", *TEXT_FIELDS, *(GRANULARITY_FIELDS if task == "transcribe" else ())}
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise bad_request(f"unsupported field '{unknown[0]}'", param=unknown[0])


def check_model(requested: str | None, served: str, aliases: tuple[str, ...]) -> None:
    if requested is None or requested in (served, *aliases):
        return
    raise bad_request(f"model {requested!r} is not served here; use {served!r} or 'whisper-1'", param="model")


def parse_request(form, *, task: str, served_model: str, aliases: tuple[str, ...], english_only: bool) -> AudioRequest:
    """Check every field but the file; a 400 naming the first bad one."""
    check_field_names(form, task)
    check_model(single_value(form, "model"), served_model, aliases)
    response_format = single_value(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got {response_format!r}",
            param="response_format",
        )
    granularities = parse_granularities(form, task, response_format)
    options: dict[str, Any] = {
        "task": task,
        "temperature": parse_temperature(single_value(form, "temperature")),
        "word_timestamps": "word" in granularities,
    }
    language = parse_language(single_value(form, "language"), english_only)
    if language is not None:
        options["language"] = language
    prompt = single_value(form, "prompt")
    if prompt:
        options["initial_prompt"] = prompt
    stream = parse_bool(single_value(form, "stream"), "stream")
    return AudioRequest(task, response_format, stream, granularities, options)
