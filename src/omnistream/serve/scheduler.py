"""One thread owns the model; it advances all active replies together, one step per round.

Every piece of model work (building a session, appending live audio, stepping a reply) runs on
the scheduler thread, so the engine never sees two threads. Each round advances every runnable
reply by one step. Replies of the real engine (``engine.batch.Reply``: chat completions and the
Realtime socket alike) go through one ``Batcher``: a round is one of its ticks (a budget of new
prompts' prefill, then one batched Thinker step, one batched Talker step and the ready code2wav
chunks for all of them). Any other generator (a test double) gets one ``next()`` per round. A
reply whose consumer is slow (more than ``max_buffered`` undelivered events) is skipped until the
consumer catches up.

Events are handed to asyncio consumers through ``loop.call_soon_threadsafe``; a job that raises
delivers the exception to its consumer instead.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from omnistream.engine.batch import HOLD_TICKS, Batcher, Entry, Reply
from omnistream.engine.events import Done, Usage

log = logging.getLogger("omnistream.serve")

_END = object()  # queue sentinel: the job is over


class Job:
    """One streaming reply: a generator stepped by the scheduler, consumed with ``async for``."""

    def __init__(self, make_gen: Callable[[], Iterator], on_cancel: Callable[[], None] | None,
                 loop: asyncio.AbstractEventLoop, name: str = ""):
        self.make_gen = make_gen  # called on the model thread (builds session + generator)
        self.on_cancel = on_cancel  # e.g. ``sess.cancel``; called on the model thread
        self.loop = loop
        self.name = name
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gen: Iterator | None = None
        self.pushed = 0  # written by the scheduler thread only
        self.consumed = 0  # written by the consumer only
        self.cancel_requested = False
        self.cancel_sent = False
        self.steps_after_cancel = 0
        self.steps = 0  # next() calls made
        self.finished = threading.Event()
        self.started_at = time.perf_counter()
        self.entry: Entry | None = None  # set when the Batcher drives the reply

    # ---- consumer side (event loop) ----
    def cancel(self) -> None:
        """Ask the reply to stop; it ends with ``Done(finish_reason="cancelled")``."""
        self.cancel_requested = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        self.consumed += 1
        if item is _END:
            self.queue.put_nowait(_END)  # stay ended for any further reads
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    # ---- scheduler side ----
    def _push(self, item: Any) -> None:
        self.pushed += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            self.cancel_requested = True


class Scheduler:
    """The model-owning thread. ``call`` runs one function there; ``stream`` starts a reply."""

    def __init__(self, max_buffered: int = 64, cancel_drain_steps: int = 64,
                 prefill_tokens: int = 256, code2wav_hold: int = HOLD_TICKS,
                 code2wav_thread: bool = False):
        self.max_buffered = max_buffered
        self.cancel_drain_steps = cancel_drain_steps
        # prefill_tokens: prompt tokens prefilled per round; code2wav_hold: rounds a ready
        # speech chunk may wait for company; code2wav_thread: code2wav beside the rounds
        # (engine/batch.py)
        self.batcher = Batcher(prefill_tokens, hold_ticks=code2wav_hold,
                               code2wav_thread=code2wav_thread)
        self._calls: collections.deque = collections.deque()
        self._new_jobs: collections.deque = collections.deque()
        self._jobs: list[Job] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="omnistream-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def active(self) -> int:
        return len(self._jobs) + len(self._new_jobs)

    # ---- API (any thread) ----
    def call(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on the model thread, between reply steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((fut, fn, args, kwargs))
            self._wake.notify_all()
        return fut

    async def acall(self, fn: Callable, *args, **kwargs):
        return await asyncio.wrap_future(self.call(fn, *args, **kwargs))

    def stream(self, make_gen: Callable[[], Iterator], on_cancel: Callable[[], None] | None = None,
               name: str = "") -> Job:
        """Start a reply; must be called from the event loop that consumes it."""
        job = Job(make_gen, on_cancel, asyncio.get_running_loop(), name)
        with self._wake:
            self._new_jobs.append(job)
            self._wake.notify_all()
        return job

    # ---- the model thread ----
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._calls or self._new_jobs or self._runnable()):
                    self._wake.wait(0.05 if self._jobs else 1.0)
                if self._stop:
                    break
                calls = list(self._calls)
                self._calls.clear()
                new = list(self._new_jobs)
                self._new_jobs.clear()
            for fut, fn, args, kwargs in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            for job in new:
                try:
                    job.gen = iter(job.make_gen())
                    if isinstance(job.gen, Reply):
                        job.entry = self.batcher.add(job.gen, self._deliver(job),
                                                     self._ender(job), owner=job)
                    self._jobs.append(job)
                except BaseException as e:  # noqa: BLE001
                    self._finish(job, e)
            for job in list(self._jobs):  # one round: one step per runnable reply
                if job.entry is None:
                    self._step(job)
                else:
                    self._control(job)
            self.batcher.tick(lambda e: self._ready(e.owner))
        for job in self._jobs + list(self._new_jobs):
            if job.entry is not None:
                self.batcher.remove(job.entry)
            self._finish(job, RuntimeError("server shutting down"))
        self._jobs.clear()

    def _ready(self, job: Job) -> bool:
        return job.cancel_requested or job.pushed - job.consumed < self.max_buffered

    def _deliver(self, job: Job) -> Callable[[Any], None]:
        def deliver(ev) -> None:
            self.steps += 1
            job.steps += 1
            job._push(ev)
        return deliver

    def _ender(self, job: Job) -> Callable[[BaseException | None], None]:
        return lambda error: self._finish(job, error)

    def _control(self, job: Job) -> None:
        """Cancellation of a batched reply (its steps run in ``batcher.tick``)."""
        if not job.cancel_requested:
            return
        if job.entry.started:
            self._send_cancel(job)
            job.steps_after_cancel += 1
        if not job.entry.started or job.steps_after_cancel > self.cancel_drain_steps:
            self.batcher.remove(job.entry)  # never started, or it ignored the cancel
            job._push(Done(text="", finish_reason="cancelled", usage=Usage()))
            self._finish(job, None)

    @staticmethod
    def _send_cancel(job: Job) -> None:
        """Tell the reply to wind down, once."""
        if job.cancel_sent:
            return
        job.cancel_sent = True
        if job.on_cancel is not None:
            try:
                job.on_cancel()
            except Exception:  # noqa: BLE001
                log.exception("cancel failed")

    def _runnable(self) -> bool:
        return any(self._ready(j) for j in self._jobs)

    def _drop(self, job: Job) -> None:
        """End a cancelled job without its engine's last word: close it, answer "cancelled"."""
        try:
            job.gen.close()
        finally:
            job._push(Done(text="", finish_reason="cancelled", usage=Usage()))
            self._finish(job, None)

    def _step(self, job: Job) -> None:
        if job.cancel_requested and job.steps == 0:  # never started: nothing to wind down
            self._drop(job)
            return
        if job.cancel_requested:
            self._send_cancel(job)
        if job.cancel_sent:
            job.steps_after_cancel += 1
            if job.steps_after_cancel > self.cancel_drain_steps:  # engine ignored the cancel
                self._drop(job)
                return
        elif job.pushed - job.consumed >= self.max_buffered:
            return  # slow consumer: let it catch up
        try:
            ev = next(job.gen)
        except StopIteration:
            self._finish(job, None)
            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._finish(job, e)
            return
        self.steps += 1
        job.steps += 1
        job._push(ev)
        if isinstance(ev, Done):
            try:
                job.gen.close()
            except Exception:  # noqa: BLE001
                pass
            self._finish(job, None)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        job.entry = None  # no job <-> entry cycle: the session (and its slot) go with the job
        if error is not None:
            job._push(error)
        job._push(_END)
        job.finished.set()


class SlotLimiter:
    """Counts concurrent sessions (requests and sockets); past ``limit`` the caller answers 429."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used = max(0, self.used - 1)
