"""A small engine that follows docs/ENGINE_API.md exactly, and a live-server harness.

The fake makes server tests deterministic where the tiny random checkpoint cannot (a long reply
on demand, a known transcript, a slow step for barge-in); the harness runs uvicorn on a free
127.0.0.1 port in a thread.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from omnistream.engine.events import SAMPLE_RATE, AudioChunk, Done, TextDelta, Usage
from omnistream.engine.sampling import SamplingParams


class FakeEngine:
    """Replies with words (one per step) and a 50 ms tone every ``audio_every`` words."""

    model_id = "fake-omni"

    def __init__(self, step_delay: float = 0.0, audio_every: int = 2):
        self.speakers = ["Chelsie", "Ethan"]
        self.step_delay = step_delay
        self.audio_every = audio_every
        self.sessions = 0
        self.last_sampling: SamplingParams | None = None  # the latest session's

    def session(self, voice=None, system=None, audio_output=True, sampling=None,
                talker_sampling=None, max_new_tokens=256, seed=None, **_):
        if audio_output:
            names = {s.lower(): s for s in self.speakers}
            if voice is not None and voice.lower() not in names:
                raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.speakers)}")
        self.sessions += 1
        self.last_sampling = sampling or SamplingParams()
        return FakeSession(self, voice or self.speakers[0], system, audio_output,
                           self.last_sampling, max_new_tokens)


class FakeSession:
    def __init__(self, engine, voice, system, audio_output, sampling, max_new_tokens):
        self.engine = engine
        self.voice = voice
        self.system = system
        self.audio_output = audio_output
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self._cancel = threading.Event()
        self.live_audio_s = 0.0
        self.live_frames = 0
        self.committed: tuple[float, int, str | None] | None = None
        self.history: list = []

    def cancel(self):
        self._cancel.set()

    def append_audio(self, pcm, sample_rate):
        # the server passes audio at the rate it arrived (the engine resamples)
        assert sample_rate == 24_000 and pcm.dtype == np.float32 and pcm.ndim == 1
        self.live_audio_s += len(pcm) / sample_rate

    def append_video_frame(self, rgb, timestamp_s):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        self.live_frames += 1

    def commit_user_turn(self, text=None):
        self.committed = (self.live_audio_s, self.live_frames, text)
        self.live_audio_s, self.live_frames = 0.0, 0

    def _reply_words(self, messages) -> list[str]:
        if not messages:  # answer the committed live turn
            secs, frames, text = self.committed or (0.0, 0, None)
            self.committed = None
            words = f"I heard {secs:.1f} seconds of audio and {frames} frames.".split()
            if text:
                words += ["You", "wrote:"] + text.split()
            return words
        last = messages[-1]["content"]
        kinds = [p["type"] for p in last]
        text = " ".join(p["text"] for p in last if p["type"] == "text")
        for p in last:
            if p["type"] != "text" and not p[p["type"]]:
                raise ValueError(f"empty {p['type']} part")
        if "LONG" in text:
            return [f"w{i}" for i in range(self.max_new_tokens + 10)]
        media = [k for k in kinds if k != "text"]
        words = ["Hello", "from", self.voice + "."]
        if media:
            words += ["I", "got"] + media
        if text:
            words += ["You", "said:"] + text.split()[:8]
        return words

    def respond(self, messages):
        self._cancel.clear()
        t0 = time.perf_counter()
        words = self._reply_words(messages)
        finish = "stop"
        if len(words) > self.max_new_tokens:
            words, finish = words[: self.max_new_tokens], "length"
        out: list[str] = []
        chunks = 0
        freq = 440.0 if self.voice == "Chelsie" else 220.0
        n = SAMPLE_RATE // 20
        tone = (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE)).astype(np.float32)
        for i, w in enumerate(words):
            if self.engine.step_delay:
                time.sleep(self.engine.step_delay)
            piece = w if i == 0 else " " + w
            out.append(piece)
            yield TextDelta(piece, 1000 + i)
            if self._cancel.is_set():
                finish = "cancelled"
                break
            if self.audio_output and (i + 1) % self.engine.audio_every == 0:
                yield AudioChunk(tone.copy(), chunks)
                chunks += 1
        if self.audio_output and finish != "cancelled":
            yield AudioChunk(tone.copy(), chunks)
            chunks += 1
        yield Done("".join(out), finish, Usage(prompt_tokens=10, completion_tokens=len(out),
                                                audio_codes=chunks * 4),
                   {"total_s": time.perf_counter() - t0})


# ---------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread; ``url`` once ``/ready`` is 200."""

    def __init__(self, app, ready_timeout: float = 120.0):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                ws_max_size=16 * 2**20, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.ready_timeout = ready_timeout

    def __enter__(self):
        import httpx

        self.thread.start()
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
