"""Many inputs through one engine (whisper_mlx.many), real tiny.en weights: each input's result is the
one `transcribe` gives it alone, errors stay with their input, segments stream in time order."""

import concurrent.futures
import subprocess
import sys
import threading

import pytest

from whisper_mlx import BatchEngine, transcribe, transcribe_many
from whisper_mlx.audio import SAMPLE_RATE, load_audio
from whisper_mlx.errors import AudioError, DecodingError

BATCH = 12
# floats a row's BLAS sums give in a slightly different order when the batch has other rows
APPROX_FIELDS = ("avg_logprob", "no_speech_prob")


@pytest.fixture(scope="module")
def alice_excerpt(data_dir):
    """130 s of alice_ch1 (from 60 s): two lanes at batch 12, the second with a lead-in."""
    return load_audio(str(data_dir / "alice_ch1.flac"))[60 * SAMPLE_RATE : 190 * SAMPLE_RATE]


@pytest.fixture(scope="module")
def inputs(data_dir, alice_excerpt):
    return {"jfk": str(data_dir / "jfk.flac"), "alice": alice_excerpt, "ls_test": str(data_dir / "ls_test.flac")}


@pytest.fixture(scope="module")
def alone(tiny_en, inputs):
    """Each input transcribed by itself, batched as the engine cuts it."""
    return {name: transcribe(audio, model=tiny_en, batch_size=BATCH) for name, audio in inputs.items()}


def assert_same_result(got: dict, want: dict) -> None:
    assert got["text"] == want["text"]
    assert got["language"] == want["language"]
    assert len(got["segments"]) == len(want["segments"])
    for g, w in zip(got["segments"], want["segments"]):
        inexact = (*APPROX_FIELDS, "words")  # the words' probabilities too
        assert {k: v for k, v in g.items() if k not in inexact} == {k: v for k, v in w.items() if k not in inexact}
        for key in APPROX_FIELDS:
            assert g[key] == pytest.approx(w[key], abs=1e-5)
        assert_same_words(g.get("words"), w.get("words"))


def assert_same_words(got: list[dict] | None, want: list[dict] | None) -> None:
    """The same words and times; their probabilities up to the BLAS's order of summation."""
    if got is None or want is None:
        assert got == want
        return
    assert [{k: v for k, v in g.items() if k != "probability"} for g in got] == [
        {k: v for k, v in w.items() if k != "probability"} for w in want
    ]
    assert [g["probability"] for g in got] == pytest.approx([w["probability"] for w in want], abs=1e-5)


def test_each_input_as_transcribed_alone(tiny_en, inputs, alone):
    names = {id(audio): name for name, audio in inputs.items()}
    got = {names[id(audio)]: result for audio, result in transcribe_many(inputs.values(), model=tiny_en)}
    assert sorted(got) == sorted(inputs)
    assert len(alone["alice"]["segments"]) > 5  # a long input beside the two short ones
    for name in inputs:
        assert_same_result(got[name], alone[name])


def test_windows_that_sample_draw_as_alone(tiny_en, inputs):
    """Every window samples best_of candidates at temperature 0.6: the samples depend only on the seed
    and the window, so each input's text is what it gets alone."""
    forced = {"temperature": 0.6, "best_of": 2}
    names = {id(audio): name for name, audio in inputs.items()}
    got = {names[id(audio)]: result for audio, result in transcribe_many(inputs.values(), model=tiny_en, **forced)}
    for name, audio in inputs.items():
        want = transcribe(audio, model=tiny_en, batch_size=BATCH, **forced)
        assert {s["temperature"] for s in want["segments"]} == {0.6}
        assert_same_result(got[name], want)
    reseeded = transcribe(inputs["alice"], model=tiny_en, batch_size=BATCH, seed=1, **forced)
    assert reseeded["text"] != got["alice"]["text"]


