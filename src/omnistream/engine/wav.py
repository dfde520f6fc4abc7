"""Progressive audio output: a WAV file that is valid after every chunk, and a live player."""

from __future__ import annotations

import io
import threading
import wave
from collections import deque
from pathlib import Path

import numpy as np

from omnistream.media.audio import OUTPUT_SAMPLE_RATE


def pcm16(pcm: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian PCM16 bytes."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(pcm: np.ndarray, rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """A whole mono PCM16 WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        _setup(w, rate)
        w.writeframes(pcm16(pcm))
    return buf.getvalue()


def _setup(w: wave.Wave_write, rate: int) -> None:
    w.setnchannels(1)
    w.setsampwidth(2)  # PCM16
    w.setframerate(rate)


class StreamingWavWriter:
    """Appends PCM chunks to a mono PCM16 WAV that is valid after every chunk: ``wave`` patches
    the header's two size fields after each ``writeframes`` and the file is flushed, so a reader
    opening it mid-reply sees every sample written so far."""

    def __init__(self, path: str | Path, rate: int = OUTPUT_SAMPLE_RATE):
        self.path = Path(path)
        self.rate = rate
        self.n_bytes = 0
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._w = wave.open(self._f, "wb")  # a file object: closing ``_w`` leaves ``_f`` open
        _setup(self._w, rate)
        self._w.writeframes(b"")  # the header (0 frames): a valid empty file from the start
        self._f.flush()

    def write(self, pcm: np.ndarray) -> None:
        data = pcm16(np.asarray(pcm, dtype=np.float32))
        self._w.writeframes(data)
        self.n_bytes += len(data)
        self._f.flush()

    @property
    def seconds(self) -> float:
        return self.n_bytes / 2 / self.rate

    def close(self) -> None:
        if not self._f.closed:
            self._w.close()
            self._f.close()


class AudioDeviceError(RuntimeError):
    """Live playback is impossible here; the message says why and what to install."""


class Player:
    """Plays PCM on the default output device as it arrives (``sounddevice``, i.e. PortAudio).

    ``write`` never blocks: chunks are queued and a PortAudio callback plays them, so generation
    runs on at its own pace; ``close`` waits until everything written has been played."""

    def __init__(self, sd, rate: int = OUTPUT_SAMPLE_RATE):
        self._queue: deque[np.ndarray] = deque()  # float32 chunks not yet (fully) played
        self._lock = threading.Lock()
        self._closing = False
        self._drained = threading.Event()
        self._stop = sd.CallbackStop
        self._rate = rate
        self._stream = sd.OutputStream(samplerate=rate, channels=1, dtype="float32",
                                       callback=self._callback,
                                       finished_callback=self._drained.set)
        self._stream.start()

    @classmethod
    def open(cls, rate: int = OUTPUT_SAMPLE_RATE) -> Player:
        """A started player, or ``AudioDeviceError`` (sounddevice or PortAudio missing, no
        output device) before anything is played or written."""
        try:
            import sounddevice as sd
        except ImportError as e:
            raise AudioDeviceError(
                f"playing audio needs the sounddevice package ({e}): "
                "pip install 'omnistream[audio]'") from e
        except OSError as e:  # sounddevice is there but the PortAudio library is not
            raise AudioDeviceError(
                f"playing audio needs the PortAudio library ({e}): install it "
                "(e.g. apt-get install libportaudio2)") from e
        try:
            sd.check_output_settings(samplerate=rate, channels=1, dtype="float32")
            return cls(sd, rate)
        except Exception as e:  # noqa: BLE001 - PortAudioError / ValueError: no usable device
            raise AudioDeviceError(
                f"no audio output device to play on ({type(e).__name__}: {e}); "
                "drop --play (the reply is still written to --out)") from e

    def _callback(self, out: np.ndarray, frames: int, _time, _status) -> None:
        n = 0
        with self._lock:
            while n < frames and self._queue:
                head = self._queue[0]
                k = min(frames - n, head.size)
                out[n:n + k, 0] = head[:k]
                n += k
                if k == head.size:
                    self._queue.popleft()
                else:
                    self._queue[0] = head[k:]
            done = self._closing and not self._queue
        out[n:, 0] = 0.0  # an underrun plays silence until more arrives
        if done:
            raise self._stop

    def write(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._queue.append(np.asarray(pcm, dtype=np.float32).reshape(-1).copy())

    def clear(self) -> None:
        """Drop what is queued and not yet played (the user spoke over the reply)."""
        with self._lock:
            self._queue.clear()

    @property
    def queued_s(self) -> float:
        """Seconds written and not yet played."""
        with self._lock:
            return sum(c.size for c in self._queue) / self._rate

    def close(self) -> None:
        """Play what is queued, then release the device."""
        with self._lock:
            self._closing = True
            queued_s = sum(c.size for c in self._queue) / self._rate
        self._drained.wait(queued_s + 5.0)  # bounded: a stalled device does not hang the CLI
        self._stream.close()
