"""Server parts without a socket: scheduler fairness and cancel, VAD, stop strings."""

from __future__ import annotations

import asyncio

import numpy as np

from omnistream.engine.events import Done, TextDelta
from omnistream.media.vad import EnergyDetector, VADConfig
from omnistream.serve.openai import StopMatcher
from omnistream.serve.scheduler import Scheduler


def _gen(tag: str, n: int, log: list, cancelled: dict):
    for i in range(n):
        log.append(tag)
        yield TextDelta(f"{tag}{i}", i)
        if cancelled.get(tag):
            yield Done("", "cancelled")
            return
    yield Done(tag, "stop")


def test_scheduler_round_robin_and_cancel():
    async def main():
        s = Scheduler()
        log: list[str] = []
        cancelled: dict = {}
        jobs = {t: s.stream(lambda t=t: _gen(t, 5, log, cancelled),
                            lambda t=t: cancelled.__setitem__(t, True)) for t in "abc"}
        s.start()
        try:
            out = {}
            for t, job in jobs.items():
                evs = [ev async for ev in job]
                out[t] = evs
            assert all(evs[-1].finish_reason == "stop" and len(evs) == 6
                       for evs in out.values())
            assert log[:6] == ["a", "b", "c", "a", "b", "c"]  # one step each per round
            # cancel mid-reply: the engine's cancel is called, the reply ends with "cancelled"
            job = s.stream(lambda: _gen("d", 1000, log, cancelled),
                           lambda: cancelled.__setitem__("d", True))
            first = await job.__anext__()
            job.cancel()
            rest = [ev async for ev in job]
            assert isinstance(first, TextDelta) and rest[-1].finish_reason == "cancelled"
            assert log.count("d") < 100  # bounded run-ahead (max_buffered), not 1000 steps
            # cancel before the first step: the generator never runs
            job = s.stream(lambda: _gen("e", 5, log, cancelled), None)
            job.cancel()
            evs = [ev async for ev in job]
            assert [type(e) for e in evs] == [Done] and "e" not in log
            # an engine that ignores its cancel is closed after cancel_drain_steps more steps
            job = s.stream(lambda: _gen("f", 1000, log, {}), lambda: None)
            await job.__anext__()
            job.cancel()
            rest = [ev async for ev in job]
            assert rest[-1].finish_reason == "cancelled" and rest[-1].text == ""
            assert log.count("f") <= 1 + s.max_buffered + s.cancel_drain_steps + 1
            # an exception reaches the consumer; the model thread survives
            job = s.stream(lambda: (_ for _ in ()).throw(ValueError("bad media")), None)
            try:
                [ev async for ev in job]
                raise AssertionError("no error")
            except ValueError as e:
                assert "bad media" in str(e)
            assert await s.acall(lambda: 41 + 1) == 42
        finally:
            s.stop()

    asyncio.run(main())


def test_energy_vad():
    rate = 24_000
    loud = 0.3 * np.sin(np.arange(rate) * 2 * np.pi * 200 / rate).astype(np.float32)
    x = np.concatenate([np.zeros(rate, np.float32), loud, np.zeros(rate, np.float32)])
    vad = EnergyDetector(VADConfig())
    events = []
    for i in range(0, len(x), 2400):
        events += vad.push(x[i:i + 2400], rate)
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
    assert events[0].ms(rate) == 1000 - 300 and events[0].speech == rate  # padding applied
    assert events[1].ms(rate) == 2500 and events[1].speech == 2 * rate
    quiet = EnergyDetector(VADConfig(threshold=0.95))
    assert quiet.push(x, rate) == []


def test_stop_matcher_holds_partial_matches():
    m = StopMatcher(["END"])
    out = [m.feed(t) for t in ["hello E", "N", "D more"]]
    assert out == ["hello ", "", ""] and m.hit
    m = StopMatcher(["END"])
    assert m.feed("hello E") + m.feed("ast") + m.flush() == "hello East" and not m.hit


def test_failed_warmup_stops_the_server(capsys):
    """A warm-up that fails keeps the server from starting, with the cause named."""
    import pytest
    from fastapi.testclient import TestClient
    from serve_fake import FakeEngine, free_port

    from omnistream.serve.app import WarmupError, create_app, serve_app

    class Broken(FakeEngine):
        def session(self, **kw):
            raise RuntimeError("CUDA out of memory (test)")

    with pytest.raises(WarmupError, match="CUDA out of memory"):
        with TestClient(create_app(Broken())):
            pass
    assert serve_app(create_app(Broken()), "127.0.0.1", free_port(), "critical") == 1
    err = capsys.readouterr().err
    assert "did not start" in err and "warm-up failed: RuntimeError: CUDA out of memory" in err
