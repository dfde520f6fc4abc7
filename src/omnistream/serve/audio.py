"""Audio plumbing for the server: PCM16 <-> float, reply encoding, VAD.

Input audio is not resampled here: the engine's live turn takes any rate and resamples exactly."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np

from omnistream.engine.events import SAMPLE_RATE  # 24 kHz, the engine's output rate

INPUT_RATE = 24_000  # Realtime input PCM16 rate (Hz), the protocol default

# format -> (PyAV container, codec, MIME type); wav and pcm16 are written without PyAV
AUDIO_FORMATS = {
    "wav": (None, None, "audio/wav"),
    "pcm16": (None, None, "audio/pcm"),
    "flac": ("flac", "flac", "audio/flac"),
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
}


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    """[n] float32 in [-1, 1] -> little-endian int16 bytes."""
    x = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian int16 bytes -> [n] float32 in [-1, 1] (a trailing odd byte is dropped)."""
    n = len(data) // 2
    return np.frombuffer(data[: 2 * n], dtype="<i2").astype(np.float32) / 32768.0


def encode_audio(pcm: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    """Encode a whole reply ([n] float32) as ``fmt`` (one of ``AUDIO_FORMATS``)."""
    if fmt == "pcm16":
        return float_to_pcm16(pcm)
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(float_to_pcm16(pcm))
        return buf.getvalue()
    container, codec, _ = AUDIO_FORMATS[fmt]
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        samples = np.asarray(pcm, dtype=np.float32)
        if len(samples) == 0:
            samples = np.zeros(rate // 50, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@dataclass
class VADConfig:
    """Server VAD settings, in the Realtime protocol's units."""

    threshold: float = 0.5  # 0..1; mapped to an RMS level in dBFS, see ``rms_threshold``
    prefix_padding_ms: int = 300  # audio kept from before the detected start
    silence_duration_ms: int = 500  # silence that ends a turn
    min_speech_ms: int = 60  # louder-than-threshold audio needed to declare a start

    @property
    def rms_threshold(self) -> float:
        # 0 -> -60 dBFS, 0.5 -> -35 dBFS, 1 -> -10 dBFS
        db = -60.0 + 50.0 * float(np.clip(self.threshold, 0.0, 1.0))
        return float(10 ** (db / 20))


class EnergyVAD:
    """Frame-energy voice activity detector over 24 kHz float PCM (20 ms frames).

    ``feed(pcm)`` returns a list of ("start", ms) / ("stop", ms) events, where ms is the time in the
    input stream (the start already moved back by the prefix padding, clamped at 0).
    """

    FRAME_MS = 20

    def __init__(self, cfg: VADConfig, rate: int = INPUT_RATE):
        self.cfg = cfg
        self.rate = rate
        self.frame = rate * self.FRAME_MS // 1000
        self._rest = np.zeros(0, dtype=np.float32)
        self.samples_seen = 0  # samples consumed into whole frames
        self.speaking = False
        self._loud_ms = 0
        self._quiet_ms = 0

    def feed(self, pcm: np.ndarray) -> list[tuple[str, int]]:
        x = np.concatenate([self._rest, np.asarray(pcm, dtype=np.float32)])
        n = len(x) // self.frame
        self._rest = x[n * self.frame:]
        events: list[tuple[str, int]] = []
        thr = self.cfg.rms_threshold
        for i in range(n):
            f = x[i * self.frame:(i + 1) * self.frame]
            loud = float(np.sqrt(np.mean(f * f))) > thr
            self.samples_seen += self.frame
            now_ms = self.samples_seen * 1000 // self.rate
            if not self.speaking:
                self._loud_ms = self._loud_ms + self.FRAME_MS if loud else 0
                if self._loud_ms >= self.cfg.min_speech_ms:
                    self.speaking = True
                    self._quiet_ms = 0
                    start = now_ms - self._loud_ms - self.cfg.prefix_padding_ms
                    events.append(("start", max(0, start)))
            else:
                self._quiet_ms = 0 if loud else self._quiet_ms + self.FRAME_MS
                if self._quiet_ms >= self.cfg.silence_duration_ms:
                    self.speaking = False
                    self._loud_ms = 0
                    events.append(("stop", now_ms))
        return events
