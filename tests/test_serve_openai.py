"""Chat completions through the official ``openai`` client against a live server (fake engine).

The fake engine makes the transcript and the reply length deterministic; the same protocol runs
on the real engine in ``test_serve_tiny.py``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import wave

import httpx
import numpy as np
import pytest
from serve_fake import FakeEngine, LiveServer

from omnistream.serve.app import create_app
from omnistream.serve.config import ServeConfig

openai = pytest.importorskip("openai")


def wav_b64(seconds: float = 1.0, rate: int = 16_000, freq: float = 300.0) -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(seconds: float = 1.0) -> str:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(4 * seconds)):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server():
    cfg = ServeConfig(max_body_bytes=2 * 2**20, max_concurrent=8, max_tokens=256,
                      max_audio_s=5)
    with LiveServer(create_app(FakeEngine(), cfg)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=30)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["fake-omni"]
    r = httpx.get(server.url + "/ready").json()
    assert r["status"] == "ready" and r["voices"] == ["Chelsie", "Ethan"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_text_non_streaming(client):
    r = client.chat.completions.create(model="fake-omni",
                                       messages=[{"role": "user", "content": "hi there"}])
    assert r.choices[0].message.content == "Hello from Chelsie. You said: hi there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == 10
    assert getattr(r.choices[0].message, "audio", None) is None


def test_audio_in_audio_out_non_streaming(client):
    r = client.chat.completions.create(
        model="fake-omni", modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": wav_b64(), "format": "wav"}},
            {"type": "text", "text": "what is this"}]}])
    msg = r.choices[0].message
    assert msg.audio.transcript == "Hello from Ethan. I got audio You said: what is this"
    with wave.open(io.BytesIO(base64.b64decode(msg.audio.data))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert len(pcm) == 6 * 1200  # 11 words -> 5 chunks + final, 50 ms each
    assert np.abs(pcm).max() > 5000
    assert msg.audio.id and msg.audio.expires_at > time.time()


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus", "pcm16"])
def test_audio_formats(client, fmt):
    r = client.chat.completions.create(
        model="fake-omni", modalities=["text", "audio"], audio={"voice": "chelsie", "format": fmt},
        messages=[{"role": "user", "content": "hi"}])
    data = base64.b64decode(r.choices[0].message.audio.data)
    if fmt == "pcm16":
        assert len(data) == 2 * 4 * 1200  # 6 words: 3 chunks + the final one
        return
    import av

    with av.open(io.BytesIO(data)) as c:
        rate = c.streams.audio[0].rate
        n = sum(f.samples for f in c.decode(audio=0))
    assert n > 0.1 * rate  # ~150 ms of audio survives the codec


def _audio_delta(chunk) -> dict | None:
    """``delta.audio`` as a dict (older SDKs give a dict, newer a typed model)."""
    a = getattr(chunk.choices[0].delta, "audio", None)
    if a is None or isinstance(a, dict):
        return a
    return a.model_dump()


def test_streaming_audio_before_final_text(client):
    stream = client.chat.completions.create(
        model="fake-omni", modalities=["text", "audio"], audio={"voice": "Chelsie",
                                                                "format": "pcm16"},
        messages=[{"role": "user", "content": "LONG please"}], max_tokens=40, stream=True,
        stream_options={"include_usage": True})
    order: list[str] = []
    transcript, pcm, usage, finish = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        audio = _audio_delta(chunk)
        if audio:
            if audio.get("transcript"):
                transcript.append(audio["transcript"])
                order.append("text")
            if audio.get("data"):
                pcm.append(base64.b64decode(audio["data"]))
                order.append("audio")
    assert "".join(transcript) == " ".join(f"w{i}" for i in range(40))
    assert finish == "length"
    assert usage.completion_tokens == 40 and usage.total_tokens == 50
    assert order.index("audio") < len(order) - 1 - order[::-1].index("text")  # interleaved
    assert order[:4] == ["text", "text", "audio", "text"]
    assert sum(len(b) for b in pcm) == 2 * 1200 * 21


def test_streaming_text_only(client):
    chunks = list(client.chat.completions.create(
        model="fake-omni", messages=[{"role": "user", "content": "hey"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from Chelsie. You said: hey"


def test_image_and_video_parts(client):
    r = client.chat.completions.create(model="fake-omni", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "video_url", "video_url": {"url": mp4_data_url()}},
        {"type": "text", "text": "describe"}]}])
    assert r.choices[0].message.content == "Hello from Chelsie. I got image video You said: " \
                                           "describe"


def test_stop_sampling_and_seed(client):
    r = client.chat.completions.create(
        model="fake-omni", messages=[{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "one two three"}],
        stop=["three", "zzz"], temperature=0.7, top_p=0.9, seed=3, max_completion_tokens=50)
    assert r.choices[0].message.content == "Hello from Chelsie. You said: one two "
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- hostile input


def _post(server, body, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=data, headers=h, timeout=30)


def _err(r, status, code=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code, e
    return e


def test_malformed_requests(server, client):
    user = [{"role": "user", "content": "hi"}]
    _err(_post(server, b"{not json"), 400, "invalid_json")
    _err(_post(server, b"[1,2]"), 400)
    _err(_post(server, {"model": "m", "messages": "hi"}), 400, "invalid_type")
    _err(_post(server, {"model": "m", "messages": []}), 400)
    _err(_post(server, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _err(_post(server, {"model": "m", "messages": [{"role": "user", "content": 5}]}), 400)
    _err(_post(server, {"model": "m", "messages": user, "temperature": "hot"}), 400)
    _err(_post(server, {"model": "m", "messages": user, "max_tokens": 10**6}), 400)
    _err(_post(server, {"model": "m", "messages": user, "stream": "yes"}), 400)
    e = _err(_post(server, {"model": "m", "messages": user, "modalities": ["text", "audio"],
                            "audio": {"voice": "Nobody", "format": "wav"}}), 400)
    assert e["param"] == "audio.voice" and "Chelsie" in e["message"]
    _err(_post(server, {"model": "m", "messages": user, "modalities": ["text", "audio"],
                        "audio": {"voice": "Ethan", "format": "aiff"}}), 400)
    _err(_post(server, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "hologram"}]}]}), 400)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}
    _err(_post(server, big), 413)
    for media in ({"type": "input_audio", "input_audio": {"data": "@@not base64!!",
                                                          "format": "wav"}},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}):
        _err(_post(server, {"model": "m", "messages": [{"role": "user", "content": [media]}]}),
             400, "invalid_base64")
    junk = base64.b64encode(np.random.default_rng(0).bytes(5000)).decode()
    for media in ({"type": "input_audio", "input_audio": {"data": junk, "format": "wav"}},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64," + junk}},
                  {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + junk}}):
        _err(_post(server, {"model": "m", "messages": [{"role": "user", "content": [media]}]}),
             400, "invalid_media")
    long_audio = {"type": "input_audio", "input_audio": {"data": wav_b64(6, rate=8000),
                                                         "format": "wav"}}
    _err(_post(server, {"model": "m", "messages": [{"role": "user", "content": [long_audio]}]}),
         400, "media_too_long")
    _err(_post(server, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}), 400,
         "local_path_disabled")
    # pydantic validation: the message and param name the field
    for body, param in (
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": user, "temperature": 3}, "temperature"),
            ({"messages": user, "stop": ["", "a"]}, "stop[0]"),
            ({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
             "messages[0].content[0].type"),
            ({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": ""}}]}]},
             "messages[0].content[0].image_url.url"),
            ({"messages": [{"role": "system", "content": [
                {"type": "image_url", "image_url": "x"}]}, *user]},
             "messages[0].content[0].type"),
            ({"messages": [{"role": "system", "content": "x"}]}, "messages")):
        e = _err(_post(server, body), 400)
        assert e["param"] == param and e["message"].startswith(param + ": "), e
    assert _err(_post(server, b""), 400)["code"] == "missing_required_parameter"
    _err(httpx.get(server.url + "/v1/nothing"), 404)
    _err(httpx.get(server.url + "/v1/chat/completions"), 405)
    # the server is still fine
    r = client.chat.completions.create(model="fake-omni", messages=user)
    assert r.choices[0].message.content.startswith("Hello from Chelsie")


def test_api_key_and_concurrency_limit():
    cfg = ServeConfig(api_key="sekret", max_concurrent=1)
    with LiveServer(create_app(FakeEngine(step_delay=0.02), cfg)) as s:
        r = _post(s, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        _err(r, 401, "invalid_api_key")
        # the API description is open, like /health
        doc = httpx.get(s.url + "/openapi.json").json()
        assert "/v1/chat/completions" in doc["paths"] and "ChatRequest" in str(doc)
        assert "swagger" in httpx.get(s.url + "/docs").text.lower()
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == "fake-omni"
        # one long stream holds the only slot; a second request gets 429
        stream = good.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "LONG"}], max_tokens=200,
            stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            good.chat.completions.create(model="m", messages=[{"role": "user",
                                                               "content": "hi"}])
        stream.close()  # client disconnect: the reply is cancelled and the slot freed
        deadline = time.time() + 5
        while httpx.get(s.url + "/health").json()["active"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json()["active"] == 0
        assert s.server.config.app.state.omni.scheduler.active == 0
        r = good.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content.startswith("Hello")


def test_parallel_streams_no_cross_talk(server):
    results: dict[int, str] = {}

    def one(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        text = []
        for ch in c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"client {i} here"}],
                stream=True):
            if ch.choices and ch.choices[0].delta.content:
                text.append(ch.choices[0].delta.content)
        results[i] = "".join(text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: f"Hello from Chelsie. You said: client {i} here" for i in range(6)}
