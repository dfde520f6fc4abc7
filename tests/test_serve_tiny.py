"""The server on the real engine with the tiny random checkpoint: the official client, streamed and
not, audio in and out; the replies equal the engine's own (greedy) output."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import pytest
from serve_fake import LiveServer
from test_serve_openai import _audio_delta, wav_b64

from omnistream.serve.app import create_app
from omnistream.serve.config import ServeConfig

openai = pytest.importorskip("openai")
MAX_TOKENS = 12
SPEECH_S = 1.5  # random weights never end their speech; keep each reply short


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from omnistream.engine.session import Engine

    return Engine.load(tiny_dir, quiet=True)


class Recorder:
    """The engine, remembering the sessions the server makes (to read their prompt ids)."""

    def __init__(self, engine):
        self._engine = engine
        self.sessions: list = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def session(self, *args, **kw):
        sess = self._engine.session(*args, **kw)
        self.sessions.append(sess)
        return sess


@pytest.fixture(scope="module")
def recorder(engine):
    return Recorder(engine)


@pytest.fixture(scope="module")
def server(recorder):
    # the Realtime test here speaks in tones: turns by loudness (spoken turns: further down)
    with LiveServer(create_app(recorder, ServeConfig(max_speech_s=SPEECH_S, vad="energy"))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _engine_reply(engine, text: str, audio: bool):
    from omnistream.engine.events import AudioChunk, Done
    from omnistream.serve.bridge import new_session

    sess = new_session(engine, voice=None, system=None, audio_output=audio,
                       sampling={"temperature": 0.0}, max_new_tokens=MAX_TOKENS, seed=0,
                       max_speech_s=SPEECH_S)
    pcm, done = [], None
    for ev in sess.respond([{"role": "user", "content": [{"type": "text", "text": text}]}]):
        if isinstance(ev, AudioChunk):
            pcm.append(ev.pcm)
        elif isinstance(ev, Done):
            done = ev
    return done, (np.concatenate(pcm) if pcm else np.zeros(0, np.float32))


def test_models(client, engine):
    assert [m.id for m in client.models.list().data] == [engine.model_id]


def test_text_and_speech_match_engine(client, engine):
    done, pcm = _engine_reply(engine, "Say hello.", audio=True)
    r = client.chat.completions.create(
        model=engine.model_id, messages=[{"role": "user", "content": "Say hello."}],
        modalities=["text", "audio"], audio={"voice": engine.speakers[0], "format": "wav"},
        temperature=0, seed=0, max_tokens=MAX_TOKENS)
    msg = r.choices[0].message
    assert msg.audio.transcript == done.text
    assert r.usage.completion_tokens == done.usage.completion_tokens
    with wave.open(io.BytesIO(base64.b64decode(msg.audio.data))) as w:
        assert w.getframerate() == 24_000
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert len(got) == len(pcm) > 0

    stream = client.chat.completions.create(
        model=engine.model_id, messages=[{"role": "user", "content": "Say hello."}],
        modalities=["text", "audio"], audio={"voice": engine.speakers[0], "format": "pcm16"},
        temperature=0, seed=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True})
    text, nbytes = [], 0
    for ch in stream:
        if ch.choices and (a := _audio_delta(ch)):
            text.append(a.get("transcript") or "")
            nbytes += len(base64.b64decode(a.get("data") or ""))
    assert "".join(text) == done.text
    assert nbytes == 2 * len(pcm)


def test_audio_input(client, engine):
    r = client.chat.completions.create(
        model=engine.model_id, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": wav_b64(1.0), "format": "wav"}},
            {"type": "text", "text": "What do you hear?"}]}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 25  # 1 s of audio adds 25 placeholder tokens


def test_realtime_on_engine(server, engine):
    from test_realtime import Client, silence, tone

    c = Client(server.url)
    c.until("session.created")
    c.send("session.update", session={"max_response_output_tokens": 6})
    c.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "Hi"}]})
    c.send("response.create")
    done, events = c.until("response.done", timeout=120)
    assert done["response"]["status"] in ("completed", "incomplete")
    assert any(e["type"] == "response.audio.delta" for e in events)
    # live input: a VAD turn goes through the engine's live turn (block-wise encoding); camera
    # frames during the speech turn it into audio-in-video
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((56, 84, 3), 120, np.uint8)).save(buf, "JPEG")
    frame = base64.b64encode(buf.getvalue()).decode()
    c.send_audio(silence(0.5))
    c.send_audio(tone(0.5))
    for k in range(3):
        c.send("input_video_frame.append", image=frame, timestamp=100.0 + 0.2 * k)
    c.send_audio(tone(0.5))
    c.send_audio(silence(0.8))
    c.until("input_audio_buffer.committed", timeout=60)
    done, _ = c.until("response.done", timeout=120)
    assert done["response"]["status"] in ("completed", "incomplete")
    assert "error" not in [e["type"] for e in _]
    c.close()


def test_realtime_audio_equals_message_audio(server, recorder, engine):
    """24 kHz PCM16 sent over the Realtime socket in 100 ms pieces gets the prompt ids the same
    audio sent as a message gets (the live turn resamples it exactly, once), and response.done
    reports the live turn's counters: the loud end re-encodes the quiet first block."""
    from test_realtime import Client

    from omnistream.serve.bridge import new_session

    rate = 24_000
    # 41 928 samples at 16 kHz = 262 hops + 8 samples: one more mel frame than a resampler that
    # loses its last few samples (the one the server used before) gets, and one audio token more
    t = np.arange(62_892) / rate
    x = 0.02 * np.sin(2 * np.pi * 300 * t)
    x[int(2.2 * rate):] *= 40  # louder after the first 2 s block was handed out
    pcm = (x * 32767).astype("<i2")
    c = Client(server.url)
    c.until("session.created")
    c.send("session.update", session={"turn_detection": None, "modalities": ["text"],
                                      "temperature": 0, "max_response_output_tokens": 4})
    c.until("session.updated")
    for i in range(0, len(pcm), rate // 10):
        c.send("input_audio_buffer.append",
               audio=base64.b64encode(pcm[i:i + rate // 10].tobytes()).decode())
    c.send("input_audio_buffer.commit")
    c.until("input_audio_buffer.committed", timeout=60)
    c.send("response.create")
    done, _ = c.until("response.done", timeout=120)
    c.close()
    live_ids = recorder.sessions[-1].last_prompt_ids

    ref = new_session(engine, voice=None, system=None, audio_output=False,
                      sampling={"temperature": 0.0}, max_new_tokens=4, seed=0)
    ref_done = [ev for ev in ref.respond([{"role": "user", "content": [
        {"type": "audio", "audio": (pcm.astype(np.float32) / 32768, rate)}]}])][-1]
    assert live_ids == ref.last_prompt_ids
    assert engine.cfg.thinker_config.audio_token_index in live_ids
    usage = done["response"]["usage"]
    assert usage["input_tokens"] == ref_done.usage.prompt_tokens == len(live_ids)
    assert done["response"]["output"][0]["content"][0]["text"] == ref_done.text  # greedy
    assert usage["live_input"]["rollbacks"] >= 1
    assert usage["live_input"]["dropped_frames"] == usage["live_input"]["gaps"] == 0
    assert ref_done.usage.live_rollbacks == 0  # audio sent as a message is no live turn


def test_realtime_spoken_turns_on_engine(recorder):
    """Two sentences with a beep between them, Silero deciding the turns: two live turns reach
    the engine (each prompt holds audio), two replies, nothing for the beep."""
    from test_realtime import Client, silence
    from test_vad import spoken

    from omnistream.bench.vad import tone
    from omnistream.media.vad import silero_available

    if not silero_available():
        pytest.skip("silero-vad is not installed (the vad extra)")
    clip = spoken(gap_s=2.0, between=tone(0.5))
    (_, b1), _ = clip.segments
    cut = b1 + 24_000  # between the first sentence's end (+ silence) and the beep
    audio_id = recorder.cfg.thinker_config.audio_token_index
    with LiveServer(create_app(recorder, ServeConfig(max_speech_s=SPEECH_S))) as server:
        c = Client(server.url)
        c.until("session.created")
        c.send("session.update", session={"modalities": ["text"], "temperature": 0,
                                          "max_response_output_tokens": 3})
        c.until("session.updated")
        n0 = len(recorder.sessions)
        events = []
        for part in (clip.pcm[:cut], clip.pcm[cut:]):
            c.send_audio(part)
            done, got = c.until("response.done", timeout=120)
            events += got
            assert done["response"]["status"] in ("completed", "incomplete")
            assert audio_id in recorder.sessions[-1].last_prompt_ids
        c.send_audio(silence(0.5))
        with pytest.raises(TimeoutError):
            c.recv(timeout=1.0)
        c.close()
    kinds = [e["type"] for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == 2
    assert kinds.count("input_audio_buffer.committed") == 2
    assert "error" not in kinds and len(recorder.sessions) == n0 + 1  # one engine session
