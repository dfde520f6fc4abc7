"""The web page in Debian's chromium (Playwright): a fake microphone from a WAV file talks to the
server, the page plays the streamed reply and shows the transcript. Screenshot in artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from serve_fake import FakeEngine, LiveServer

from omnistream.serve.app import create_app
from omnistream.serve.config import ServeConfig

CHROMIUM = os.environ.get("OMNISTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")


def write_mic_wav(path: Path, voiced: np.ndarray, rate: int, tail_s: float = 2.6,
                  lead_s: float = 0.6) -> None:
    """``lead_s`` quiet, ``voiced`` (float at ``rate``), ``tail_s`` quiet: Chrome loops the file
    from the moment the page opens the microphone, not from when the page starts listening."""
    pcm = np.concatenate([np.zeros(int(lead_s * rate)), voiced, np.zeros(int(tail_s * rate))])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())


def speech_like_wav(path: Path, rate: int = 48_000) -> str:
    """A sentence (the Piper voice) as the fake microphone; the server's turn detector for it:
    the default (Silero). Without Piper: 1.2 s of loud modulated tones, with turns decided by
    loudness."""
    from omnistream.media.audio import resample
    from omnistream.train.voices import MissingToolError, Voice, speak

    try:
        speech, sr = speak("The weather today is sunny and warm", Voice("piper", 1.0))
        voiced, vad = 0.8 * resample(speech, sr, rate) / np.abs(speech).max(), "auto"
    except MissingToolError:
        t = np.arange(int(1.2 * rate)) / rate
        voiced = 0.5 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        vad = "energy"
    write_mic_wav(path, voiced, rate)
    return vad


class Browser:
    """Debian's chromium with a fake camera and ``wav`` as the microphone."""

    def __init__(self, p, wav: Path):
        self.browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}"])

    def __enter__(self):
        return self.browser

    def __exit__(self, *exc):
        self.browser.close()


def test_page_talks_and_plays(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    wav = tmp_path / "mic.wav"
    vad = speech_like_wav(wav)
    ARTIFACTS.mkdir(exist_ok=True)
    with LiveServer(create_app(FakeEngine(step_delay=0.01), ServeConfig(vad=vad))) as server, \
            sync_api.sync_playwright() as p, Browser(p, wav) as browser:
        page = browser.new_page(viewport={"width": 900, "height": 640})
        logs: list[str] = []
        page.on("console", lambda m: logs.append(m.text))
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#voice option').length == 2")
        page.select_option("#voice", "Ethan")
        page.check("#camera")
        page.click("#start")
        page.wait_for_function(
            "omni.replies >= 1 && omni.chunks >= 3 && omni.ended >= 1 && omni.text.length",
            timeout=45_000)
        page.wait_for_timeout(300)  # let the last chunk finish playing
        page.screenshot(path=str(ARTIFACTS / "browser_realtime.png"))
        st = page.evaluate("omni")
        text = page.inner_text(".assistant")
    assert st["blocksSent"] > 10 and st["framesSent"] >= 1, (st, logs)
    assert st["events"].get("input_audio_buffer.speech_started", 0) >= 1
    assert text.startswith("I heard ") and "seconds of audio" in text, text
    assert st["samples"] >= 3 * 1200 and st["firstAudioMs"] is not None


def test_page_asks_omni_mini_a_spoken_question(tmp_path):
    """The shipped model through the page: a spoken arithmetic question (the Piper voice) into
    the fake microphone; the reply's text is the right answer and its audio says it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from omnistream.engine.session import Engine
    from omnistream.media.audio import resample
    from omnistream.models import default_model_candidates
    from omnistream.train.voices import Voice, speak

    model = next((d for d in default_model_candidates() if d.name == "omni-mini"), None)
    if model is None or not (model / "config.json").is_file():
        pytest.skip("no models/omni-mini in this checkout")
    rate = 48_000
    speech, sr = speak("What is three plus four?", Voice("piper", 1.0))
    wav = tmp_path / "question.wav"
    # A long quiet tail: the looping file must not ask again while the reply plays. A long quiet
    # lead: the file plays from when the page opens the microphone, and whatever plays before the
    # page's worklet listens is lost; on a busy CI machine that once took over 0.6 s and the
    # model heard "...ee plus four" ("Seven plus four is eight.").
    write_mic_wav(wav, 0.8 * resample(speech, sr, rate) / np.abs(speech).max(), rate, 12.0, 3.0)
    engine = Engine.load(model, quiet=True)
    with LiveServer(create_app(engine, ServeConfig())) as server, \
            sync_api.sync_playwright() as p, Browser(p, wav) as browser:
        page = browser.new_page(viewport={"width": 900, "height": 640})
        starts: list[int] = []  # audio_start_ms of each turn the server detected
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: starts.append(
            json.loads(f)["audio_start_ms"]) if isinstance(f, str) and
            '"input_audio_buffer.speech_started"' in f else None))
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#voice option').length >= 1")
        page.click("#start")
        page.wait_for_function("omni.lastReply.status !== null", timeout=90_000)
        page.screenshot(path=str(ARTIFACTS / "browser_omni_mini.png"))
        reply = page.evaluate("({text: omni.lastReply.text, status: omni.lastReply.status, "
                              "audio: omni.lastReply.audio.flatMap(a => Array.from(a))})")
    assert reply["status"] == "completed", reply["status"]
    # the turn began after quiet (300 ms of prefix padding before the speech): the whole
    # question reached the server, not its tail
    assert starts and starts[0] > 0, (starts, reply["text"])
    # The target. The session is greedy by default (ServeConfig.realtime_temperature):
    # at OpenAI's 0.8 the page once sampled "Seven plus four is eight." on CI, and here 3 of 4
    # runs on the same microphone bytes were wrong. Greedy, the engine hears this question right
    # with any lead-in up to 0.5 s at any sub-frame offset, and sums it right with the server's
    # turn bounds.
    assert reply["text"] == "Three plus four is seven.", reply["text"]
    audio = np.asarray(reply["audio"], dtype=np.float32)
    assert audio.size >= 24_000, audio.size  # at least 1 s of speech at 24 kHz
    from omnistream.eval import recognizer

    if recognizer.available():
        heard = recognizer.transcribe(audio, 24_000)
        print("the page's spoken reply, heard:", heard)
        # The target: the answer back as audio. omni-mini v5 and v6 are heard exactly
        # ("3 plus 4 is 7."; v4: "4 plus 4 is 7."); random weights give about 1.0.
        assert recognizer.wer([reply["text"]], [heard]) <= 0.2, heard