def test_a_broken_input_yields_its_error_and_the_others_complete(tiny_en, inputs, alone, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio\n" * 50)
    missing = str(tmp_path / "missing.wav")
    batch = [str(not_audio), inputs["jfk"], missing, inputs["ls_test"]]
    got = dict(transcribe_many(batch, model=tiny_en))
    assert isinstance(got[str(not_audio)], AudioError) and "not a readable audio file" in str(got[str(not_audio)])
    assert isinstance(got[missing], AudioError) and "no such audio file" in str(got[missing])
    assert_same_result(got[inputs["jfk"]], alone["jfk"])
    assert_same_result(got[inputs["ls_test"]], alone["ls_test"])


def test_a_bad_option_fails_its_input_only(tiny_en, inputs, alone):
    with BatchEngine(tiny_en, batch_size=BATCH) as engine:
        unknown = engine.submit(inputs["jfk"], no_such_option=1)
        empty_ladder = engine.submit(inputs["jfk"], temperature=[])
        good = engine.submit(inputs["jfk"])
    with pytest.raises(DecodingError, match="no_such_option"):
        unknown.result()
    with pytest.raises(DecodingError, match="temperature"):
        empty_ladder.result()
    assert_same_result(good.result(), alone["jfk"])


def test_bad_default_options_fail_at_construction(tiny_en):
    with pytest.raises(DecodingError, match="vad must be one of"):
        BatchEngine(tiny_en, vad="nope")


def test_submissions_from_threads_stream_segments_in_order(tiny_en, inputs, alone):
    """Threads submit while the engine decodes the first input; each input's streamed segments are its
    result's segments, in time order, and join to its text."""
    streamed: dict[str, list[dict]] = {name: [] for name in inputs}
    first_segment = threading.Event()

    def collector(name):
        def on_segment(segment):
            streamed[name].append(segment)
            first_segment.set()

        return on_segment

    with BatchEngine(tiny_en, batch_size=BATCH) as engine:
        futures = {"alice": engine.submit(inputs["alice"], on_segment=collector("alice"))}
        assert first_segment.wait(timeout=600)  # the engine is running; the others join its batches
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            late = ("jfk", "ls_test")
            submitted = {name: pool.submit(engine.submit, inputs[name], on_segment=collector(name)) for name in late}
            futures.update({name: future.result() for name, future in submitted.items()})
        results = {name: future.result() for name, future in futures.items()}
    for name, result in results.items():
        assert_same_result(result, alone[name])
        assert streamed[name] == result["segments"]
        assert "".join(s["text"] for s in streamed[name]) == result["text"]
        starts = [s["start"] for s in streamed[name]]
        assert starts == sorted(starts)


def test_inputs_with_different_options_share_an_engine(tiny_en, inputs):
    """A sequential input (batch_size=1), one with its own prompt and word timestamps, one at
    temperature 0 only (another options group): each as transcribe gives it with those options."""
    per_input = [
        ("jfk", {"batch_size": 1}),
        ("ls_test", {"initial_prompt": "Hello.", "word_timestamps": True}),
        ("jfk", {"temperature": 0.0}),
    ]
    with BatchEngine(tiny_en, batch_size=BATCH) as engine:
        futures = [engine.submit(inputs[name], **options) for name, options in per_input]
    for (name, options), future in zip(per_input, futures):
        want = transcribe(inputs[name], model=tiny_en, **{"batch_size": BATCH, **options})
        assert_same_result(future.result(), want)


def test_close_with_pending_work_returns(tiny_en, inputs):
    engine = BatchEngine(tiny_en, batch_size=BATCH)
    futures = [engine.submit(inputs[name]) for name in ("alice", "jfk", "ls_test", "alice")]
    engine.close(cancel=True)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)
    assert not engine._loader.is_alive() and not engine._decoder.is_alive()
    with pytest.raises(RuntimeError, match="after close"):
        engine.submit(inputs["jfk"])


