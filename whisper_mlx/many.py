"""Many inputs, one model: the lanes of every submitted input share decoding batches.

`BatchEngine` takes inputs from any thread (`submit`) and decodes the next window of the oldest inputs'
lanes together, up to batch_size windows per batch; inputs submitted while it decodes join at the next
batch. Each input is cut into the same lanes, with the same lead-ins, prompts and language detection,
as `transcribe(input, batch_size=B)` alone, and a row's decoding does not depend on the other rows of
its batch (a sampled row draws from its own window's key), so each result is the one `transcribe` gives.

Two threads: a loader that decodes the next inputs' audio (log-mel, Silero VAD) ahead of the decoder,
at most about 2 * batch_size inputs loaded at a time, and the decoder that owns the model.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .audio import FRAMES_PER_SECOND
from .backends import backend_for
from .decoding import DecodingOptions
from .errors import DecodingError
from .runtime import end_mlx_thread
from .transcribe import (
    Context,
    Lane,
    LaneWindow,
    TaskCache,
    TranscribeOptions,
    clamp_segment,
    decode_windows,
    lanes_result,
    mel_and_speech,
    next_windows,
    options_from_keywords,
    plan_input_lanes,
    resolve_model,
)
from .whisper import Whisper


@dataclass(eq=False)
class OptionGroup:
    """Inputs whose windows can share a batch: the same decoding options and fallback rules."""

    decoding: DecodingOptions
    options: TranscribeOptions
    tasks: TaskCache

    def admits(self, decoding: DecodingOptions, options: TranscribeOptions) -> bool:
        return decoding == self.decoding and fallback_rules(options) == fallback_rules(self.options)


def fallback_rules(options: TranscribeOptions) -> tuple:
    """The TranscribeOptions that decode_with_fallback reads for a whole batch."""
    return (
        options.temperatures,
        options.compression_ratio_threshold,
        options.logprob_threshold,
        options.no_speech_threshold,
    )


@dataclass(eq=False)
class Job:
    """One submitted input, from its audio to its result."""

    audio: object
    options: TranscribeOptions
    decoding: DecodingOptions
    future: concurrent.futures.Future
    on_segment: Callable[[dict], None] | None
    loaded: tuple | None = None  # (mel, speech probabilities) from the loader
    ctx: Context | None = None
    lanes: list[Lane] = field(default_factory=list)
    streamed_lanes: int = 0  # lanes whose every segment went to on_segment
    streamed_segments: int = 0  # segments of the current lane already sent
    streamed: int = 0  # segments sent in all

    def windows(self) -> list[LaneWindow]:
        return next_windows(self.ctx, self.lanes) if self.ctx is not None else []

    def fail(self, error: BaseException) -> None:
        resolve(self.future, error)
        self.release()

    def release(self) -> None:
        """Drop the audio and the lanes: a finished input holds no memory."""
        self.loaded, self.ctx, self.lanes, self.audio = None, None, [], None


def resolve(future: concurrent.futures.Future, outcome: object) -> None:
    """Set a future's result or exception, unless it was cancelled (by close or by its caller)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled meanwhile: nobody waits for this input


def stream_final_segments(job: Job) -> None:
    """Send every segment that is final and has only final segments before it (lanes are in time
    order, and a lane's segments are final once added), numbered and clamped as in the result."""
    ctx = job.ctx
    assert ctx is not None
    while job.streamed_lanes < len(job.lanes):
        lane = job.lanes[job.streamed_lanes]
        lane_end = lane.clips[-1][1] / FRAMES_PER_SECOND
        for segment in lane.transcript.segments[job.streamed_segments :]:
            if job.on_segment is not None:
                job.on_segment({**clamp_segment(segment, lane_end), "id": job.streamed})
            job.streamed += 1
            job.streamed_segments += 1
        if lane.window(ctx.content_frames) is not None:
            return
        job.streamed_lanes += 1
        job.streamed_segments = 0


