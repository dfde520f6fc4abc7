"""``omnistream chat --mic``: talk to a session through the microphone, hear it on the speaker.

Turns are decided by the Realtime socket's detector (``media.vad``: Silero, or loudness without
``silero-vad``). While the user speaks, the microphone's PCM goes to the session's live turn as it
arrives (from the prefix padding before the detected start), so the end of speech leaves only the
last block to encode; ``speech_stopped`` commits the turn and a worker thread streams the reply:
text to the terminal, speech to the speaker (``engine.wav.Player``) and to ``turnNNN.wav``.
Speaking while a reply is generated or played cancels it (barge-in: ``Session.cancel()`` and the
unplayed speech dropped). The microphone also hears the speaker: use headphones, or
``--no-barge-in`` (the microphone is ignored while a reply plays).

Engine calls never overlap: audio that arrives during a reply waits until the reply has ended
(or been cancelled) before it reaches the session, as on the socket.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path
from typing import TextIO

import numpy as np

from omnistream.engine.events import AudioChunk, Done, TextDelta
from omnistream.engine.wav import AudioDeviceError, StreamingWavWriter
from omnistream.media.audio import SAMPLE_RATE
from omnistream.media.vad import TurnDetector

BLOCK_S = 0.05  # microphone block (s)
HIST_S = 2.0  # input kept while nobody speaks (for the prefix padding)


def open_microphone(rate: int = SAMPLE_RATE) -> tuple[object, int]:
    """(the ``sounddevice`` module, the input rate to use): ``rate`` when the default input
    device takes it, else the device's own rate. ``AudioDeviceError`` names what is missing."""
    try:
        import sounddevice as sd
    except ImportError as e:
        raise AudioDeviceError(f"talking needs the sounddevice package ({e}): "
                               "pip install 'omnistream[audio]'") from e
    except OSError as e:  # sounddevice is there but the PortAudio library is not
        raise AudioDeviceError(f"talking needs the PortAudio library ({e}): install it "
                               "(e.g. apt-get install libportaudio2)") from e
    try:
        sd.check_input_settings(samplerate=rate, channels=1, dtype="float32")
        return sd, rate
    except Exception as first:  # noqa: BLE001 - PortAudioError / ValueError
        try:  # the device exists but not at this rate: its own rate (the session resamples)
            own = int(sd.query_devices(kind="input")["default_samplerate"])
            sd.check_input_settings(samplerate=own, channels=1, dtype="float32")
            return sd, own
        except Exception:  # noqa: BLE001
            raise AudioDeviceError(
                f"no microphone (audio input device) to listen to ({type(first).__name__}: "
                f"{first}); chat without --mic to type instead") from first


