"""Continuous batching: many sessions' replies advance together, one model call per stage.

A reply (``Session.respond``) is written once, as a coroutine: ``Reply.steps`` yields the events
(``TextDelta``, ``AudioChunk``, ``Done``) and, at every model call it needs, a *work item* whose
result is sent back into it:

    PrefillWork   a prompt chunk into the Thinker's or the Talker's cache -> logits, hidden
    ThinkerWork   feed one token to the session's Thinker cache     -> ThinkerStep (B = 1)
    TalkerWork    one Talker step (previous code + text track)      -> codec logits [1, V]
    Code2WavWork  one planned code2wav chunk                        -> PCM (float32 numpy)

Iterating a ``Reply`` runs each item at once (one session: the engine contract of
docs/ENGINE_API.md). A ``Batcher`` instead collects the items of all its replies and runs them in
*ticks*:

    1. prefill: replies start in arrival order while their first chunks fit the tick's budget,
       then the waiting prompt chunks (the Thinker's, and the Talker's: its prompt when a
       reply's first token exists) run, in arrival order, until ``prefill_tokens`` prompt
       tokens were run this tick (at least one chunk), so a long new prompt never stalls the
       replies that are already streaming. Chunks of one model whose caches share a pool run
       as one call (right-padded to the longest, ``CacheRows``): where a short prompt's weights
       cost as much to read as its arithmetic (3B widths on a CPU: 8 chunks of 18 tokens in one
       call take a third of the time of 8 calls), sessions that arrive together prefill
       together;
    2. one batched Thinker decode step for every reply waiting on one (``CacheRows``: each row
       its own cache slot, length and TMRoPE delta; attention masked per row);
    3. one batched Talker step for every reply waiting on one (the steps that 2 unlocked, and
       the speech of replies whose text is complete);
    4. the code2wav chunks that became ready, solved together where their windows have the
       same length (``code2wav.decode_chunks``), else one by one.

A ready chunk may wait (``hold_ticks``) for other replies' chunks to join its call: concurrent
replies start on different ticks, so their chunks fall due on different ticks and would each
pay a whole code2wav call, whose fixed part (kernel launches, the ODE loop) a shared call pays
once (an H200 at 7B widths, 8 streams: 23.6 s against 27.3 s without holding). A held reply
pauses, so once its chunk runs with the others' the replies go on in step and their later
chunks (same plan, same window lengths) fall due together. A chunk is not held when it is among
its stream's first two (first audio, gapless start: holding them two ticks did not make first
audio at 8 streams earlier on the CPU), when its stream is about to run dry (less than
``hold_margin`` s of audio left, not yet behind), when its reply was cancelled, when it has
waited ``hold_ticks`` ticks or ``hold_cost`` times the last code2wav call's time, or when no
other reply is making codes.

With ``code2wav_thread`` (the server's default) code2wav runs on a thread of its own instead of
in step 4: a reply hands each chunk on (``Code2WavWork.emit``) and goes on with its Thinker and
Talker steps; the thread makes the waiting chunks, the first of each stream (a stream's chunks
run in order) in one call, while the ticks go on, and each tick emits the chunks of a finished
call. A reply's ``AudioDrain`` waits for its last chunks before its ``Done``. On a CPU the steps,
bound by Python and small kernels, and code2wav, bound by arithmetic, then share the cores
(README: one omni-mini stream made 25% more audio per second, 8 streams as much as before). A
call with several streams' first chunks runs alone (the tick waits for it): beside the steps
their first audio came 30% later at 8 streams. Chunks then never wait for company (``hold_*``).

Each reply samples from its own logits row with its own parameters and generators, exactly as
alone, so batching changes the ids only through float rounding: on CPU, MKL computes a row of a
batched matmul ([B, D] @ W, B > 1) with another kernel than the one-row product, and the results
differ by ~1e-6 relative (greedy ids are equal unless two logits tie within that;
tests/test_batch.py compares every id of batched and solo runs). Rows are batched only when their
caches are views of one ``KVPool`` (a ``SlotPool``'s); other sessions still interleave, stepped
one by one.

``SlotPool`` holds the slots: one Thinker cache row (``context`` positions) and one Talker cache
row per session, pre-allocated, taken by ``Engine.session`` when the engine has reserved slots
(``Engine.reserve_slots``) and given back when the session is closed or dropped. The server sizes
it to its ``max_concurrent`` sessions (past that: 429); a session that finds no free slot gets a
private cache and runs unbatched.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omnistream.engine.code2wav import Chunk, Code2WavStream, decode_chunks
from omnistream.engine.events import Event
from omnistream.nn.cache import CacheRows, KVCache, KVPool
from omnistream.nn.thinker import ThinkerStep

if TYPE_CHECKING:
    from omnistream.engine.session import Session


# -- work items ---------------------------------------------------------------------------------


@dataclass
class Work:
    """A model call a reply waits on; ``run_batch`` runs several of one kind together."""

    seconds: float = field(default=0.0, init=False)  # this item's share of the call's time

    @classmethod
    def run_batch(cls, items: list) -> list:
        raise NotImplementedError


@dataclass
class PrefillWork(Work):
    """Run a prompt chunk ``x`` [1, n, E] (input embeddings at TMRoPE ids ``pos`` [3, 1, n]) into
    ``cache`` through ``model`` (a Thinker or a Talker) -> (next-token logits [1, V], final
    hidden states [1, n, D] or None from a Talker)."""

    model: Any  # nn.thinker.Thinker | nn.talker.Talker
    cache: KVCache
    x: Tensor
    pos: Tensor

    @property
    def tokens(self) -> int:
        return self.x.shape[1]

    @property
    def module(self) -> Any:
        return self.model

    @classmethod
    def run_batch(cls, items: list[PrefillWork]) -> list[tuple[Tensor, Tensor | None]]:
        out: list = [None] * len(items)
        for idx in _rows(items):
            T = max(items[i].tokens for i in idx)
            fits = len(idx) == 1 or all(items[i].cache.length + T <= items[i].cache.pool.max_len
                                        for i in idx)  # padded to T, each row fits its slot
            for call in [idx] if fits else [[i] for i in idx]:
                for i, r in zip(call, cls._call([items[i] for i in call]), strict=True):
                    out[i] = r
        return out

    @staticmethod
    def _call(ws: list[PrefillWork]) -> list[tuple[Tensor, Tensor | None]]:
        """One call for chunks whose caches share a pool (or one chunk), right-padded."""
        n = [w.tokens for w in ws]
        T = max(n)
        if len(ws) == 1:
            x, pos, cache = ws[0].x, ws[0].pos, ws[0].cache
        else:
            pad = [T - k for k in n]
            x = torch.cat([F.pad(w.x, (0, 0, 0, p)) for w, p in zip(ws, pad, strict=True)])
            pos = torch.cat([F.pad(w.pos, (0, p)) for w, p in zip(ws, pad, strict=True)], 1)
            cache = CacheRows([w.cache for w in ws], n)
        # x [B, T, E], pos [3, B, T]
        res = ws[0].model(x, pos, cache, last=torch.tensor(n, device=x.device) - 1)
        logits, hidden = res if isinstance(res, tuple) else (res, None)  # [B, 1, V], [B, T, D]
        return [(logits[j : j + 1, -1], None if hidden is None else hidden[j : j + 1, :k])
                for j, k in enumerate(n)]


@dataclass
class ThinkerWork(Work):
    """Feed ``token`` at the end of ``cache`` (rope deltas ``deltas`` [1, 1]) -> ThinkerStep."""

    thinker: Any  # nn.thinker.Thinker
    cache: KVCache
    token: int
    deltas: Tensor

    @property
    def module(self) -> Any:
        return self.thinker

    @classmethod
    def run_batch(cls, items: list[ThinkerWork]) -> list[ThinkerStep]:
        out: list = [None] * len(items)
        for idx in _rows(items):
            ws = [items[i] for i in idx]
            th, dev = ws[0].thinker, ws[0].deltas.device
            tokens = torch.tensor([w.token for w in ws], device=dev)  # [B]
            cache = ws[0].cache if len(ws) == 1 else CacheRows([w.cache for w in ws])
            step = th.decode_step(tokens, cache, torch.cat([w.deltas for w in ws]))  # deltas [B, 1]
            # logits [B, V], hidden / embeds [B, 1, D], position_ids [3, B, 1]
            for j, i in enumerate(idx):  # row j as a one-row step
                out[i] = ThinkerStep(step.logits[j : j + 1], step.hidden[j : j + 1],
                                     step.embeds[j : j + 1], step.position_ids[:, j : j + 1],
                                     step.rope_deltas[j : j + 1])
        return out


@dataclass
class TalkerWork(Work):
    """One Talker step: previous ``code``, text-track input ``text`` [1, 1, E] -> logits [1, V]."""

    talker: Any  # nn.talker.Talker
    cache: KVCache
    code: int
    text: Tensor
    deltas: Tensor

    @property
    def module(self) -> Any:
        return self.talker

    @classmethod
    def run_batch(cls, items: list[TalkerWork]) -> list[Tensor]:
        out: list = [None] * len(items)
        for idx in _rows(items):
            ws = [items[i] for i in idx]
            codes = torch.tensor([w.code for w in ws], device=ws[0].deltas.device)  # [B]
            cache = ws[0].cache if len(ws) == 1 else CacheRows([w.cache for w in ws])
            logits = ws[0].talker.step(cache, codes, torch.cat([w.text for w in ws]),  # [B, 1, E]
                                       torch.cat([w.deltas for w in ws]))  # -> [B, V]
            for j, i in enumerate(idx):
                out[i] = logits[j : j + 1]
        return out


@dataclass
class Code2WavWork(Work):
    """Synthesise the planned ``chunk`` of ``stream`` -> PCM (float32 numpy). ``deadline``: the
    ``time.perf_counter()`` at which the stream's audio so far, played from its first chunk,
    runs out; None for a chunk that must not wait (the first ones: first audio, gapless start).
    ``emit(work, pcm)``: the chunk's event; a ``Batcher`` with a code2wav thread sends the reply
    None at once and calls it when the chunk is made (the reply's text goes on meanwhile)."""

    stream: Code2WavStream
    chunk: Chunk
    deadline: float | None = None
    emit: Callable[[Code2WavWork, np.ndarray], Event | None] | None = None

    @classmethod
    def run_batch(cls, items: list[Code2WavWork]) -> list[np.ndarray]:
        out: list = [None] * len(items)
        by_model: dict[int, list[int]] = {}
        for i, w in enumerate(items):
            by_model.setdefault(id(w.stream.model), []).append(i)
        for idx in by_model.values():
            pcm = decode_chunks([(items[i].stream, items[i].chunk) for i in idx])
            for i, p in zip(idx, pcm, strict=True):
                out[i] = p
        return out


@dataclass
class AudioDrain(Work):
    """Wait until every code2wav chunk the reply handed on is made and emitted (before its
    ``Done``); nothing to wait for when each chunk ran at once."""

    @classmethod
    def run_batch(cls, items: list[AudioDrain]) -> list[None]:
        return [None] * len(items)


def _share_key(w: Work) -> tuple[int, int]:
    """Items with equal keys can share one call: same module, caches in one pool (an item whose
    cache is private has a key of its own)."""
    pool = w.cache.pool
    return id(w.module), id(pool) if pool is not None else id(w)


def _rows(items: list) -> list[list[int]]:
    """Indices of the items that can share one call (``_share_key``)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(items):
        groups.setdefault(_share_key(w), []).append(i)
    return list(groups.values())


def run_work(items: list[Work]) -> list:
    """Run work items of one kind together; records each item's share of the time."""
    t = time.perf_counter()
    out = type(items[0]).run_batch(items)
    share = (time.perf_counter() - t) / len(items)
    for w in items:
        w.seconds = share
    return out


def prefilling(thinker: Any, cache: KVCache,
               chunks: Generator[tuple[Tensor, Tensor], Any, Any]) -> Generator[Work, Any, Any]:
    """Drive ``Thinker.prefill_chunks`` into ``cache``, yielding a ``PrefillWork`` per chunk;
    returns its return value (the ``ThinkerStep``)."""
    result = None
    while True:
        try:
            x, pos = chunks.send(result)
        except StopIteration as done:
            return done.value
        result = yield PrefillWork(thinker, cache, x, pos)


# -- one reply ----------------------------------------------------------------------------------


class Reply(Generator):
    """What ``Session.respond`` returns: a generator of events. Iterating it runs every model
    call of the reply at once (one session); a ``Batcher`` drives ``steps`` instead."""

    def __init__(self, session: Session, steps: Generator):
        self.session = session
        self.steps = steps  # yields Event | Work; Work results are sent back

    def send(self, value: None) -> Event:
        result = None
        with torch.inference_mode():
            while True:
                item = self.steps.send(result)
                if not isinstance(item, Work):
                    return item
                result = run_work([item])[0]

    def throw(self, typ, val=None, tb=None):
        return self.steps.throw(typ if val is None else val)

    def close(self) -> None:
        self.steps.close()


# -- many replies -------------------------------------------------------------------------------

HOLD_TICKS = 24  # default: most ticks a ready code2wav chunk waits for company
FIRST_WAIT = 3  # with a code2wav thread: most ticks first chunks wait for other first chunks


@dataclass(eq=False)
class Entry:
    """A reply in a ``Batcher``: what it waits on, and where its events go."""

    reply: Reply
    on_event: Callable[[Event], None]
    on_end: Callable[[BaseException | None], None]  # once: None, or the error it ended with
    pending: Work | None = None  # None: not started
    result: Any = None
    owner: Any = None  # free for the caller (the server's job)
    held: int = 0  # ticks its pending code2wav chunk has waited for company
    held_since: float = 0.0  # since when (time.perf_counter())
    audio: deque = field(default_factory=deque)  # chunks handed to the code2wav thread, in order
    emitted: int = 0  # of them, how many were made and emitted

    @property
    def started(self) -> bool:
        return self.pending is not None


class Batcher:
    """Advances many replies together, one ``tick`` at a time (see the module docstring). Not
    thread-safe: one thread (the server's model thread) calls everything."""

    def __init__(self, prefill_tokens: int = 256, hold_ticks: int = HOLD_TICKS,
                 hold_margin: float = 0.3, hold_cost: float = 1.0, code2wav_thread: bool = False):
        self.prefill_tokens = prefill_tokens  # prompt tokens per tick (at least one chunk runs)
        # code2wav on a thread of its own, beside the ticks' Thinker and Talker steps (module
        # docstring); then chunks never wait for company (hold_* unused)
        self.code2wav_thread = code2wav_thread
        self._job: _Job | None = None  # the code2wav call in flight on that thread
        self._first_since: int | None = None  # the tick since which first chunks wait for others
        self.hold_ticks = hold_ticks  # most ticks a code2wav chunk waits for others (0: never)
        self.hold_margin = hold_margin  # s of audio left under which a chunk never waits
        # and at most this many times the last code2wav call's time: waiting longer than the
        # call that sharing saves costs more than it saves (on a slow CPU a tick can take 0.5 s)
        self.hold_cost = hold_cost
        self.code2wav_s = 0.0  # the last code2wav call's time
        self.entries: list[Entry] = []
        self.ticks = 0
        kinds = (PrefillWork, ThinkerWork, TalkerWork, Code2WavWork)
        self.calls = dict.fromkeys(kinds, 0)  # batched calls per kind
        self.rows = dict.fromkeys(kinds, 0)  # items they ran (rows / calls: the mean batch)
        self.widest = dict.fromkeys(kinds, 0)  # most items in one call

    def add(self, reply: Reply, on_event: Callable[[Event], None],
            on_end: Callable[[BaseException | None], None] = lambda e: None,
            owner: Any = None) -> Entry:
        """Start driving ``reply``; its prompt chunks are set to the tick's prefill budget."""
        reply.session.prefill_chunk = self.prefill_tokens
        e = Entry(reply, on_event, on_end, owner=owner)
        self.entries.append(e)
        return e

    def remove(self, e: Entry) -> None:
        """Stop driving ``e`` and close its reply (no ``on_end``)."""
        e.audio.clear()
        if e in self.entries:
            self.entries.remove(e)
        e.reply.close()

    def tick(self, ready: Callable[[Entry], bool] = lambda e: True) -> bool:
        """One round: prefill budget, then one Thinker, one Talker and one code2wav batch.
        ``ready(entry)`` False skips a reply this tick (e.g. a slow consumer). Returns whether
        any work ran."""
        with torch.inference_mode():
            # a call with several streams' first chunks has the cores to itself
            ran = self.code2wav_thread and self._audio(wait=self._job is not None
                                                       and self._job.first)
            ran = self._prefill(ready) or ran
            for kind in (ThinkerWork, TalkerWork, Code2WavWork):
                batch = [e for e in self.entries if isinstance(e.pending, kind) and ready(e)]
                if not batch or kind is Code2WavWork and self._hold(batch, ready):
                    continue
                ran = True
                self._run(kind, batch)
            if self.code2wav_thread:  # with nothing else to do, wait for the call in flight
                ran = self._audio(wait=not ran) or ran
        self.ticks += ran
        return ran

    def _audio(self, wait: bool) -> bool:
        """The code2wav thread's side of a tick: emit the chunks of a finished call, resume the
        replies that were waiting for their audio (``AudioDrain``), and start the next call on
        the waiting chunks (each stream's first: a stream's chunks run in order). ``wait``: block
        until the call in flight ends. Returns whether anything happened."""
        job, ran = self._job, False
        if job is not None and (wait or not job.thread.is_alive()):
            job.thread.join()
            self._job, ran = None, True
            self._emit_audio(job)
        for e in [e for e in self.entries if isinstance(e.pending, AudioDrain) and not e.audio]:
            ran = True
            self._advance(e)
        heads = [e for e in self.entries if e.audio]
        if self._job is None and heads and not self._first_soon(heads):
            self._job = _Job(heads, [e.audio[0] for e in heads])
            self._job.thread.start()
            ran = True
        return ran

    def _first_soon(self, heads: list[Entry]) -> bool:
        """Whether the first chunks among ``heads`` wait a tick for other replies' first chunks,
        due a step or two later (replies that started a tick apart), so that they share a call
        rather than waiting for it (at most ``FIRST_WAIT`` ticks; ``_audio`` runs twice a tick,
        so the wait is counted in ticks, from the tick it began)."""
        coming = any(e.emitted == 0 for e in heads) and any(
            e.emitted == 0 and not e.audio and isinstance(e.pending, TalkerWork)
            for e in self.entries)
        if coming and self._first_since is None:
            self._first_since = self.ticks
        if not coming or self.ticks - self._first_since >= FIRST_WAIT:
            self._first_since = None
            return False
        return True

    def _emit_audio(self, job: _Job) -> None:
        """Deliver a finished code2wav call's chunks (a failed call ends its replies)."""
        self._count(Code2WavWork, len(job.items))
        self.code2wav_s = sum(w.seconds for w in job.items)
        for i, (e, w) in enumerate(zip(job.entries, job.items, strict=True)):
            if e not in self.entries or not e.audio or e.audio[0] is not w:
                continue  # removed (cancelled, or ended with an error) meanwhile
            e.audio.popleft()
            if job.error is not None:
                self._end(e, job.error)
                continue
            e.emitted += 1
            try:
                ev = w.emit(w, job.results[i])
            except Exception as err:  # noqa: BLE001 - handed to the reply's owner
                self._end(e, err)
                continue
            if ev is not None:
                e.on_event(ev)

    def _count(self, kind: type, rows: int) -> None:
        """One call of ``kind`` with ``rows`` items, in the batching statistics."""
        self.calls[kind] += 1
        self.rows[kind] += rows
        self.widest[kind] = max(self.widest[kind], rows)

    def _run(self, kind: type, batch: list[Entry]) -> None:
        """Run the pending items (of ``kind``) of ``batch`` together and resume each reply. A
        call that raises is run again one item at a time, from the caches' lengths before it, so
        that only a reply whose own item fails ends with the error (not a code2wav call: its
        streams have drawn their noise)."""
        self._count(kind, len(batch))
        lengths = [] if kind is Code2WavWork else [e.pending.cache.length for e in batch]
        try:
            results = run_work([e.pending for e in batch])
        except Exception as err:  # noqa: BLE001 - handed to the replies' owners
            if len(batch) == 1 or kind is Code2WavWork:
                for e in batch:
                    self._end(e, err)
                return
            for e, n in zip(batch, lengths, strict=True):
                e.pending.cache.crop(n)
            for e in batch:
                self._run(kind, [e])
            return
        if kind is Code2WavWork:
            self.code2wav_s = sum(e.pending.seconds for e in batch)
        for e, r in zip(batch, results, strict=True):
            e.result = r
            self._advance(e)

    def run(self, replies: Iterable[Reply]) -> list[list[Event]]:
        """Drive ``replies`` to their ends together; their events, in order, per reply."""
        out: list[list[Event]] = []
        errors: list[BaseException] = []
        for r in replies:
            out.append([])
            self.add(r, out[-1].append, lambda err: err is not None and errors.append(err))
        while self.entries:
            self.tick()
        if errors:
            raise errors[0]
        return out

    def _prefill(self, ready: Callable[[Entry], bool]) -> bool:
        """The tick's prompt work (module docstring, 1.); returns whether any ran."""
        ran, budget = False, self.prefill_tokens

        def chunks() -> list[Entry]:
            return [e for e in self.entries if isinstance(e.pending, PrefillWork) and ready(e)]

        queued = sum(e.pending.tokens for e in chunks())
        for e in [e for e in self.entries if e.pending is None and ready(e)]:
            if queued >= budget:
                break
            self._advance(e)  # up to its first model call: tokenizing, the media encoders
            ran = True
            if isinstance(e.pending, PrefillWork):
                queued += e.pending.tokens
        while budget > 0 and (waiting := chunks()):
            key, used = _share_key(waiting[0].pending), 0
            batch = []
            for e in waiting:  # the first always runs; others of its call while budget lasts
                n = e.pending.tokens
                if _share_key(e.pending) == key and (not batch or used + n <= budget):
                    batch.append(e)
                    used += n
            ran = True
            budget -= used
            self._run(PrefillWork, batch)
        return ran

    def _hold(self, batch: list[Entry], ready: Callable[[Entry], bool]) -> bool:
        """Whether the ready code2wav chunks of ``batch`` wait a tick for company (see the
        module docstring); counts the wait."""
        if self.hold_ticks <= 0 or any(e.held >= self.hold_ticks for e in batch):
            return False
        now = time.perf_counter()
        for e in batch:
            left = e.pending.deadline
            if left is None or 0.0 <= left - now < self.hold_margin or e.reply.session.cancelled:
                return False
            if e.held and now - e.held_since >= self.hold_cost * self.code2wav_s:
                return False
        if not any(isinstance(o.pending, TalkerWork) and ready(o) for o in self.entries):
            return False  # nobody else is making codes: no chunk can join
        for e in batch:
            if not e.held:
                e.held_since = now
            e.held += 1
        return True

    def _advance(self, e: Entry) -> None:
        """Resume ``e`` with its result; deliver its events until it waits again or ends."""
        e.held = 0
        try:
            while True:
                item = e.reply.steps.send(e.result)
                e.result = None
                if isinstance(item, Work):
                    if self.code2wav_thread and isinstance(item, Code2WavWork) and item.emit:
                        e.audio.append(item)  # made beside the reply, which goes on now
                        continue
                    if isinstance(item, AudioDrain) and not e.audio:
                        continue
                    e.pending = item
                    return
                e.on_event(item)
        except StopIteration:
            self._end(e, None)
        except Exception as err:  # noqa: BLE001 - handed to the reply's owner
            self._end(e, err)

    def _end(self, e: Entry, err: BaseException | None) -> None:
        e.audio.clear()  # a call in flight drops its chunk
        if e in self.entries:
            self.entries.remove(e)
        if err is not None:
            e.reply.close()
        e.on_end(err)


class _Job:
    """One code2wav call on its own thread: the first waiting chunk of each of ``entries``."""

    def __init__(self, entries: list[Entry], items: list[Code2WavWork]):
        self.entries, self.items = entries, items
        # the first audio of several streams: their wait is worth more than the steps beside it
        self.first = sum(e.emitted == 0 for e in entries) > 1
        self.results: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="code2wav", daemon=True)

    def _run(self) -> None:
        try:
            with torch.inference_mode():  # thread-local
                self.results = run_work(self.items)  # sets each item's share of the time
        except BaseException as err:  # noqa: BLE001 - handed to the replies by the tick
            self.error = err


# -- cache slots --------------------------------------------------------------------------------


class SlotPool:
    """``slots`` pre-allocated cache slots, one per session: a Thinker row of ``context``
    positions and (with audio output) a Talker row of ``context + 2 + speech_codes``. Thread-safe
    (a dropped session may give its slot back from any thread)."""

    def __init__(self, engine, slots: int, context: int = 8192, speech_codes: int = 4096):
        if slots < 1 or context < 1:
            raise ValueError(f"slots and context must be positive, not {slots}, {context}")
        self.slots, self.context = slots, context
        self.thinker: KVPool = engine.thinker.model.new_pool(slots, context)
        self.talker: KVPool | None = None
        if engine.talker is not None:
            self.talker = engine.talker.model.new_pool(slots, context + 2 + speech_codes)
        self._free = list(range(slots))
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot's index, or None when all are taken."""
        with self._lock:
            return self._free.pop(0) if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free:
                self._free.append(slot)
                self._free.sort()  # lowest first: busy rows stay contiguous (CacheRows views)
