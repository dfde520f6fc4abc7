"""``WS /v1/realtime`` with a WebSocket client: manual turns, server VAD, barge-in, errors."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from serve_fake import FakeEngine, LiveServer

from omnistream.serve.app import create_app
from omnistream.serve.config import ServeConfig

ws_client = pytest.importorskip("websockets.sync.client")
RATE = 24_000


def pcm16_b64(pcm: np.ndarray) -> str:
    return base64.b64encode((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def tone(seconds: float, amp: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


class Client:
    def __init__(self, url: str, **kw):
        self._cm = ws_client.connect(url.replace("http", "ws") + "/v1/realtime",
                                     open_timeout=10, max_size=2**24, **kw)
        self.ws = self._cm.__enter__()
        self.seen: list[dict] = []

    def send(self, type_: str, **fields):
        self.ws.send(json.dumps({"type": type_, **fields}))

    def send_audio(self, pcm: np.ndarray, block_s: float = 0.1):
        n = int(block_s * RATE)
        for i in range(0, len(pcm), n):
            self.send("input_audio_buffer.append", audio=pcm16_b64(pcm[i:i + n]))

    def recv(self, timeout: float = 10.0) -> dict:
        ev = json.loads(self.ws.recv(timeout=timeout))
        self.seen.append(ev)
        return ev

    def until(self, type_: str, timeout: float = 15.0) -> tuple[dict, list[dict]]:
        """Events up to and including the first of ``type_``."""
        got = []
        deadline = time.time() + timeout
        while True:
            ev = self.recv(max(0.01, deadline - time.time()))
            got.append(ev)
            if ev["type"] == type_:
                return ev, got

    def close(self):
        self._cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def server():
    # tones stand in for speech here, so this server decides turns by loudness; the spoken
    # tests below use the default detector (Silero)
    engine = FakeEngine(step_delay=0.01)
    with LiveServer(create_app(engine, ServeConfig(vad="energy"))) as s:
        s.engine = engine
        yield s


def _reply(events: list[dict]) -> tuple[str, int]:
    text = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
    n = sum(len(base64.b64decode(e["delta"])) // 2 for e in events
            if e["type"] == "response.audio.delta")
    return text, n


def test_manual_turn(server):
    c = Client(server.url)
    created = c.recv()
    assert created["type"] == "session.created"
    assert created["session"]["turn_detection"]["silence_duration_ms"] == 500
    # greedy until the client says otherwise, as chat completions answer (OpenAI's default: 0.8)
    assert created["session"]["temperature"] == 0.0
    c.send("session.update", session={"turn_detection": None, "voice": "Ethan"})
    assert c.until("session.updated")[0]["session"]["turn_detection"] is None
    c.send_audio(tone(1.0))
    c.send("input_audio_buffer.commit")
    committed, _ = c.until("input_audio_buffer.committed")
    c.send("response.create")
    done, events = c.until("response.done")
    types = [e["type"] for e in events]
    assert types.index("response.created") < types.index("response.audio.delta")
    assert done["response"]["status"] == "completed"
    text, samples = _reply(events)
    assert text == "I heard 1.0 seconds of audio and 0 frames."
    assert samples == 5 * 1200  # 9 words: 4 chunks + the final one, 50 ms each
    assert done["response"]["output"][0]["content"][0]["transcript"] == text
    assert done["response"]["usage"]["output_tokens"] == 9
    assert server.engine.last_sampling.greedy
    c.close()


def test_server_vad_turn_and_video_frame(server):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(buf, "JPEG")
    frame = base64.b64encode(buf.getvalue()).decode()
    c = Client(server.url)
    c.until("session.created")
    c.send_audio(silence(1.0))
    c.send_audio(tone(0.5))
    c.send("input_video_frame.append", image=frame)
    c.send_audio(tone(0.5))
    c.send_audio(silence(1.0))
    started, _ = c.until("input_audio_buffer.speech_started")
    assert 600 <= started["audio_start_ms"] <= 760  # 1000 ms - 300 ms padding (+ detection)
    stopped, _ = c.until("input_audio_buffer.speech_stopped")
    assert 2450 <= stopped["audio_end_ms"] <= 2600  # 2000 ms + 500 ms silence
    c.until("input_audio_buffer.committed")
    done, events = c.until("response.done")
    text, samples = _reply(events)
    # 300 ms padding + 1 s speech + 500 ms silence, give or take the detector's 20 ms frames
    secs = float(text.split()[2])
    assert 1.7 <= secs <= 1.9 and text.endswith("and 1 frames."), text
    assert samples > 0 and done["response"]["status"] == "completed"
    c.close()


def test_barge_in_cancels_reply(server):
    c = Client(server.url)
    c.until("session.created")
    c.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "LONG"}]})
    c.send("response.create", response={"max_response_output_tokens": 300})
    _, first = c.until("response.audio.delta")
    c.send_audio(tone(0.4))  # the user talks over the reply
    _, events = c.until("response.done")
    events = first + events
    done = events[-1]
    assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    text, _ = _reply(events)
    assert 0 < len(text.split()) < 300
    c.send_audio(silence(0.8))  # end of the user's turn: a fresh reply answers it
    done, events = c.until("response.done")
    assert done["response"]["status"] == "completed"
    assert _reply(events)[0].startswith("I heard 0.")
    c.send("response.cancel")
    assert c.until("error")[0]["error"]["code"] == "response_cancel_not_active"
    c.close()


def test_client_temperature_reaches_the_session(server):
    c = Client(server.url)
    c.until("session.created")
    c.send("session.update", session={"temperature": 0.7})
    assert c.until("session.updated")[0]["session"]["temperature"] == 0.7
    c.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "hi"}]})
    c.send("response.create")
    c.until("response.done")
    assert server.engine.last_sampling.temperature == 0.7
    c.close()
    with pytest.raises(ValueError, match="realtime_temperature"):
        ServeConfig(realtime_temperature=-0.5)


def test_client_cancel_and_bad_events(server):
    c = Client(server.url)
    c.until("session.created")
    c.ws.send("{nope")
    assert c.until("error")[0]["error"]["code"] == "invalid_json"
    c.send("no.such.event")
    assert c.until("error")[0]["error"]["code"] == "unknown_event"
    c.send("input_audio_buffer.append", audio="!!!")
    assert c.until("error")[0]["error"]["code"] == "invalid_base64"
    c.send("input_audio_buffer.append", audio=12)
    assert c.until("error")[0]["error"]["code"] == "invalid_type"
    c.send("session.update", session={"voice": "Nobody"})
    assert c.until("error")[0]["error"]["param"] == "session.voice"
    for bad in ("hot", True, -0.1, 2.5):
        c.send("session.update", session={"temperature": bad})
        assert c.until("error")[0]["error"]["param"] == "session.temperature"
    c.send("session.update", session={"turn_detection": None})
    c.until("session.updated")
    c.send("input_audio_buffer.commit")
    assert c.until("error")[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    c.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "LONG"}]})
    c.send("response.create")
    c.until("response.audio_transcript.delta")
    c.send("response.create")
    assert c.until("error")[0]["error"]["code"] == "conversation_already_has_active_response"
    c.send("response.cancel")
    done, _ = c.until("response.done")
    assert done["response"]["status"] == "cancelled"
    c.send("conversation.item.create", item={"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "hi"}]})
    c.send("response.create")
    done, events = c.until("response.done")
    assert done["response"]["status"] == "completed"
    assert _reply(events)[0] == "Hello from Chelsie. You said: hi"
    c.close()


def test_realtime_auth_and_slots():
    from websockets.exceptions import InvalidStatus

    with LiveServer(create_app(FakeEngine(), ServeConfig(api_key="k", max_concurrent=1))) as s:
        with pytest.raises(InvalidStatus) as e:
            Client(s.url)
        assert e.value.response.status_code == 401
        assert json.loads(e.value.response.body)["error"]["code"] == "invalid_api_key"
        c = Client(s.url, additional_headers={"Authorization": "Bearer k"})
        c.until("session.created")
        with pytest.raises(InvalidStatus) as e:
            Client(s.url, subprotocols=["realtime", "openai-insecure-api-key.k"])
        assert e.value.response.status_code == 429
        c.close()
        time.sleep(0.3)
        c = Client(s.url, subprotocols=["realtime", "openai-insecure-api-key.k"])
        c.until("session.created")
        c.close()


# -- spoken turns, Silero deciding (the default detector) -------------------------------------


@pytest.fixture(scope="module")
def silero_server():
    from omnistream.media.vad import silero_available

    if not silero_available():
        pytest.skip("silero-vad is not installed (the vad extra)")
    # slow enough (0.15 s a word) for the user to speak over a reply
    with LiveServer(create_app(FakeEngine(step_delay=0.15), ServeConfig())) as s:
        yield s


def _turn_events(events: list[dict]) -> list[str]:
    return [e["type"] for e in events if e["type"] in (
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed", "response.done")]


def test_two_spoken_turns_around_a_beep(silero_server):
    """Sentence, a 1 kHz beep in the 2 s gap, sentence: exactly two turns, each answered; the
    reply hears the turn's audio (300 ms padding + speech + the 500 ms silence, about)."""
    from test_vad import spoken

    from omnistream.bench.vad import tone

    clip = spoken(gap_s=2.0, between=tone(0.5))
    (a1, b1), _ = clip.segments
    cut = b1 + RATE  # after the first turn's end (+ silence), before the beep
    c = Client(silero_server.url)
    c.until("session.created")
    c.send_audio(clip.pcm[:cut])
    done1, ev1 = c.until("response.done")
    c.send_audio(clip.pcm[cut:])
    done2, ev2 = c.until("response.done")
    c.send_audio(silence(0.5))
    with pytest.raises(TimeoutError):
        c.recv(timeout=1.0)  # nothing more: the beep started no turn
    turns = _turn_events(ev1 + ev2)
    assert turns == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "response.done"] * 2, turns
    starts = [e for e in ev1 + ev2 if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e for e in ev1 + ev2 if e["type"] == "input_audio_buffer.speech_stopped"]
    for st, sp, (a, b), done in zip(starts, stops, clip.segments, (done1, done2), strict=True):
        assert done["response"]["status"] == "completed"
        onset_ms = st["audio_start_ms"] + 300 - a * 1000 / RATE
        assert abs(onset_ms) <= 150, onset_ms
        assert 500 <= sp["audio_end_ms"] - b * 1000 / RATE <= 500 + 250
        heard = float(_reply(_events_of(done, ev1 + ev2))[0].split()[2])
        want = (sp["audio_end_ms"] - st["audio_start_ms"]) / 1000
        assert abs(heard - want) <= 0.1, (heard, want)
    c.close()