class BatchEngine:
    """Thread-safe; one model; lanes of all submitted inputs share decoding batches.

    engine.submit(audio, **options) returns a Future of transcribe's result dict; options are
    transcribe's keywords, over the engine's defaults. batch_size: the windows decoded together, and
    unless input_batch_size says otherwise (1: openai's sequential loop per input) transcribe's
    batch_size for each input, the most lanes it is cut into (a submit's batch_size overrides both
    defaults for its input). close() (or leaving a `with` block) waits for the submitted inputs;
    close(cancel=True) cancels those not finished.
    """

    def __init__(self, model: Whisper, *, batch_size: int = 12, input_batch_size: int | None = None, **default_options):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DecodingError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.batch_size = model, batch_size
        self.backend = backend_for(model, None)
        lanes = batch_size if input_batch_size is None else input_batch_size
        self.default_options = {"batch_size": lanes, **default_options}
        options_from_keywords(model, self.default_options)  # bad defaults fail here, not per input
        self.max_loaded = 2 * batch_size  # inputs whose audio is loaded: the active and the next ones
        self.fill_wait_s = 2.0  # the longest a short batch waits for inputs the loader is reading
        self._cond = threading.Condition()
        self._submitted: deque[Job] = deque()
        self._loaded: deque[Job] = deque()
        self._active: list[Job] = []
        self._groups: list[OptionGroup] = []
        self._closing = False
        self._loading = 0  # inputs the loader holds (taken from _submitted, not yet in _loaded)
        self._loader_done = False
        self._loader = threading.Thread(target=self._load_loop, name="whisper_mlx-loader", daemon=True)
        self._decoder = threading.Thread(target=self._decode_loop, name="whisper_mlx-decoder", daemon=True)
        self._loader.start()
        self._decoder.start()

    def submit(self, audio, *, on_segment: Callable[[dict], None] | None = None, **options):
        """A Future of transcribe(audio, **options)'s result, or of the input's error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            transcribe_options, decoding = options_from_keywords(self.model, {**self.default_options, **options})
        except Exception as exc:  # a bad option fails this input only
            future.set_exception(exc)
            return future
        job = Job(audio, transcribe_options, decoding, future, on_segment)
        with self._cond:
            if self._closing:
                raise RuntimeError("submit() after close()")
            self._submitted.append(job)
            self._cond.notify_all()
        return future

    def close(self, *, cancel: bool = False) -> None:
        """Stop taking inputs and end the threads: after the submitted inputs finish, or with cancel=True
        after the current batch, the unfinished inputs' futures cancelled."""
        with self._cond:
            self._closing = True
            if cancel:
                for job in [*self._submitted, *self._loaded, *self._active]:
                    job.future.cancel()
            self._cond.notify_all()
        for thread in (self._loader, self._decoder):
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)

    # ---------------------------------------------------------------------------- loader thread

    def _next_to_load(self) -> Job | None:
        """The oldest submitted input once there is room to load it; None when closing with none left."""
        with self._cond:
            while True:
                while self._submitted and self._submitted[0].future.done():  # cancelled, or failed by a crash
                    self._submitted.popleft()
                room = len(self._loaded) + len(self._active) < self.max_loaded
                if self._submitted and room:
                    self._loading += 1
                    return self._submitted.popleft()
                if self._closing and not self._submitted:
                    return None
                self._cond.wait()

    def _load_loop(self) -> None:
        try:
            while (job := self._next_to_load()) is not None:
                try:
                    job.loaded = mel_and_speech(job.audio, self.model.dims.n_mels, job.options)
                except Exception as exc:  # unreadable audio fails this input only
                    job.fail(exc)
                with self._cond:
                    self._loading -= 1
                    if job.loaded is not None:
                        self._loaded.append(job)
                    self._cond.notify_all()
        finally:
            end_mlx_thread()
            with self._cond:
                self._loader_done = True
                self._cond.notify_all()

    # --------------------------------------------------------------------------- decoder thread

    def _take_loaded(self) -> list[Job] | None:
        """The inputs loaded since the last batch (waiting while there is nothing to do); None to stop."""
        with self._cond:
            while not self._loaded and not self._active:
                if self._loader_done:
                    return None
                self._cond.wait()
            loaded = list(self._loaded)
            self._loaded.clear()
            return loaded

    def _wait_for_loader(self) -> None:
        """While the loader is still reading inputs already submitted that the next batch has rows for,
        wait for them (up to fill_wait_s): a batch short of rows costs nearly what a full one does."""
        deadline = time.monotonic() + self.fill_wait_s
        rows = sum(len(job.windows()) for job in self._active)
        with self._cond:
            while (
                rows + len(self._loaded) < self.batch_size
                and (self._submitted or self._loading)
                and len(self._loaded) + len(self._active) < self.max_loaded
                and not self._closing
                and (left := deadline - time.monotonic()) > 0
            ):
                self._cond.wait(left)

    def _take_ready(self) -> list[Job]:
        """The inputs loaded meanwhile, without waiting."""
        with self._cond:
            loaded = list(self._loaded)
            self._loaded.clear()
            return loaded

    def _decode_loop(self) -> None:
        try:
            self._decode_until_done()
        except BaseException as exc:  # an engine bug must fail the waiting futures, never leave them hanging
            with self._cond:
                self._closing = True
                jobs = [*self._submitted, *self._loaded, *self._active]
                self._cond.notify_all()
            for job in jobs:
                job.fail(exc)  # the error reaches the callers through their futures
        finally:
            end_mlx_thread()

    def _decode_until_done(self) -> None:
        while (loaded := self._take_loaded()) is not None:
            for job in loaded:
                self._admit(job)
            self._wait_for_loader()
            for job in self._take_ready():
                self._admit(job)
            self._drop_finished()
            windows = self._next_batch()
            if not windows:
                continue
            try:
                decode_windows(windows)
            except Exception as exc:  # the inputs of a failed batch fail; the others go on
                for job in {id(w.ctx): self._job_of(w) for w in windows}.values():
                    job.fail(exc)
            self._drop_finished()

    def _admit(self, job: Job) -> None:
        """Plan a loaded input's lanes (with its options group's prepared tasks) and activate it."""
        if job.future.cancelled() or job.loaded is None:
            return job.release()
        try:
            group = self._group_for(job.decoding, job.options)
            job.ctx = Context.for_input(
                self.model, self.backend, job.loaded, job.options, group.tasks, job.decoding.language
            )
            job.loaded = None
            job.lanes = plan_input_lanes(job.ctx)
            job.ctx.first_window = None  # decoded in mixed batches: its features are encoded again
        except Exception as exc:
            return job.fail(exc)
        with self._cond:
            self._active.append(job)

    def _group_for(self, decoding: DecodingOptions, options: TranscribeOptions) -> OptionGroup:
        for group in self._groups:
            if group.admits(decoding, options):
                return group
        group = OptionGroup(decoding, options, TaskCache(self.model, decoding))
        self._groups.append(group)
        return group

    def _next_batch(self) -> list[LaneWindow]:
        """The next windows of the oldest inputs' lanes, up to batch_size, all of the oldest input's
        options group (inputs of other groups wait for a batch of their own)."""
        windows: list[LaneWindow] = []
        tasks = None
        for job in self._active:
            job_windows = job.windows()
            if not job_windows or (tasks is not None and job_windows[0].ctx.tasks is not tasks):
                continue
            tasks = job_windows[0].ctx.tasks
            windows += job_windows[: self.batch_size - len(windows)]
            if len(windows) == self.batch_size:
                break
        return windows

    def _job_of(self, window: LaneWindow) -> Job:
        return next(job for job in self._active if job.ctx is window.ctx)

    def _drop_finished(self) -> None:
        """Stream new final segments; resolve finished inputs; forget cancelled and failed ones."""
        still = []
        for job in self._active:
            if job.future.done() or job.ctx is None:
                job.release()
                continue
            try:
                stream_final_segments(job)
            except Exception as exc:  # a failing on_segment fails its input only
                job.fail(exc)
                continue
            if job.windows():
                still.append(job)
                continue
            resolve(job.future, lanes_result(job.ctx, job.lanes))
            job.release()
        with self._cond:
            self._active = still
            self._cond.notify_all()  # room for the loader


