"""One thread owns the model: requests wait in a bounded queue and up to ``max_batch`` of them are decoded
together, one verified forward for all their trees per step (:mod:`msn.decoding.batch`).

A model is not safe to run from two threads at once, and two interleaved requests are no faster than one
after the other, while one forward over both their trees costs little more than one; a bounded queue turns
overload into a quick 503 instead of a pile of requests that time out. A request joins the batch between
steps and leaves it the step it ends. Each job streams :class:`Delta` events and ends with exactly one
:class:`Finished` or :class:`Failed`; a cancelled job (client gone) stops at the engine's next step; a job
that fails fails alone. ``max_batch=1`` decodes one request at a time (a batch of one: the forward of
:func:`msn.generate`). A running server never measures its t(n) curve again: not inside a request (everyone
would wait seconds), nor between them (measured beside another busy process, a curve came out 4x off here).
The warm-up measures it on this thread and the steps refine it online. A compiled server, or a model whose
layers slide a window, runs :func:`msn.generate` one request at a time.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msn.errors import MsnError
from msn.serve.text import TextStream

log = logging.getLogger("msn.serve")


@dataclass
class Delta:
    text: str


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # up to and including the token that completed a stop string
    steps: int  # forward passes after the prefill
    committed_tokens: int  # tokens the steps committed (a step may commit past a stop string)
    wall_time: float  # seconds, prefill included
    method: str
    # The same request gives the same text whatever was served before: fp32 (a tree verifies what a one-token
    # step computes, up to fp32 rounding), or ``ar`` (no tree). In bf16/fp16 the tree grows with what the
    # recycling table learnt from earlier requests, and a bigger tree forward can flip a near-tie of the logits.
    reproducible: bool = False

    @property
    def mean_accepted(self) -> float:
        return self.committed_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / max(self.wall_time, 1e-9)


@dataclass
class Finished:
    result: Result


@dataclass
class Failed:
    message: str
    status: int = 500


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request: prompt ids, the keywords for :func:`msn.generate`, stop strings and where events go.
    ``emit`` is called from the worker thread."""

    ids: Any  # torch.Tensor [1, L]
    settings: dict
    stops: list[str]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def _failure(e: BaseException) -> Failed:
    """A request ended by an error that is not the client's: a 500 naming it."""
    return Failed(f"generation failed: {type(e).__name__}: {e}", 500)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


class _Stop(Exception):
    """Raised from the streamer to end a generation early (stop string found, or client gone)."""


class _Streamer:
    """The engine's streamer protocol (``put``/``end``): the first ``put`` is the prompt, each later one a
    step's committed tokens. Raising from ``put`` ends :func:`msn.generate` at that step."""

    def __init__(self, job: Job, text: TextStream):
        self.job, self.text = job, text
        self.prompt_seen = False
        self.steps = self.committed = 0
        self.eos_hit = False

    def put(self, value) -> None:
        if self.job.cancelled.is_set():
            raise _Stop
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        self.steps += 1
        self.committed += len(tokens)
        delta = ""
        for token in tokens:  # one token at a time: a stop string ends the text at the token completing it
            delta += self.text.push(token)
            if self.text.stopped:
                break
        if delta:
            self.job.emit(Delta(delta))  # one event per step: a step's accepted drafts arrive together
        if self.text.stopped:
            raise _Stop

    def end(self) -> None:
        pass


DEFAULT_MAX_BATCH = 8  # requests decoded together by default: best or level at 2-8 clients (docs/results.md §22)
MAX_BATCH_LIMIT = 64  # requests decoded together at most (a tree each: past this a step's forward is huge)


def check_max_batch(max_batch) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise MsnError(f"max batch must be an integer from 1 to {MAX_BATCH_LIMIT} (requests decoded together), "
                       f"got {max_batch!r}")
    return max_batch