class MicChat:
    """One spoken conversation: ``feed`` microphone blocks in order (``run`` reads them from a
    ``sounddevice`` input stream); replies stream on a worker thread."""

    def __init__(self, sess, detector: TurnDetector, rate: int, player=None,
                 out_dir: str | Path | None = None, barge_in: bool = True,
                 out: TextIO | None = None, err: TextIO | None = None):
        self.sess = sess
        self.det = detector
        self.rate = int(rate)
        self.player = player
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.barge_in = barge_in
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.hist = np.zeros(0, dtype=np.float32)  # recent input
        self.hist_start = 0  # stream offset of hist[0]
        self.fwd = 0  # stream offset up to which input went to the turn
        self.pending: list[np.ndarray] = []  # turn audio waiting for the reply to end
        self.turn_samples = 0  # audio in the open turn
        self.to_commit: list[int] = []  # closed turns not yet committed (their sample counts)
        self.worker: threading.Thread | None = None
        self.turns = 0  # replies started
        self.interrupted = 0  # replies cut short by barge-in
        self.replies: list[str] = []  # every reply's text, in order

    # -- input ----------------------------------------------------------------------------------
    def replying(self) -> bool:
        """A reply is being generated or its speech is still playing."""
        busy = self.worker is not None and self.worker.is_alive()
        return busy or (self.player is not None and self.player.queued_s > 0)

    def feed(self, pcm: np.ndarray) -> None:
        """One block of microphone PCM (mono float32 at ``rate``)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        end = self.hist_start + len(self.hist) + len(pcm)
        self.hist = np.concatenate([self.hist, pcm])
        heard = pcm if self.barge_in or not self.replying() else np.zeros_like(pcm)
        for ev in self.det.push(heard, self.rate):
            if ev.kind == "speech_started":
                if self.replying():
                    self._interrupt()
                self.fwd = max(ev.sample, self.hist_start)
            else:
                self._forward_to(ev.sample)
                self.to_commit.append(self.turn_samples)
                self.turn_samples = 0
        if self.det.speaking:
            self._forward_to(end)
        keep = max(end - int(HIST_S * self.rate), self.hist_start)
        self.hist = self.hist[keep - self.hist_start:]
        self.hist_start = keep
        if not self.det.speaking:
            self.fwd = max(self.fwd, self.hist_start)
        self.pump()

    def _forward_to(self, pos: int) -> None:
        a = max(self.fwd, self.hist_start) - self.hist_start
        b = pos - self.hist_start
        if b > a:
            self.pending.append(self.hist[a:b].copy())
            self.turn_samples += b - a
        self.fwd = max(self.fwd, pos)

    def _interrupt(self) -> None:
        self.sess.cancel()
        if self.player is not None:
            self.player.clear()
        self.interrupted += 1
        print("\n[interrupted]", file=self.err, flush=True)

    def pump(self) -> None:
        """Hand waiting audio to the session and answer a closed turn, unless a reply runs."""
        if self.worker is not None and self.worker.is_alive():
            return
        for x in self.pending:
            self.sess.append_audio(x, self.rate)
        self.pending = []
        if self.to_commit:
            n = self.to_commit.pop(0)
            self.sess.commit_user_turn()
            print(f"you: (spoke {n / self.rate:.1f} s)", file=self.err, flush=True)
            self.worker = threading.Thread(target=self._reply, args=(self.turns,), daemon=True)
            self.turns += 1
            self.worker.start()

    # -- the reply (worker thread) --------------------------------------------------------------
    def _reply(self, turn: int) -> None:
        writer = None
        if self.out_dir is not None and getattr(self.sess, "audio_output", True):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            writer = StreamingWavWriter(self.out_dir / f"turn{turn:03d}.wav")
        text: list[str] = []
        try:
            for ev in self.sess.respond([]):
                if isinstance(ev, TextDelta):
                    text.append(ev.text)
                    print(ev.text, end="", file=self.out, flush=True)
                elif isinstance(ev, AudioChunk):
                    if self.player is not None:
                        self.player.write(ev.pcm)
                    if writer is not None:
                        writer.write(ev.pcm)
                elif isinstance(ev, Done):
                    print(file=self.out, flush=True)
        except Exception as e:  # noqa: BLE001 - one line; the conversation goes on
            print(f"\nerror: {type(e).__name__}: {e}", file=self.err, flush=True)
        finally:
            self.replies.append("".join(text))
            if writer is not None:
                writer.close()

    def finish(self) -> None:
        """Answer what is left, then wait for the last reply (and its speech)."""
        while True:
            if self.worker is not None:
                self.worker.join()
            if not self.to_commit:
                return
            self.pump()

    def stop(self) -> None:
        """Cancel the reply and wait for it to end (Ctrl-C)."""
        self.sess.cancel()
        if self.player is not None:
            self.player.clear()
        if self.worker is not None:
            self.worker.join()

    # -- the microphone -------------------------------------------------------------------------
    def run(self, sd) -> int:
        """Listen on the default input device until Ctrl-C (or the stream ends)."""
        blocks: queue.Queue[np.ndarray] = queue.Queue()

        def callback(indata, frames, _time, _status):
            blocks.put(np.array(indata[:, 0], dtype=np.float32))

        stream = sd.InputStream(samplerate=self.rate, channels=1, dtype="float32",
                                blocksize=int(self.rate * BLOCK_S), callback=callback)
        stream.start()
        try:
            while True:
                try:
                    self.feed(blocks.get(timeout=0.1))
                except queue.Empty:
                    self.pump()
                    if not stream.active and blocks.empty():
                        break
            self.finish()
        except KeyboardInterrupt:
            self.stop()
        finally:
            stream.close()
        return 0