def test_an_engine_failure_fails_the_waiting_inputs(tiny_en, inputs, monkeypatch):
    """A bug past the per-input guards (here: building the result) must fail the futures, not hang them."""
    import whisper_mlx.many

    def broken_result(ctx, lanes):
        raise RuntimeError("result builder broke")

    monkeypatch.setattr(whisper_mlx.many, "lanes_result", broken_result)
    engine = BatchEngine(tiny_en, batch_size=BATCH)
    futures = [engine.submit(inputs["jfk"]), engine.submit(inputs["ls_test"])]
    for future in futures:
        with pytest.raises(RuntimeError, match="result builder broke"):
            future.result()
    engine.close()
    assert not engine._decoder.is_alive()


def test_close_finishes_submitted_work(tiny_en, inputs, alone):
    engine = BatchEngine(tiny_en, batch_size=BATCH)
    futures = [engine.submit(inputs["jfk"]), engine.submit(inputs["ls_test"])]
    engine.close()
    assert_same_result(futures[0].result(), alone["jfk"])
    assert_same_result(futures[1].result(), alone["ls_test"])


def test_inputs_are_read_lazily(tiny_en, inputs):
    """A generator of inputs is drawn as the engine makes room, not all at once."""
    drawn = []

    def source():
        for i in range(60):
            drawn.append(i)
            yield inputs["jfk"]

    results = transcribe_many(source(), model=tiny_en, batch_size=2)
    _, first_result = next(results)
    assert first_result["text"] and len(drawn) < 60
    results.close()  # stops the engine, cancelling what was not decoded


def test_cli_several_files_write_every_output(tiny_en_dir, data_dir, tmp_path, tiny_en):
    from whisper_mlx.cli import main

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio\n" * 50)
    files = [str(data_dir / "jfk.flac"), str(not_audio), str(data_dir / "ls_test.flac")]
    out = tmp_path / "out"
    status = main([*files, "--model", str(tiny_en_dir), "-f", "txt", "-o", str(out), "--verbose", "False"])
    assert status == 1  # the unreadable file
    assert sorted(p.name for p in out.iterdir()) == ["jfk.txt", "ls_test.txt"]
    for stem in ("jfk", "ls_test"):
        alone = transcribe(str(data_dir / f"{stem}.flac"), model=tiny_en)  # the CLI's default: sequential
        lines = [s["text"].strip() for s in alone["segments"]]
        assert (out / f"{stem}.txt").read_text().splitlines() == lines


def test_lightning_lists(data_dir, inputs, alone):
    from whisper_mlx import LightningWhisperMLX

    whisper = LightningWhisperMLX(batch_size=BATCH)
    paths = [inputs["ls_test"], inputs["jfk"], inputs["ls_test"]]
    results = whisper.transcribe(paths)
    assert [r["text"] for r in results] == [alone["ls_test"]["text"], alone["jfk"]["text"], alone["ls_test"]["text"]]
    pairs = list(whisper.transcribe_many([inputs["jfk"], str(data_dir / "missing.wav")]))
    texts = [r["text"] for audio, r in pairs if audio == inputs["jfk"]]
    assert texts == [alone["jfk"]["text"]]
    errors = [r for _, r in pairs if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], AudioError)
    with pytest.raises(AudioError, match="no such audio file"):
        whisper.transcribe([inputs["jfk"], str(data_dir / "missing.wav")])


ENGINE_ON_MLX_THEN_EXIT = """
import sys
from whisper_mlx import load_model, transcribe_many
model = load_model(sys.argv[1], backend="mlx")
for _, result in transcribe_many([sys.argv[2], sys.argv[2]], model=model, batch_size=2):
    assert isinstance(result, dict), result
"""


def test_the_process_exits_cleanly_after_mlx_work_on_engine_threads(tiny_en_dir, data_dir):
    """MLX streams made on the engine's threads are destroyed as they end; left to process exit they
    made it abort ("terminate called without an active exception", exit status 134) about half the time."""
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", ENGINE_ON_MLX_THEN_EXIT, str(tiny_en_dir), str(data_dir / "jfk.flac")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
