"""The OpenAI-compatible server (`whisper_mlx serve`), driven by the official openai client over HTTP:
a real uvicorn on a free localhost port, tiny.en decoding through one shared BatchEngine."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'whisper_mlx[server]')")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx2", reason="httpx2 (the openai client's transport) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install 'whisper_mlx[server]')")

from whisper_mlx import transcribe  # noqa: E402
from whisper_mlx.many import BatchEngine  # noqa: E402
from whisper_mlx.server import create_app  # noqa: E402
from whisper_mlx.writers import WriteSRT, WriteVTT  # noqa: E402

JFK_TEXT = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country"
API_KEY = "test-key"
MAX_UPLOAD_MB = 2
MAX_QUEUE = 3
BATCH_SIZE = 12


class GatedEngine:
    """The real BatchEngine behind a gate the tests can close, so that a request stays in flight (admitted,
    its audio decoded, waiting to be submitted) for as long as a test needs it there."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, audio, **options):
        self.gate.wait()
        self.last_future = self.engine.submit(audio, **options)
        return self.last_future


class RunningServer:
    """uvicorn serving `app` from a thread on a free localhost port."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def gated(tiny_en):
    with BatchEngine(tiny_en, batch_size=BATCH_SIZE) as engine:
        yield GatedEngine(engine)


@pytest.fixture(scope="module")
def server(tiny_en, gated, upload_dir):
    app = create_app(
        tiny_en,
        engine=gated,
        model_name="tiny.en",
        api_key=API_KEY,
        max_upload_mb=MAX_UPLOAD_MB,
        max_queue=MAX_QUEUE,
        upload_dir=str(upload_dir),
    )
    with RunningServer(app) as running:
        yield running


@pytest.fixture
def client(server, upload_dir):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as api:
        yield api
    assert list(upload_dir.iterdir()) == []  # every upload's temporary copy is gone, whatever the outcome


@pytest.fixture(scope="module")
def direct(tiny_en, data_dir) -> dict:
    """transcribe() itself on jfk, as the engine runs each input: what the server must send back."""
    return transcribe(str(data_dir / "jfk.flac"), model=tiny_en, batch_size=BATCH_SIZE)


@pytest.fixture(scope="module")
def direct_words(tiny_en, data_dir) -> dict:
    return transcribe(str(data_dir / "jfk.flac"), model=tiny_en, batch_size=BATCH_SIZE, word_timestamps=True)


def jfk(data_dir):
    return open(data_dir / "jfk.flac", "rb")


def error_of(exc_info) -> dict:
    """OpenAI's error object from a failed call (the client raises with the HTTP response attached)."""
    body = exc_info.value.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def wait_in_flight(server, count: int) -> None:
    """Until the server holds `count` admitted requests (the gate keeps them there)."""
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/health").json()["in_flight"] != count:
        assert time.monotonic() < deadline, f"never {count} requests in flight"
        time.sleep(0.01)


def transcribe_in_thread(client, data_dir) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        with jfk(data_dir) as audio:
            try:
                outcome["text"] = client.audio.transcriptions.create(model="whisper-1", file=audio).text
            except Exception as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# ---- success: every response format, words, streaming, translations, models ----


def test_json_is_the_golden_text(client, data_dir):
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert result.text == JFK_TEXT


def test_text_format(client, data_dir):
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(model="tiny.en", file=audio, response_format="text")
    assert result.strip() == JFK_TEXT


@pytest.mark.parametrize(("response_format", "writer"), [("srt", WriteSRT), ("vtt", WriteVTT)])
def test_subtitles_equal_the_writers_output_for_transcribe(client, data_dir, direct, response_format, writer):
    import io

    expected = io.StringIO()
    writer("").write_result(direct, file=expected)
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format=response_format)
    assert result == expected.getvalue()
    assert JFK_TEXT.split()[0] in result


def test_verbose_json_has_openais_shape_and_transcribes_segments(client, data_dir, direct):
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert (result.text, result.language, result.duration) == (JFK_TEXT, "english", 11.0)
    assert result.model_extra["task"] == "transcribe"
    assert result.words is None
    fields = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio")
    assert [s.model_dump(include=set(fields)) for s in result.segments] == [
        {f: segment[f] for f in fields} for segment in direct["segments"]
    ]
    assert [s.no_speech_prob for s in result.segments] == pytest.approx(
        [s["no_speech_prob"] for s in direct["segments"]]
    )


@pytest.mark.parametrize("granularities", [["word"], ["word", "segment"]])
def test_word_timestamps(client, data_dir, direct_words, granularities):
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="verbose_json", timestamp_granularities=granularities
        )
    expected = [w for segment in direct_words["segments"] for w in segment["words"]]
    assert [(w.word, w.start, w.end) for w in result.words] == [
        (w["word"].strip(), w["start"], w["end"]) for w in expected
    ]
    assert " ".join(w.word for w in result.words).replace(",", "") == JFK_TEXT.replace(",", "")
    assert all(a.start <= a.end <= b.start for a, b in zip(result.words, result.words[1:]))
    assert (result.segments is not None) == ("segment" in granularities)


