"""Audio plumbing for the server: PCM16 <-> float, reply encoding (turn detection:
``omnistream.media.vad``).

Input audio is not resampled here: the engine's live turn takes any rate and resamples exactly."""

from __future__ import annotations

import io
import wave

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