class Worker:
    """The model's only user. ``max_batch`` requests run together; ``queue_size`` bounds those waiting
    behind them."""

    def __init__(self, model, tokenizer, eos: list[int], queue_size: int = 16, max_batch: int = 1,
                 batched: bool | None = None):
        if queue_size < 1:
            raise MsnError(f"queue size must be >= 1, got {queue_size}")
        self.model, self.tokenizer, self.eos = model, tokenizer, list(eos)
        self.queue_size, self.max_batch = queue_size, check_max_batch(max_batch)
        # Through msn.decoding.batch (a batch of one is msn.generate's forward; the t(n) curve is never measured
        # again while serving); None: when max_batch > 1. False: msn.generate, one at a time.
        self.batched = max_batch > 1 if batched is None else batched
        self.tokenizer_lock = threading.Lock()  # the app encodes prompts while this thread decodes
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: set[Job] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._mean_seconds = 1.0  # recent request duration, for Retry-After
        self._started, self._start_error = threading.Event(), None
        self.served = 0

    # -- the request side (any thread) ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``queue_size`` requests already wait."""
        with self._cond:
            if self._closed:
                raise QueueFull(1)
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(max(1, math.ceil(self._mean_seconds * (len(self._waiting) + 1))))
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: a waiting job leaves the queue now, a running one stops at its next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting), "queue_size": self.queue_size,
                    "max_batch": self.max_batch, "served": self.served}

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- the worker thread ---------------------------------------------------------------------------------
    def start(self, first: Callable[[], None] | None = None) -> None:
        """Start the thread (once; later calls do nothing). ``first`` runs on it before any request: model work
        belongs on this one thread. Forwards run on another thread after the main thread ran some were ~1.3x
        slower here (torch's CPU thread pools are per calling thread), and a t(n) curve measured on the main
        thread then disagreed with every step (docs/results.md §22)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(first,), name="msn-serve-worker", daemon=True)
        self._thread.start()

    def wait_started(self) -> None:
        """Wait for ``first`` to end; raise what it raised."""
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def _run(self, first: Callable[[], None] | None) -> None:
        try:
            if first is not None:
                first()
        except BaseException as e:  # noqa: BLE001 - handed to wait_started's caller
            self._start_error = e
            return
        finally:
            self._started.set()
        self._loop()

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the waiting and the running one, wait for the thread."""
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.cancelled.set()
                job.emit(Failed("the server is shutting down", 503))
            self._waiting.clear()
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if self.batched:
                    job = None
                else:
                    job = self._waiting.popleft()
                    self._running.add(job)
            if job is None:
                self._run_batched()
                continue
            try:
                start = time.perf_counter()
                self.run(job)
                self._ended(start)
            finally:
                with self._cond:
                    self._running.discard(job)

    def _ended(self, start: float) -> None:
        with self._cond:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - start)
            self.served += 1

    def _take(self, room: int) -> list[Job]:
        with self._cond:
            jobs = []
            while self._waiting and len(jobs) < room and not self._closed:
                jobs.append(self._waiting.popleft())
            self._running.update(jobs)
            return jobs

    def _run_batched(self) -> None:
        """Decode the waiting jobs together until none is left; jobs join between steps (never raises)."""
        from msn.decoding.batch import Batch

        active: dict = {}  # batch member -> (job, text, streamer, start)
        try:
            batch = Batch(self.model, measure_in_requests=False)
        except MsnError as e:  # this model cannot share a forward: serve one at a time from now on
            log.warning("msn serve: requests run one at a time: %s", e)
            self.max_batch, self.batched = 1, False
            return
        try:
            with batch:
                while True:
                    for job in self._take(self.max_batch - len(batch)):
                        self._join(batch, job, active)
                    if not len(batch):
                        return
                    for member in batch.step():
                        self._leave(member, *active.pop(member))
        except Exception as e:  # outside any one request (the shared forward, installing kernels): all fail
            log.exception("batched decoding failed")
            with self._cond:
                taken = list(self._running)  # the active jobs and any taken but not yet joined
            for job in taken:
                self._fail(job, _failure(e))

    def _join(self, batch, job: Job, active: dict) -> None:
        text = TextStream(self.decode, job.stops)
        streamer = _Streamer(job, text)
        start = time.perf_counter()
        try:
            member = batch.add(job.ids, streamer=streamer, eos_token_id=self.eos, **job.settings)
        except _Stop:  # cancelled before it started
            self._fail(job, None)
            return
        except MsnError as e:
            self._fail(job, Failed(str(e), 400))
            return
        except Exception as e:
            log.exception("generation failed")
            self._fail(job, _failure(e))
            return
        active[member] = (job, text, streamer, start)

    def _fail(self, job: Job, event: Failed | None) -> None:
        if event is not None:
            job.emit(event)
        with self._cond:
            self._running.discard(job)
            self.served += 1

    def _leave(self, member, job: Job, text: TextStream, streamer: _Streamer, start: float) -> None:
        error = member.error
        if error is not None and not isinstance(error, _Stop):
            if isinstance(error, MsnError):
                self._fail(job, Failed(str(error), 400))
            else:
                log.error("generation failed", exc_info=error)
                self._fail(job, _failure(error))
            return
        self._finish(job, text, streamer, time.perf_counter() - start)
        with self._cond:
            self._running.discard(job)
        self._ended(start)  # counts it served

    def run(self, job: Job) -> None:
        """Generate ``job`` on this thread, emitting its events (never raises)."""
        from msn.decoding.engine import generate

        text = TextStream(self.decode, job.stops)
        streamer = _Streamer(job, text)
        start = time.perf_counter()
        try:
            generate(self.model, job.ids, streamer=streamer, eos_token_id=self.eos, **job.settings)
        except _Stop:
            pass
        except MsnError as e:  # the request was checked before it was queued: this is rare
            job.emit(Failed(str(e), 400))
            return
        except Exception as e:  # one bad request must not end the worker
            log.exception("generation failed")
            job.emit(_failure(e))
            return
        self._finish(job, text, streamer, time.perf_counter() - start)

    def _finish(self, job: Job, text: TextStream, streamer: _Streamer, wall: float) -> None:
        import torch

        method = job.settings.get("method", "tr-jacobi")
        # A stop string found only in the unfinished bytes released at the end (a length cut mid-character shows
        # as U+FFFD) still cuts the text, but the generation ended by its length.
        stopped = text.stopped or (bool(text.tokens) and text.tokens[-1] in self.eos)
        tail = text.finish()
        if tail:
            job.emit(Delta(tail))
        job.emit(Finished(Result(
            text=text.sent_text, finish_reason="stop" if stopped else "length",
            prompt_tokens=int(job.ids.shape[-1]), completion_tokens=len(text.tokens), steps=streamer.steps,
            committed_tokens=streamer.committed, wall_time=wall, method=method,
            reproducible=method == "ar" or getattr(self.model, "dtype", None) == torch.float32,
        )))  # fmt: skip
