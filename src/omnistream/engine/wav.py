"""Progressive audio output: a WAV file that is valid after every chunk, and a live player."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

from omnistream.engine.events import SAMPLE_RATE


def pcm16(pcm: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian PCM16 bytes."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A whole mono PCM16 WAV file in memory."""
    data = pcm16(pcm)
    return _header(len(data), rate) + data


def _header(n_bytes: int, rate: int) -> bytes:
    return (
        b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", n_bytes)
    )


class StreamingWavWriter:
    """Appends PCM chunks to a mono PCM16 WAV, rewriting the two size fields after each chunk so
    that a reader opening the file mid-reply sees every sample written so far."""

    def __init__(self, path: str | Path, rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.rate = rate
        self.n_bytes = 0
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._f.write(_header(0, rate))
        self._f.flush()

    def write(self, pcm: np.ndarray) -> None:
        data = pcm16(np.asarray(pcm, dtype=np.float32))
        self._f.seek(0, 2)
        self._f.write(data)
        self.n_bytes += len(data)
        self._f.seek(4)
        self._f.write(struct.pack("<I", 36 + self.n_bytes))
        self._f.seek(40)
        self._f.write(struct.pack("<I", self.n_bytes))
        self._f.flush()

    @property
    def seconds(self) -> float:
        return self.n_bytes / 2 / self.rate

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class Player:
    """Plays PCM as it arrives through the first player found (aplay, pw-play, ffplay)."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc

    @classmethod
    def open(cls, rate: int = SAMPLE_RATE) -> Player:
        cmds = {
            "aplay": ["aplay", "-q", "-f", "S16_LE", "-c", "1", "-r", str(rate)],
            "pw-play": ["pw-play", "--format", "s16", "--channels", "1", "--rate", str(rate), "-"],
            "ffplay": ["ffplay", "-loglevel", "quiet", "-nodisp", "-autoexit", "-f", "s16le",
                       "-ch_layout", "mono", "-ar", str(rate), "-"],
        }
        for name, cmd in cmds.items():
            if shutil.which(name):
                return cls(subprocess.Popen(cmd, stdin=subprocess.PIPE))
        raise RuntimeError("--play needs an audio player (aplay, pw-play or ffplay); none found")

    def write(self, pcm: np.ndarray) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(pcm16(pcm))
        self._proc.stdin.flush()

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        self._proc.wait()
