"""``omnistream chat --mic`` with a fake ``sounddevice`` (a microphone that plays generated speech,
a speaker that records): turns by the shared detector, replies played, barge-in cancels."""

from __future__ import annotations

import io
import sys
import threading
import time
import wave

import numpy as np
import pytest
from serve_fake import FakeEngine
from test_vad import spoken

from omnistream.cli import main
from omnistream.media.audio import resample
from omnistream.media.vad import VADConfig, make_detector, silero_available
from omnistream.mic import MicChat

needs_silero = pytest.mark.skipif(not silero_available(),
                                  reason="silero-vad is not installed (the vad extra)")


class FakeSoundDevice:
    """The parts of ``sounddevice`` that ``chat --mic`` uses. The input stream delivers ``mic``
    in blocks (as fast as it is read) and then stops; the output stream records what it plays."""

    class PortAudioError(Exception):
        pass

    class CallbackStop(Exception):  # noqa: N818 - sounddevice's name
        pass

    def __init__(self, mic: np.ndarray | None = None, mic_rate: int = 16_000,
                 inputs: bool = True, outputs: bool = True):
        self.mic = mic
        self.mic_rate = mic_rate
        self.inputs, self.outputs = inputs, outputs
        self.played: list[np.ndarray] = []
        self.closed: list[str] = []

    def check_input_settings(self, samplerate, channels, dtype):
        if not self.inputs:
            raise self.PortAudioError("Error querying device -1")
        if samplerate != self.mic_rate:
            raise self.PortAudioError("Invalid sample rate")

    def query_devices(self, kind=None):
        if not self.inputs:
            raise self.PortAudioError("Error querying device -1")
        return {"default_samplerate": float(self.mic_rate)}

    def check_output_settings(self, **kw):
        if not self.outputs:
            raise self.PortAudioError("Error querying device -1")

    def InputStream(self, samplerate, channels, dtype, blocksize, callback):  # noqa: N802
        fake = self

        class Stream:
            active = False

            def start(self):
                self.active = True

                def run():
                    for i in range(0, len(fake.mic), blocksize):
                        block = fake.mic[i:i + blocksize, None].astype(np.float32)
                        callback(block, len(block), None, None)
                    self.active = False

                threading.Thread(target=run, daemon=True).start()

            def close(self):
                fake.closed.append("input")

        return Stream()

    def OutputStream(self, samplerate, channels, dtype, callback, finished_callback):  # noqa: N802
        fake = self

        class Stream:
            def start(self):
                def run():
                    while True:
                        buf = np.zeros((480, channels), np.float32)
                        try:
                            callback(buf, 480, None, None)
                        except fake.CallbackStop:
                            fake.played.append(buf[:, 0].copy())
                            break
                        fake.played.append(buf[:, 0].copy())
                        time.sleep(0.005)  # 20 ms of audio every 5 ms: four times real time
                    finished_callback()

                threading.Thread(target=run, daemon=True).start()

            def close(self):
                fake.closed.append("output")

        return Stream()


def test_mic_needs_sounddevice_and_a_microphone(tiny_dir, monkeypatch, capsys):
    """Both fail at once, with the cause and the fix, before the model loads."""
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails
    assert main(["chat", "--mic", "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'omnistream[audio]'" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(inputs=False))
    assert main(["chat", "--mic", "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "no microphone" in err and "Error querying device -1" in err
    assert "chat without --mic" in err
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(outputs=False))
    assert main(["chat", "--mic", "--model", str(tiny_dir)]) == 2
    assert "add --no-audio" in capsys.readouterr().err


class FakePlayer:
    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.cleared = 0

    def write(self, pcm):
        self.chunks.append(pcm)

    def clear(self):
        self.cleared += 1

    queued_s = 0.0  # plays at once


def _feed(chat: MicChat, pcm: np.ndarray, block: int = 1200) -> None:
    for i in range(0, len(pcm), block):
        chat.feed(pcm[i:i + block])


@needs_silero
@pytest.mark.parametrize("barge_in", [True, False])
def test_spoken_turns_and_barge_in(barge_in):
    """Sentence, 700 ms of silence: a turn, answered; the second sentence starts while the
    reply plays: it cancels the reply and is answered in its turn (or, with barge-in off, the
    microphone is not listened to during the reply)."""
    clip = spoken()
    (_, b1), (a2, b2) = clip.segments
    sess = FakeEngine(step_delay=0.2, audio_every=1).session()
    player, out, err = FakePlayer(), io.StringIO(), io.StringIO()
    chat = MicChat(sess, make_detector(VADConfig(), "silero"), 24_000, player=player,
                   barge_in=barge_in, out=out, err=err)
    _feed(chat, clip.pcm[:b1 + 24_000 * 7 // 10])
    assert chat.turns == 1 and chat.replying()
    deadline = time.time() + 10
    while not player.chunks and time.time() < deadline:  # the reply is playing ...
        time.sleep(0.01)
    _feed(chat, clip.pcm[b1 + 24_000 * 7 // 10:])  # ... when the second sentence starts
    chat.finish()
    if not barge_in:
        assert chat.turns == 1 and chat.interrupted == 0 and player.cleared == 0
        assert len(chat.replies) == 1 and len(chat.replies[0].split()) == 9, chat.replies
        return
    assert chat.turns == 2 and chat.interrupted == 1 and player.cleared == 1
    first, second = chat.replies
    assert len(first.split()) < 9  # cut short
    assert second.startswith("I heard ") and second.endswith("frames.")
    heard = float(second.split()[2])  # 300 ms padding + the sentence + 500 ms (+ detection)
    assert abs(heard - ((b2 - a2) / 24_000 + 0.8)) < 0.4, (heard, second)
    assert "[interrupted]" in err.getvalue() and err.getvalue().count("you: (spoke") == 2


@needs_silero
def test_chat_mic_cli(tiny_dir, tmp_path, monkeypatch, capsys):
    """The command on the tiny engine: one spoken sentence through a 16 kHz microphone, the
    reply played on the speaker and written to turn000.wav."""
    clip = spoken(texts=("Please turn off the lights in the kitchen",))
    fake = FakeSoundDevice(mic=resample(clip.pcm, 24_000, 16_000))
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    out = tmp_path / "audio"
    rc = main(["chat", "--mic", "--model", str(tiny_dir), "--out-dir", str(out), "--seed", "0",
               "--max-new-tokens", "3", "--talker-max-new-tokens", "30"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "silero detector, input 16000 Hz" in err and err.count("you: (spoke") == 1
    with wave.open(str(out / "turn000.wav")) as w:
        n = w.getnframes()
        wav = np.frombuffer(w.readframes(n), "<i2")
    played = np.concatenate(fake.played)
    assert n > 0 and np.count_nonzero(played) > 0
    assert abs(np.count_nonzero(np.round(played * 32767)) - np.count_nonzero(wav)) <= 1
    assert fake.closed == ["input", "output"]