def _events_of(done: dict, events: list[dict]) -> list[dict]:
    """The events of the response ``done`` ends."""
    rid = done["response"]["id"]
    return [e for e in events if e.get("response_id") == rid]


def test_speaking_over_a_reply_cancels_it(silero_server):
    from test_vad import spoken

    clip = spoken()
    (a1, b1), (a2, b2) = clip.segments
    c = Client(silero_server.url)
    c.until("session.created")
    c.send_audio(clip.pcm[:b1 + RATE * 7 // 10])  # the first sentence and 700 ms of silence
    _, first = c.until("response.audio.delta")  # the reply is playing ...
    c.send_audio(clip.pcm[a2 - RATE // 2:])  # ... when the user speaks again
    done, events = c.until("response.done")
    events = first + events
    assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert len(_reply(events)[0].split()) < 9  # cut short
    done, events = c.until("response.done")  # the second sentence is answered in full
    assert done["response"]["status"] == "completed"
    assert _reply(events)[0].startswith("I heard ")
    c.close()


def test_turn_detection_settings(silero_server):
    c = Client(silero_server.url)
    c.until("session.created")
    for bad, param in (({"type": "semantic_vad"}, "type"), ({"threshold": 2}, "threshold"),
                       ({"silence_duration_ms": -1}, "silence_duration_ms"),
                       ({"prefix_padding_ms": "300"}, "prefix_padding_ms")):
        c.send("session.update", session={"turn_detection": bad})
        err = c.until("error")[0]["error"]
        assert err["param"] == f"session.turn_detection.{param}", err
    from test_vad import spoken

    clip = spoken()
    c.send("session.update", session={"turn_detection": {
        "type": "server_vad", "prefix_padding_ms": 100, "silence_duration_ms": 900}})
    td = c.until("session.updated")[0]["session"]["turn_detection"]
    assert td["silence_duration_ms"] == 900 and td["threshold"] == 0.5
    (a1, b1), _ = clip.segments
    c.send_audio(clip.pcm[:b1 + RATE * 3 // 2])
    st, _ = c.until("input_audio_buffer.speech_started")
    sp, _ = c.until("input_audio_buffer.speech_stopped")
    assert abs(st["audio_start_ms"] + 100 - a1 * 1000 / RATE) <= 150
    assert 900 <= sp["audio_end_ms"] - b1 * 1000 / RATE <= 900 + 250
    c.until("response.done")
    c.send("session.update", session={"turn_detection": None})  # the client commits turns
    c.until("session.updated")
    c.send_audio(clip.pcm)
    c.send("input_audio_buffer.commit")
    _, events = c.until("input_audio_buffer.committed")
    assert "input_audio_buffer.speech_started" not in [e["type"] for e in events]
    c.close()