def transcribe_many(
    inputs: Iterable,
    *,
    model: Whisper | None = None,
    path_or_hf_repo: str | None = None,
    batch_size: int = 12,
    input_batch_size: int | None = None,
    **options,
) -> Iterator[tuple[object, dict | BaseException]]:
    """Transcribe many inputs with one model, the lanes of several inputs sharing each batch.

    Yields (input, result) as each input completes (about in input order: the oldest inputs are
    decoded first); result is transcribe's dict, or the exception for an input that failed (the others
    go on). inputs is consumed lazily, so a generator of thousands of paths is fine. options are
    transcribe's keywords, for every input; backend chooses the model's backend as transcribe's does.
    batch_size: windows per batch, and each input's transcribe batch_size unless input_batch_size.
    """
    model, _ = resolve_model(model, path_or_hf_repo, options.get("fp16"), options.pop("backend", None))
    with BatchEngine(model, batch_size=batch_size, input_batch_size=input_batch_size, **options) as engine:
        pending: dict[concurrent.futures.Future, object] = {}
        source = iter(inputs)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * engine.max_loaded:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                else:
                    pending[engine.submit(item)] = item
            if not pending:
                return
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in sorted(done, key=list(pending).index):
                yield pending.pop(future), outcome(future)


_END = object()


def outcome(future: concurrent.futures.Future) -> dict | BaseException:
    """A finished future's result, or its exception."""
    error = future.exception()
    return error if error is not None else future.result()