def test_segment_granularity_alone_sends_no_words(client, data_dir):
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="verbose_json", timestamp_granularities=["segment"]
        )
    assert result.words is None and result.segments and result.text == JFK_TEXT


def test_stream_sends_deltas_then_the_whole_text(client, data_dir, direct):
    with jfk(data_dir) as audio:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=audio, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    deltas = [e.delta for e in events[:-1]]
    assert len(deltas) == len(direct["segments"])
    assert "".join(deltas) == events[-1].text == JFK_TEXT


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai-python marks translations deprecated
def test_translation_with_an_english_only_model_is_the_transcript(client, data_dir):
    with jfk(data_dir) as audio:
        assert client.audio.translations.create(model="whisper-1", file=audio).text == JFK_TEXT
    with jfk(data_dir) as audio:
        verbose = client.audio.translations.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert (verbose.model_extra["task"], verbose.language, verbose.text) == ("translate", "english", JFK_TEXT)


def test_prompt_and_language_reach_the_decoder(client, data_dir, tiny_en):
    prompt = "President Kennedy's inaugural address."
    expected = transcribe(str(data_dir / "jfk.flac"), model=tiny_en, batch_size=BATCH_SIZE, initial_prompt=prompt)
    with jfk(data_dir) as audio:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=audio, language="en", prompt=prompt, temperature=0
        )
    assert result.text == expected["text"].strip() != JFK_TEXT  # the prompt changes the punctuation


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list()] == ["tiny.en"]
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_concurrent_clients_each_get_their_own_text(client, data_dir):
    paths = [data_dir / "jfk.flac", data_dir / "ls_test.flac", data_dir / "jfk.flac"]
    results: list = [None] * len(paths)

    def run(i):
        with open(paths[i], "rb") as audio:
            results[i] = client.audio.transcriptions.create(model="whisper-1", file=audio).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[2] == JFK_TEXT
    assert results[1].startswith("The goods sold openly") or "goods" in results[1]


# ---- errors: OpenAI's shape, and the requests in flight are not disturbed ----


def bad_requests(client, data_dir, tmp_path) -> dict:
    """Each kind of bad input the server must answer with a 400, and the error it gave."""
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n" * 100)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    over_declared = tmp_path / "big.flac"  # over the limit with the form around it: refused before parsing
    over_declared.write_bytes(os.urandom((MAX_UPLOAD_MB + 2) * 1024 * 1024))
    over_file = tmp_path / "bigger.flac"  # the body fits the form's allowance, the file does not
    over_file.write_bytes(os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 4096))
    calls = {
        "not audio": {"file": not_audio.open("rb")},
        "empty": {"file": empty.open("rb")},
        "over the limit": {"file": over_declared.open("rb")},
        "file over the limit": {"file": over_file.open("rb")},
        "response_format": {"file": jfk(data_dir), "response_format": "xml"},
        "granularity": {"file": jfk(data_dir), "response_format": "verbose_json", "timestamp_granularities": ["char"]},
        "temperature": {"file": jfk(data_dir), "temperature": 3},
        "language": {"file": jfk(data_dir), "language": "fr"},
        "model": {"file": jfk(data_dir), "model": "whisper-large"},
    }
    errors = {}
    for name, kwargs in calls.items():
        kwargs.setdefault("model", "whisper-1")
        with pytest.raises(openai.BadRequestError) as failed:
            client.audio.transcriptions.create(**kwargs)
        kwargs["file"].close()
        assert failed.value.status_code == 400
        errors[name] = error_of(failed)
    return errors


def check_bad_request_messages(errors: dict) -> None:
    assert errors["not audio"]["param"] == "file" and "notes.wav" in errors["not audio"]["message"]
    assert errors["empty"]["message"] == "file is empty"
    assert "larger than the limit" in errors["over the limit"]["message"]
    assert "larger than the limit" in errors["file over the limit"]["message"]
    assert errors["response_format"]["param"] == "response_format" and "'xml'" in errors["response_format"]["message"]
    assert errors["granularity"]["param"] == "timestamp_granularities"
    assert errors["temperature"]["param"] == "temperature"
    assert errors["language"]["param"] == "language" and "English-only" in errors["language"]["message"]
    assert errors["model"]["param"] == "model"
    assert {e["type"] for e in errors.values()} == {"invalid_request_error"}
    assert all("\n" not in e["message"] and "Traceback" not in e["message"] for e in errors.values())


