"""The FastAPI application: OpenAI's audio endpoints in front of one shared engine.

Every request's audio goes to the same engine, whose decoding batches mix the windows of all requests in
flight; the event loop only parses forms, waits on futures and writes responses.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio import SAMPLE_RATE, load_audio
from ..errors import WhisperMLXError
from .errors import APIError, bad_request, queue_full, server_error, unauthorized
from .formats import MEDIA_TYPES, delta_event, done_event, render, sse_event
from .limits import UploadLimitMiddleware
from .requests import AudioRequest, parse_request

MODEL_ALIASES = ("whisper-1",)
COPY_CHUNK = 1 << 20
STREAM_END = object()


@dataclass
class ServerConfig:
    """What the endpoints need to know besides the engine."""

    model_name: str
    english_only: bool
    api_key: str | None = None
    max_upload_bytes: int = 25 * 1024 * 1024
    max_queue: int = 64
    upload_dir: str | None = None


class Admission:
    """Counts requests holding engine work; a thread-safe counter because futures finish on the engine's thread."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise queue_full(self.limit)
            self.in_flight += 1

    def release(self, *_: Any) -> None:
        with self._lock:
            self.in_flight -= 1


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise unauthorized("You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise unauthorized("Incorrect API key provided.")


def copy_upload(upload: UploadFile, upload_dir: str, limit: int) -> str:
    """The upload in a file of its own under `upload_dir` (the decoders read paths); size checked on the way."""
    handle, path = tempfile.mkstemp(prefix="upload-", dir=upload_dir)
    try:
        with os.fdopen(handle, "wb") as out:
            upload.file.seek(0)
            while chunk := upload.file.read(COPY_CHUNK):
                out.write(chunk)
                if out.tell() > limit:
                    raise bad_request(f"file is larger than the limit of {limit} bytes", param="file")
            if out.tell() == 0:
                raise bad_request("file is empty", param="file")
    except BaseException:
        os.unlink(path)
        raise
    return path


def decode_upload(upload: UploadFile, upload_dir: str, limit: int) -> np.ndarray:
    """The upload's waveform; its temporary copy is removed whether decoding works or not."""
    path = copy_upload(upload, upload_dir, limit)
    try:
        return load_audio(path)
    except WhisperMLXError as exc:
        name = upload.filename or "file"
        raise bad_request(str(exc).replace(path, name), param="file") from None
    finally:
        os.unlink(path)


def as_api_error(exc: BaseException) -> APIError:
    """An engine failure as OpenAI's error: the input's fault (400) or the server's (500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (WhisperMLXError, ValueError)):
        return bad_request(str(exc))
    return server_error(f"transcription failed: {type(exc).__name__}: {exc}")


async def read_form(request: Request):
    try:
        return await request.form(max_files=1, max_fields=32)
    except APIError:
        raise
    except Exception as exc:  # starlette's MultiPartException and malformed bodies
        raise bad_request(f"the body must be multipart/form-data: {exc}") from None


def uploaded_file(form) -> UploadFile:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_request("field 'file' (the audio file) is required", param="file")
    return upload


def engine_options(parsed: AudioRequest, english_only: bool) -> dict[str, Any]:
    """transcribe()'s keywords for this request; an English-only model's output is English already, so its
    translations are transcriptions."""
    options = dict(parsed.options)
    if english_only and options["task"] == "translate":
        options["task"] = "transcribe"
    return options


class AudioEndpoint:
    """Transcriptions and translations: checks, one engine submission per request, the response."""

    def __init__(self, engine, config: ServerConfig, upload_dir: str):
        self.engine = engine
        self.config = config
        self.upload_dir = upload_dir
        self.admission = Admission(config.max_queue)

    async def __call__(self, request: Request, task: str) -> Response:
        check_api_key(request, self.config.api_key)
        form = await read_form(request)
        try:
            parsed = parse_request(
                form,
                task=task,
                served_model=self.config.model_name,
                aliases=MODEL_ALIASES,
                english_only=self.config.english_only,
            )
            upload = uploaded_file(form)
            self.admission.admit()
            return await self.admitted(request, parsed, upload)
        finally:
            await form.close()

    async def admitted(self, request: Request, parsed: AudioRequest, upload: UploadFile) -> Response:
        """Decode and submit; the admission slot is held until the engine's future is done."""
        loop = asyncio.get_running_loop()
        segments: asyncio.Queue = asyncio.Queue()
        try:
            audio = await asyncio.to_thread(decode_upload, upload, self.upload_dir, self.config.max_upload_bytes)
            on_segment = (lambda segment: post_to_loop(loop, segments, segment)) if parsed.stream else None
            options = engine_options(parsed, self.config.english_only)
            future = await asyncio.to_thread(self.engine.submit, audio, on_segment=on_segment, **options)
        except BaseException:
            self.admission.release()
            raise
        future.add_done_callback(self.admission.release)
        if parsed.stream:
            future.add_done_callback(lambda _: post_to_loop(loop, segments, STREAM_END))
            return StreamingResponse(stream_events(future, segments), media_type="text/event-stream")
        try:
            result = await result_while_connected(request, future)
        except Exception as exc:
            raise as_api_error(exc) from None
        duration = len(audio) / SAMPLE_RATE
        body = render(
            result, parsed.response_format, task=parsed.task, duration=duration, granularities=parsed.granularities
        )
        return Response(body, media_type=MEDIA_TYPES[parsed.response_format])


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read by now, so the server's next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_while_connected(request: Request, future) -> dict:
    """The engine's result; if the client leaves first, its input is cancelled so the engine drops it."""
    result = asyncio.wrap_future(future)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        future.cancel()
        raise APIError(499, "the client closed the connection", "invalid_request_error")
    return result.result()


def post_to_loop(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    """Hand an item from the engine's thread to the event loop (a closed loop means nobody is listening)."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, item)


async def stream_events(future, segments: asyncio.Queue) -> AsyncIterator[str]:
    """OpenAI's transcription stream: a text delta per final segment, then the whole text."""
    started = False
    try:
        while (segment := await segments.get()) is not STREAM_END:
            text = segment["text"] if started else segment["text"].lstrip()
            if text:
                started = True
                yield delta_event(text)
        try:
            result = await asyncio.wrap_future(future)
        except Exception as exc:
            yield sse_event(as_api_error(exc).body())
            return
        yield done_event(result["text"].strip())
    finally:
        future.cancel()  # the client left early: the engine drops an input whose future is cancelled


def models_body(config: ServerConfig, created: int) -> dict:
    model = {"id": config.model_name, "object": "model", "created": created, "owned_by": "whisper_mlx"}
    return {"object": "list", "data": [model]}


def api_error_response(_: Request, exc: Exception) -> JSONResponse:
    error = exc if isinstance(exc, APIError) else server_error(f"unexpected {type(exc).__name__}: {exc}")
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def http_error_response(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape too."""
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = exc.detail if isinstance(exc, StarletteHTTPException) else str(exc)
    error = APIError(status, str(detail), "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error.body(), status_code=status)


def create_app(
    model=None,
    *,
    engine=None,
    model_name: str = "whisper",
    english_only: bool | None = None,
    api_key: str | None = None,
    max_upload_mb: float = 25,
    max_queue: int = 64,
    upload_dir: str | None = None,
    batch_size: int = 12,
) -> FastAPI:
    """The server's app. `engine` (BatchEngine's contract: submit(audio, on_segment=, **options) -> Future)
    defaults to a BatchEngine over `model`, closed when the app shuts down; uploads are copied under
    `upload_dir` (default: a temporary directory removed at shutdown) only while they are decoded."""
    if engine is None and model is None:
        raise ValueError("create_app needs a model or an engine")
    if english_only is None:
        english_only = model is not None and not model.is_multilingual
    config = ServerConfig(model_name, english_only, api_key, int(max_upload_mb * 1024 * 1024), max_queue, upload_dir)
    owns_engine = engine is None
    if engine is None:
        from ..many import BatchEngine

        engine = BatchEngine(model, batch_size=batch_size)
    own_dir = upload_dir is None
    endpoint = AudioEndpoint(engine, config, upload_dir or tempfile.mkdtemp(prefix="whisper_mlx-uploads-"))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if owns_engine:
            await asyncio.to_thread(engine.close)
        if own_dir:
            shutil.rmtree(endpoint.upload_dir, ignore_errors=True)

    app = FastAPI(title="whisper_mlx", lifespan=lifespan)
    app.add_middleware(UploadLimitMiddleware, max_body_bytes=config.max_upload_bytes)
    app.add_exception_handler(APIError, api_error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    app.add_exception_handler(Exception, api_error_response)  # anything unforeseen: a 500 in OpenAI's shape too
    app.state.endpoint = endpoint
    add_routes(app, endpoint, config)
    return app


def add_routes(app: FastAPI, endpoint: AudioEndpoint, config: ServerConfig) -> None:
    created = int(time.time())

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await endpoint(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await endpoint(request, "translate")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_api_key(request, config.api_key)
        return models_body(config, created)

    @app.get("/v1/models/{model_id}")
    async def model(request: Request, model_id: str) -> dict:
        check_api_key(request, config.api_key)
        if model_id not in (config.model_name, *MODEL_ALIASES):
            raise APIError(
                404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
            )
        return {**models_body(config, created)["data"][0], "id": model_id}

    @app.get("/health")
    async def health() -> dict:
        admission = endpoint.admission
        return {
            "status": "ok",
            "model": config.model_name,
            "in_flight": admission.in_flight,
            "max_queue": admission.limit,
        }
