"""Continuous batching (engine/batch.py): sessions decoded together give each stream the ids of
its solo run; a cancelled stream leaves the others unchanged; slots come back; prompts prefill in
chunks between the running replies' steps; the server's scheduler batches its replies."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import DEVICE

from omnistream.engine import allocator
from omnistream.engine.batch import Batcher, Code2WavWork, PrefillWork, TalkerWork, ThinkerWork
from omnistream.engine.events import AudioChunk, Done, TextDelta
from omnistream.engine.sampling import SamplingParams

PROMPTS = ["Hi", "Tell me a story about a robot.", "What is two plus two? " * 3, "x " * 40]
FAST_SPEECH = dict(talker_max_new_tokens=40, ode_steps=2, solver="euler", chunk_frames=48,
                   max_chunk_frames=48)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from omnistream.engine.session import Engine

    eng = Engine.load(tiny_dir, quiet=True, device=DEVICE)
    eng.reserve_slots(6, context=1024, speech_codes=64)
    return eng


def _options(i: int) -> dict:
    """Per-stream options: own seeds; stream 1 samples its text, stream 3 has no speech."""
    o = dict(seed=10 + i, max_new_tokens=8, max_context=1024, **FAST_SPEECH)
    if i == 1:
        o["sampling"] = SamplingParams(temperature=0.8, top_k=50)
    if i == 3:
        o["audio_output"] = False
    return o


def _solo(engine, i: int) -> list:
    return list(engine.session(**_options(i)).respond(PROMPTS[i]))


def _pcm(events) -> np.ndarray:
    pcm = [e.pcm for e in events if isinstance(e, AudioChunk)]
    return np.concatenate(pcm) if pcm else np.zeros(0, np.float32)


@pytest.fixture(scope="module")
def solo(engine):
    return [_solo(engine, i) for i in range(len(PROMPTS))]


def test_cache_rows_attend_each_row_to_its_own_slots(engine):
    """One batched decode step over pool slots of different lengths (one with a previous
    occupant's stale entries past its length) equals each row decoded alone."""
    from omnistream.nn.cache import CacheRows

    th = engine.thinker
    pool = th.model.new_pool(3, 64)
    caches = [pool.view(i) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(0, 1000, (1, 30), generator=g).to(DEVICE)
        th.prefill(ids, caches[0])  # stale, then cut
        caches[0].crop(4)
        for c, n in zip(caches, (0, 11, 23), strict=True):
            if n:
                th.prefill(torch.randint(0, 1000, (1, n), generator=g).to(DEVICE), c)
        tokens = torch.tensor([5, 6, 7], device=DEVICE)
        deltas = torch.tensor([[0], [2], [-1]], device=DEVICE)
        lengths = [c.length for c in caches]
        batched = th.decode_step(tokens, CacheRows(caches), deltas)
        assert [c.length for c in caches] == [n + 1 for n in lengths]
        for c in caches:
            c.crop(c.length - 1)
        for i, c in enumerate(caches):
            alone = th.decode_step(tokens[i : i + 1], c, deltas[i : i + 1])
            torch.testing.assert_close(batched.logits[i : i + 1], alone.logits, rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(batched.hidden[i : i + 1], alone.hidden, rtol=1e-5,
                                       atol=1e-5)


def test_prompt_chunks_of_several_slots_run_as_one_right_padded_call(engine, monkeypatch):
    """``PrefillWork`` of three sessions (chunks of 5, 12 and 1 tokens on caches of different
    lengths, one with stale entries): one call, and each row's logits, hidden states, cache
    length and cache rows equal its chunk run alone; the Talker's the same."""
    from omnistream.engine.batch import PrefillWork, run_work

    g = torch.Generator().manual_seed(1)
    calls, real = [], PrefillWork._call
    monkeypatch.setattr(PrefillWork, "_call", staticmethod(
        lambda ws: calls.append(len(ws)) or real(ws)))
    for model in (engine.thinker, engine.talker):
        E = (model.model.embed_tokens.embedding_dim if model is engine.thinker
             else model.thinker_to_talker_proj.in_features)
        pool = model.model.new_pool(3, 64)
        caches = [pool.view(i) for i in range(3)]
        with torch.inference_mode():
            for c, n in zip(caches, (7, 0, 20), strict=True):
                if n:
                    x = torch.randn(1, n, E, generator=g).to(DEVICE)
                    model(x, torch.arange(n, device=DEVICE).expand(3, 1, n), c)
            caches[2].crop(15)  # stale entries past its length
            work = []
            for c, n in zip(caches, (5, 12, 1), strict=True):
                x = torch.randn(1, n, E, generator=g).to(DEVICE)
                pos = (c.length + torch.arange(n, device=DEVICE)).expand(3, 1, n)
                work.append(PrefillWork(model, c, x, pos))
            lengths = [c.length for c in caches]
            calls.clear()
            batched = run_work(work)
            assert calls == [3]
            assert [c.length for c in caches] == [n + w.tokens for n, w in zip(lengths, work,
                                                                                strict=True)]
            rows = [(c.k[0][:, :, : c.length].clone(), c.v[-1][:, :, : c.length].clone())
                    for c in caches]
            for c, n in zip(caches, lengths, strict=True):
                c.crop(n)
            for w, (logits, hidden), (k, v) in zip(work, batched, rows, strict=True):
                alone_logits, alone_hidden = run_work([w])[0]
                torch.testing.assert_close(logits, alone_logits, rtol=1e-5, atol=1e-5)
                if model is engine.thinker:
                    assert hidden.shape == (1, w.tokens, E)
                    torch.testing.assert_close(hidden, alone_hidden, rtol=1e-5, atol=1e-5)
                else:
                    assert hidden is None and alone_hidden is None
                torch.testing.assert_close(k, w.cache.k[0][:, :, : w.cache.length])
                torch.testing.assert_close(v, w.cache.v[-1][:, :, : w.cache.length])


@pytest.mark.parametrize("thread", [False, True], ids=["inline", "code2wav_thread"])
def test_batched_streams_equal_their_solo_runs(engine, solo, monkeypatch, thread):
    """N sessions decoded together (greedy and sampled text, sampled speech, one text-only):
    every stream's text ids and codec ids equal its solo run's; its audio within fp32 noise,
    in order and before its ``Done`` with code2wav on its own thread too, where the speaking
    streams' first chunks share one call that no Thinker or Talker step runs beside. The
    Thinker's prompt chunks and the Talker's prompts ran several sessions per call."""
    import omnistream.engine.batch as batch_mod

    widest: dict = {}
    real = PrefillWork._call
    monkeypatch.setattr(PrefillWork, "_call", staticmethod(lambda ws: widest.update(
        {ws[0].model: max(widest.get(ws[0].model, 0), len(ws))}) or real(ws)))
    decodes, first_in_flight, beside_first = [], threading.Event(), []
    real_decode = batch_mod.decode_chunks

    def decode(work):
        decodes.append(len(work))
        if len(decodes) == 1:
            first_in_flight.set()
            time.sleep(0.05)  # long enough for a step beside it, were one allowed
        try:
            return real_decode(work)
        finally:
            first_in_flight.clear()

    monkeypatch.setattr(batch_mod, "decode_chunks", decode)
    for kind in (ThinkerWork, TalkerWork):
        monkeypatch.setattr(kind, "run_batch", classmethod(
            lambda cls, items, f=kind.run_batch.__func__: beside_first.append(
                first_in_flight.is_set()) or f(cls, items)))
    sessions = [engine.session(**_options(i)) for i in range(len(PROMPTS))]
    assert all(s.cache.pool is engine.slots.thinker for s in sessions)
    b = Batcher(code2wav_thread=thread)
    out = b.run([s.respond(p) for s, p in zip(sessions, PROMPTS, strict=True)])
    steps = sum(len(o[-1].text_ids) - 1 for o in solo)  # every fed reply token
    assert widest[engine.thinker] > 1 and widest[engine.talker] > 1
    assert b.rows[ThinkerWork] == steps
    assert b.calls[ThinkerWork] < steps / 2  # the Thinker steps ran several per call
    assert b.calls[TalkerWork] < b.rows[TalkerWork] / 2  # ... and so did the Talker steps
    assert decodes[0] == 3 and not any(beside_first)  # the speaking streams' first chunks
    for i, (alone, batched) in enumerate(zip(solo, out, strict=True)):
        d1, d2 = alone[-1], batched[-1]
        assert isinstance(d2, Done) and d2.finish_reason == d1.finish_reason
        assert d2.text_ids == d1.text_ids, i
        assert d2.codec_ids == d1.codec_ids, i
        assert d2.text == d1.text
        a1, a2 = _pcm(alone), _pcm(batched)
        assert a1.shape == a2.shape and (i == 3 or a1.size > 0)
        np.testing.assert_allclose(a2, a1, atol=1e-4)
        chunks = [e.index for e in batched if isinstance(e, AudioChunk)]
        assert chunks == list(range(len(chunks)))
        assert d2.timings.get("audio_s", 0.0) == pytest.approx(a2.size / 24000)


def test_a_failing_batched_call_is_run_again_row_by_row(engine, solo, monkeypatch):
    """A batched Thinker step that raises (here after the caches moved on) runs again one row
    at a time from the lengths before it: only the reply whose own step fails ends with its
    error; the others equal their solo runs."""
    sessions = [engine.session(**_options(i)) for i in range(3)]
    bad = sessions[1].cache
    real = ThinkerWork.run_batch.__func__

    def flaky(cls, items):
        if any(w.cache is bad for w in items):
            if len(items) == 1:
                raise RuntimeError("this row's step fails")
            real(cls, items)  # every row's cache advanced, then the call fails
            raise RuntimeError("the batched call fails")
        return real(cls, items)

    monkeypatch.setattr(ThinkerWork, "run_batch", classmethod(flaky))
    events: list[list] = [[], [], []]
    ended: list = [None, None, None]
    b = Batcher()
    for i, s in enumerate(sessions):
        b.add(s.respond(PROMPTS[i]), events[i].append,
              lambda err, i=i: ended.__setitem__(i, err))
    while b.entries:
        b.tick()
    assert str(ended[1]) == "this row's step fails"
    for i in (0, 2):
        assert ended[i] is None
        assert events[i][-1].text_ids == solo[i][-1].text_ids
        assert events[i][-1].codec_ids == solo[i][-1].codec_ids


@pytest.mark.parametrize("thread", [False, True], ids=["inline", "code2wav_thread"])
def test_cancelling_one_stream_leaves_the_others_unchanged(engine, solo, thread):
    sessions = [engine.session(**_options(i)) for i in range(3)]
    events: list[list] = [[], [], []]

    def on_event(i):
        def put(ev):
            events[i].append(ev)
            if i == 1 and sum(isinstance(e, TextDelta) for e in events[i]) == 2:
                sessions[1].cancel()
        return put

    b = Batcher(code2wav_thread=thread)
    for i, s in enumerate(sessions):
        b.add(s.respond(PROMPTS[i]), on_event(i))
    while b.entries:
        b.tick()
    cancelled = events[1][-1]
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.text_ids == solo[1][-1].text_ids[: len(cancelled.text_ids)]
    for i in (0, 2):
        assert events[i][-1].text_ids == solo[i][-1].text_ids
        assert events[i][-1].codec_ids == solo[i][-1].codec_ids


def test_code2wav_thread_runs_beside_the_steps_and_hands_on_its_errors(engine, solo,
                                                                       monkeypatch):
    """With ``code2wav_thread`` the chunks are made on a thread of their own while the replies'
    Thinker and Talker steps go on; a failing code2wav call ends the replies it served, with
    its error, and nobody else."""
    import omnistream.engine.batch as batch_mod

    in_flight, beside, threads = threading.Event(), [], set()
    real_decode, real_step = batch_mod.decode_chunks, ThinkerWork.run_batch

    def slow_decode(work):
        threads.add(threading.current_thread().name)
        in_flight.set()
        time.sleep(0.05)
        try:
            return real_decode(work)
        finally:
            in_flight.clear()

    def step(cls, items):
        beside.append(in_flight.is_set())
        return real_step.__func__(cls, items)

    monkeypatch.setattr(batch_mod, "decode_chunks", slow_decode)
    monkeypatch.setattr(ThinkerWork, "run_batch", classmethod(step))
    long = dict(_options(0), max_new_tokens=60, ignore_eos=True)  # text past the 40 codes
    out = Batcher(code2wav_thread=True).run([engine.session(**long).respond(PROMPTS[0]),
                                             engine.session(**_options(3)).respond(PROMPTS[3])])
    assert threads == {"code2wav"} and any(beside)
    assert out[1][-1].text_ids == solo[3][-1].text_ids
    assert len(out[0][-1].text_ids) == 60 and _pcm(out[0]).size > 0

    def failing(work):
        raise RuntimeError("code2wav failed")

    monkeypatch.setattr(batch_mod, "decode_chunks", failing)
    ends: list = []
    b = Batcher(code2wav_thread=True)
    for i in (0, 3):  # the text-only reply is served by no code2wav call
        b.add(engine.session(**_options(i)).respond(PROMPTS[i]), lambda ev: None, ends.append)
    while b.entries:
        b.tick()
    assert sorted(map(str, ends)) == ["None", "code2wav failed"]
    assert b._job is None or not b._job.thread.is_alive()


def test_code2wav_thread_waits_a_tick_or_two_for_other_first_chunks(engine, solo,
                                                                     monkeypatch):
    """Replies that start a tick apart have their first chunks due a tick apart: with a code2wav
    thread the earlier one waits (at most ``FIRST_WAIT`` ticks) so that both share one call,
    rather than the later one waiting for the earlier one's call to end."""
    import omnistream.engine.batch as batch_mod

    decodes: list[int] = []
    real_decode = batch_mod.decode_chunks
    monkeypatch.setattr(batch_mod, "decode_chunks",
                        lambda work: decodes.append(len(work)) or real_decode(work))
    out: list[list] = [[], []]
    b = Batcher(code2wav_thread=True)
    b.add(engine.session(**_options(0)).respond(PROMPTS[0]), out[0].append)
    b.tick()
    b.tick()  # the second reply starts two ticks later
    b.add(engine.session(**_options(2)).respond(PROMPTS[2]), out[1].append)
    while b.entries:
        b.tick()
    assert decodes[0] == 2
    for events, alone in zip(out, (solo[0], solo[2]), strict=True):
        assert events[-1].codec_ids == alone[-1].codec_ids
        np.testing.assert_allclose(_pcm(events), _pcm(alone), atol=1e-4)


def test_slots_are_taken_and_given_back(engine):
    pool = engine.slots
    free = pool.free
    a, b = engine.session(max_context=1024), engine.session(max_context=1024)
    assert pool.free == free - 2 and a.cache.slot != b.cache.slot
    a.close()  # at once
    assert pool.free == free - 1
    del b  # dropped
    assert pool.free == free
    big = engine.session(max_context=4096)  # does not fit a slot: private cache, unbatched
    assert big.cache.pool is None and pool.free == free
    held = [engine.session(max_context=1024) for _ in range(free)]
    extra = engine.session(max_context=1024)  # none free: private cache
    assert pool.free == 0 and extra.cache.pool is None
    del held
    assert pool.free == free


def test_new_prompts_prefill_in_chunks_between_running_steps(engine, solo):
    """A long prompt arriving mid-reply is prefilled a budget per tick while the running reply
    keeps producing tokens; both still equal their solo runs."""
    long_prompt = "Please answer this. " * 30
    alone = list(engine.session(**_options(0)).respond(long_prompt))
    b = Batcher(prefill_tokens=32)
    log: list[tuple[int, object]] = []
    first = engine.session(**_options(0))
    b.add(first.respond(PROMPTS[0]), lambda ev: log.append((0, ev)))
    for _ in range(3):
        b.tick()
    second = engine.session(**_options(0))
    b.add(second.respond(long_prompt), lambda ev: log.append((1, ev)))
    while b.entries:
        b.tick()
    order = [k for k, ev in log if isinstance(ev, TextDelta)]
    first_of_second = order.index(1)
    assert order[:first_of_second].count(0) >= 4  # the running reply kept streaming meanwhile
    assert second.last_prompt_ids and len(second.last_prompt_ids) > 4 * 32
    done = {k: ev for k, ev in log if isinstance(ev, Done)}
    assert done[0].text_ids == solo[0][-1].text_ids
    assert done[1].text_ids == alone[-1].text_ids
    assert done[1].codec_ids == alone[-1].codec_ids


def test_ready_chunks_wait_for_other_replies_chunks(engine):
    """Two replies started four ticks apart: their code2wav chunks fall due on different ticks.
    Held (``hold_ticks``), the later chunks share calls and the replies go on in step; never
    held, or held for no longer than a tick (``hold_cost`` 0), each chunk runs alone. Every way,
    each stream's codes and audio are its solo run's."""
    speech = dict(talker_max_new_tokens=90, ode_steps=2, solver="euler", chunk_frames=24,
                  max_chunk_frames=48, max_new_tokens=6, ignore_eos=True, max_context=1024)
    solo = [list(engine.session(seed=i, **speech).respond(PROMPTS[i])) for i in (0, 1)]
    widest = {}
    for hold, cost in ((0, float("inf")), (24, float("inf")), (24, 0.0)):
        # margin 0: no stream counts as running dry; cost: the time bound (inf: ticks decide;
        # 0: a chunk waits one tick at most)
        b = Batcher(hold_ticks=hold, hold_margin=0.0, hold_cost=cost)
        out: list[list] = [[], []]
        b.add(engine.session(seed=0, **speech).respond(PROMPTS[0]), out[0].append)
        for _ in range(4):
            b.tick()
        b.add(engine.session(seed=1, **speech).respond(PROMPTS[1]), out[1].append)
        while b.entries:
            b.tick()
        widest[hold, cost] = b.widest[Code2WavWork]
        for alone, batched in zip(solo, out, strict=True):
            assert batched[-1].codec_ids == alone[-1].codec_ids
            assert len(alone[-1].codec_ids) == 90
            np.testing.assert_allclose(_pcm(batched), _pcm(alone), atol=1e-4)
    assert list(widest.values()) == [1, 2, 1]


def test_a_cancelled_reply_is_not_held(engine):
    """A reply cancelled while its chunk waits for company runs the chunk on the next tick and
    ends "cancelled"."""
    speech = dict(talker_max_new_tokens=200, ode_steps=2, solver="euler", chunk_frames=24,
                  max_chunk_frames=48, max_new_tokens=6, ignore_eos=True, max_context=1024)
    b = Batcher(hold_ticks=1000, hold_margin=0.0, hold_cost=float("inf"))
    first, second = engine.session(seed=0, **speech), engine.session(seed=1, **speech)
    out: list = []
    a = b.add(first.respond(PROMPTS[0]), out.append)
    for _ in range(10):  # the second reply's chunks fall due ~10 ticks after the first's
        b.tick()
    b.add(second.respond(PROMPTS[1]), lambda ev: None)
    while a.held == 0:
        assert a in b.entries
        b.tick()
    held = a.pending
    first.cancel()
    b.tick()
    assert a.pending is not held and a.held == 0
    while a in b.entries:
        b.tick()
    assert out[-1].finish_reason == "cancelled"
    b.remove(b.entries[0])


def test_hold_rules():
    """Which ready code2wav chunks wait a tick for company (``Batcher._hold``), one rule per
    case: a chunk that may wait waits; a stream's first chunks (no deadline), one about to run dry
    (under ``hold_margin`` s left), a cancelled reply, one that waited its ``hold_ticks`` or
    ``hold_cost`` x the last call's time, and a batch with nobody else making codes do not."""
    from types import SimpleNamespace

    from omnistream.engine.batch import Entry

    def entry(pending, cancelled=False):
        e = Entry(SimpleNamespace(session=SimpleNamespace(cancelled=cancelled)),
                  lambda ev: None, lambda err: None)
        e.pending = pending
        return e

    def chunk(left, **kw):  # a ready chunk whose stream's audio runs out in ``left`` s
        return entry(Code2WavWork(None, None, None if left is None else time.perf_counter() + left),
                     **kw)

    def held(batch, others=True, **setup):
        b = Batcher(hold_ticks=4, hold_margin=0.3, hold_cost=1.0)
        b.code2wav_s = setup.pop("code2wav_s", 10.0)
        for e in batch:
            for k, v in setup.items():
                setattr(e, k, v)
        b.entries = batch + ([entry(TalkerWork(None, None, 0, None, None))] if others else [])
        return b._hold(batch, lambda e: True)

    assert held([chunk(5.0)])
    assert held([chunk(5.0), chunk(-1.0)])  # already behind: waiting no longer adds a gap
    assert not held([chunk(5.0), chunk(None)])  # a stream's first two chunks
    assert not held([chunk(5.0), chunk(0.1)])  # runs dry within the margin
    assert not held([chunk(5.0), chunk(5.0, cancelled=True)])
    assert not held([chunk(5.0)], others=False)  # no chunk can join
    assert not held([chunk(5.0)], held=4)  # waited hold_ticks
    assert held([chunk(5.0)], held=1, held_since=time.perf_counter() - 1.0)
    assert not held([chunk(5.0)], held=1, held_since=time.perf_counter() - 1.0, code2wav_s=0.5)


def test_a_streams_first_two_chunks_have_no_deadline(engine, monkeypatch):
    """speech.py gives a stream's first two code2wav chunks no deadline (they never wait: first
    audio, gapless start) and every later one the time its audio so far runs out."""
    speech = dict(talker_max_new_tokens=200, ode_steps=2, solver="euler", chunk_frames=24,
                  max_chunk_frames=48, max_new_tokens=6, ignore_eos=True, max_context=1024)
    deadlines = []
    run = Code2WavWork.run_batch

    def spy(items):
        deadlines.extend(w.deadline for w in items)
        return run(items)

    monkeypatch.setattr(Code2WavWork, "run_batch", spy)
    Batcher(hold_ticks=0).run([engine.session(seed=0, **speech).respond(PROMPTS[0])])
    assert len(deadlines) >= 4
    assert deadlines[:2] == [None, None]
    assert all(isinstance(d, float) for d in deadlines[2:])
    assert deadlines[2:] == sorted(deadlines[2:])


def _live_turn(sess):
    """A Realtime-style turn: 1.5 s of microphone audio (24 kHz, in pieces), committed."""
    pcm = np.random.default_rng(0).standard_normal(36_000).astype(np.float32) * 0.1
    for k in range(0, pcm.size, 4_800):
        sess.append_audio(pcm[k : k + 4_800], 24_000)
    sess.commit_user_turn()
    return sess


@pytest.mark.parametrize("thread", [False, True], ids=["inline", "code2wav_thread"])
def test_server_scheduler_batches_chat_and_live_turns(engine, solo, thread):
    """The server's scheduler drives every real-engine reply through one Batcher: chat replies
    and a live (Realtime) turn share the batched steps; each equals its solo run; a cancelled
    reply ends "cancelled"; every slot comes back."""
    from omnistream.serve.bridge import respond_live
    from omnistream.serve.scheduler import Scheduler

    live_alone = list(respond_live(_live_turn(engine.session(**_options(2)))))

    async def main():
        s = Scheduler(code2wav_thread=thread)
        s.start()
        try:
            makers = [lambda i=i: engine.session(**_options(i)).respond(PROMPTS[i])
                      for i in (0, 1)]
            makers.append(lambda: respond_live(_live_turn(engine.session(**_options(2)))))
            long = dict(_options(0), max_new_tokens=300, ignore_eos=True)  # cancelled early
            makers.append(lambda: engine.session(**long).respond(PROMPTS[3]))
            jobs = [s.stream(m) for m in makers]

            async def collect(job, cancel_after=None):
                out = []
                async for ev in job:
                    out.append(ev)
                    if len(out) == cancel_after:
                        job.cancel()
                return out
            out = await asyncio.gather(*(collect(j, 3 if k == 3 else None)
                                         for k, j in enumerate(jobs)))
            return out, s.batcher
        finally:
            await asyncio.to_thread(s.stop)

    out, batcher = asyncio.run(main())
    for events, alone in zip(out[:3], (solo[0], solo[1], live_alone), strict=True):
        assert events[-1].text_ids == alone[-1].text_ids
        assert events[-1].codec_ids == alone[-1].codec_ids
    assert out[3][-1].finish_reason == "cancelled"
    assert batcher.widest[ThinkerWork] == 4 and batcher.widest[TalkerWork] >= 3
    assert engine.slots.free == engine.slots.slots  # every session gave its slot back


def test_packed_linear_equals_linear_and_packs_only_wide_untied_layers():
    from torch import nn

    from omnistream.engine.packed import PackedLinear, pack_linears_

    torch.manual_seed(0)
    lin = nn.Linear(512, 96)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        for x in (torch.randn(1, 512), torch.randn(5, 1, 512), torch.randn(2, 7, 512)):
            torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(96, 512)
            self.wide, self.narrow = nn.Linear(512, 64), nn.Linear(64, 512)
            self.tied = nn.Linear(512, 96, bias=False)
            self.tied.weight = self.embed.weight
            self.encoder = nn.Sequential(nn.Linear(512, 8))

    m = Model()
    assert pack_linears_(m, exclude=(m.encoder,)) == 0  # 512 x 64 weights: too few to gain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("omnistream.engine.packed.PACK_MIN_NUMEL", 512 * 64)
        assert pack_linears_(m, exclude=(m.encoder,)) == 1
    assert isinstance(m.wide, PackedLinear)
    assert type(m.narrow) is type(m.tied) is type(m.encoder[0]) is nn.Linear


@torch.no_grad()
def test_fused_projections_decode_as_the_separate_ones_and_keep_the_state_dict():
    from omnistream.config import OmniConfig
    from omnistream.nn.thinker import Thinker
    from omnistream.tiny import tiny_config

    torch.manual_seed(0)
    model = Thinker(OmniConfig.from_dict(tiny_config()).thinker_config).eval()
    for p in model.parameters():
        p.normal_(0, 0.05)
    ids = torch.randint(0, 1000, (1, 9))

    def decode() -> torch.Tensor:  # prefill, then 3 one-token steps: logits [4, V]
        cache = model.model.new_cache(1, 32)
        pos, deltas = model.position_ids(ids)
        out = [model(model.embed(ids), pos, cache)[0][:, -1]]
        for t in (5, 17, 3):
            out.append(model.decode_step(torch.tensor([t]), cache, deltas).logits)
        return torch.cat(out)

    want, before = decode(), {k: v.clone() for k, v in model.state_dict().items()}
    layers = len(model.model.layers)
    assert model.model.fuse_projections_(max_numel=0) == 0  # every group over the limit
    assert model.model.fuse_projections_() == 2 * layers  # q/k/v and gate/up of each layer
    attn = model.model.layers[0].self_attn
    fused = attn._qkv.weight
    assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.out_features :].data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    calls = {"parts": 0, "fused": 0}  # the decode must go through the fused matmuls only

    def count(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for part in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            part.register_forward_hook(count("parts"))
        for f in (a._qkv, m._gate_up):
            f.register_forward_hook(count("fused"))
    torch.testing.assert_close(decode(), want, rtol=1e-5, atol=1e-5)
    assert calls == {"parts": 0, "fused": 2 * layers * 4}  # 2 groups x layers x 4 calls


REUSE_PROBE = """
import json, resource, sys, threading
import torch
from omnistream.engine import allocator
torch.set_num_threads(1)
if sys.argv[1] == "engine":  # Engine.load must tune it (a CPU engine), nothing else here does
    from omnistream.engine.session import Engine
    Engine.load(sys.argv[2], audio_output=False, quiet=True)
tuned = allocator.tune_malloc() if sys.argv[1] == "tune" else bool(allocator._tuned)
w, faults = torch.randn(24, 24, 7) * 0.1, []
def work():  # as the server's model thread runs a vocoder: 48 MiB signals made and freed per op
    x0 = torch.randn(8, 24, 1 << 16)
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = x0
        for _ in range(3):
            x = torch.sin(torch.nn.functional.conv1d(x, w, padding=3)) + x
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_tuned_malloc_reuses_freed_memory_in_a_thread(tiny_dir):
    """``Engine.load`` (CPU) tunes glibc's malloc so that large freed blocks are reused, not
    mapped afresh (a page fault per 4 KiB) on their next use, as code2wav's vocoder makes and
    frees them per layer; under glibc's defaults the same passes fault on every use. A CPU
    ``Engine.load`` applies it; a user's own malloc setting turns the tuning off."""
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}

    def probe(mode: str, **extra) -> dict:
        out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode, str(tiny_dir)],
                             env={**env, **extra}, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    pages = (48 << 20) // resource.getpagesize()  # one signal's
    default, tuned = probe("default"), probe("tune")
    assert min(default["faults"]) > 3 * pages  # each op's output is mapped (and zeroed) afresh
    assert tuned["tuned"] and max(tuned["faults"][2:]) < pages // 10  # reused once warm
    loaded = probe("engine")  # as the server: Engine.load, then the model thread
    assert loaded["tuned"] and max(loaded["faults"][2:]) < pages // 10
    assert probe("tune", MALLOC_ARENA_MAX="4")["tuned"] is False