def test_bad_requests_get_400_while_good_ones_in_flight_finish(client, server, gated, data_dir, tmp_path):
    gated.gate.clear()
    try:
        first, first_outcome = transcribe_in_thread(client, data_dir)
        wait_in_flight(server, 1)
        errors = bad_requests(client, data_dir, tmp_path)
        wait_in_flight(server, 1)  # the bad requests left nothing behind
    finally:
        gated.gate.set()
    first.join()
    assert first_outcome == {"text": JFK_TEXT}
    check_bad_request_messages(errors)


def test_full_queue_gets_503_and_the_queued_requests_finish(client, server, gated, data_dir):
    gated.gate.clear()
    try:
        queued = [transcribe_in_thread(client, data_dir) for _ in range(MAX_QUEUE)]
        wait_in_flight(server, MAX_QUEUE)
        with jfk(data_dir) as audio, pytest.raises(openai.InternalServerError) as refused:
            client.audio.transcriptions.create(model="whisper-1", file=audio)
    finally:
        gated.gate.set()
    for thread, _ in queued:
        thread.join()
    assert refused.value.status_code == 503
    error = error_of(refused)
    assert (error["code"], error["type"]) == ("queue_full", "server_error")
    assert f"{MAX_QUEUE} requests" in error["message"]
    assert [outcome for _, outcome in queued] == [{"text": JFK_TEXT}] * MAX_QUEUE
    wait_in_flight(server, 0)


def test_wrong_or_missing_api_key_gets_401(server, data_dir):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with jfk(data_dir) as audio, pytest.raises(openai.AuthenticationError) as failed:
        wrong.audio.transcriptions.create(model="whisper-1", file=audio)
    wrong.close()
    assert failed.value.status_code == 401
    assert error_of(failed)["code"] == "invalid_api_key"
    with jfk(data_dir) as audio:
        missing = httpx.post(
            server.url + "/v1/audio/transcriptions", files={"file": audio}, data={"model": "whisper-1"}
        )
    assert missing.status_code == 401 and "didn't provide an API key" in missing.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health checks need no key


def multipart_request(port: int, audio: bytes) -> bytes:
    boundary = "whisper-mlx-test"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_client_that_hangs_up_has_its_input_cancelled(server, gated, data_dir, upload_dir):
    import io
    import wave

    import numpy as np

    from whisper_mlx.audio import load_audio

    minute = np.tile(load_audio(str(data_dir / "jfk.flac")), 6)[: 60 * 16000]  # decoding takes seconds
    wav = io.BytesIO()
    with wave.open(wav, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((minute * 32767).astype("<i2").tobytes())
    gated.gate.clear()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(multipart_request(server.port, wav.getvalue()))
            wait_in_flight(server, 1)
    finally:
        gated.gate.set()
    wait_in_flight(server, 0)
    assert gated.last_future.cancelled()
    assert list(upload_dir.iterdir()) == []


def test_malformed_bodies_and_fields_get_400(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server.url + "/v1/audio/transcriptions"
    not_multipart = httpx.post(url, headers=headers, json={"model": "whisper-1"})
    no_file = httpx.post(url, headers=headers, files={"model": (None, "whisper-1")})
    unknown = httpx.post(url, headers=headers, files={"file": ("a.wav", b"x"), "colour": (None, "blue")})
    assert [r.status_code for r in (not_multipart, no_file, unknown)] == [400, 400, 400]
    assert no_file.json()["error"]["param"] == "file"
    chunks = [b"--b\r\n", b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n']
    chunks += [bytes(1024 * 1024)] * (MAX_UPLOAD_MB + 2)  # no Content-Length: the size shows only as it arrives
    chunked = httpx.post(
        url, headers={**headers, "Content-Type": "multipart/form-data; boundary=b"}, content=iter(chunks)
    )
    assert chunked.status_code == 400 and "larger than the limit" in chunked.json()["error"]["message"]
    assert unknown.json()["error"]["param"] == "colour"
    assert httpx.get(server.url + "/v1/nothing", headers=headers).json()["error"]["type"] == "invalid_request_error"


# ---- the command ----


def run_serve(*args: str, hide: str = "") -> subprocess.CompletedProcess:
    """`whisper_mlx serve ARGS` in a fresh interpreter; `hide` makes that module unimportable there."""
    code = f"import sys; sys.modules.update({{{hide!r}: None}} if {hide!r} else {{}}); " + (
        "from whisper_mlx.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, "serve", *args], capture_output=True, text=True, timeout=120)


def test_serve_without_the_extra_names_it_and_exits_1():
    finished = run_serve("--port", "0", hide="fastapi")
    assert finished.returncode == 1
    assert finished.stderr.strip().splitlines() == [
        "whisper_mlx serve: needs the server extra (fastapi is missing): pip install 'whisper_mlx[server]'"
    ]


def test_serve_usage_errors_exit_2_and_the_core_package_never_imports_fastapi():
    assert run_serve("--batch-size", "0").returncode == 2
    code = "import sys, whisper_mlx, whisper_mlx.cli, whisper_mlx.server; print('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
