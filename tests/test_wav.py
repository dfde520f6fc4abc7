"""WAV output: whole files in memory and a file that is valid after every chunk."""

from __future__ import annotations

import io
import wave

import numpy as np

from omnistream.engine.wav import StreamingWavWriter, pcm16, wav_bytes
from omnistream.media.audio import OUTPUT_SAMPLE_RATE


def _read(src) -> tuple[int, bytes]:
    with wave.open(src) as f:
        assert f.getnchannels() == 1 and f.getsampwidth() == 2
        return f.getframerate(), f.readframes(f.getnframes())


def test_wav_bytes_round_trip():
    pcm = np.sin(np.linspace(0, 20, 1000)).astype(np.float32)
    rate, data = _read(io.BytesIO(wav_bytes(pcm)))
    assert rate == OUTPUT_SAMPLE_RATE and data == pcm16(pcm)
    assert _read(io.BytesIO(wav_bytes(pcm[:10], rate=16000)))[0] == 16000


def test_streaming_file_is_valid_after_every_chunk(tmp_path):
    path = tmp_path / "a.wav"
    w = StreamingWavWriter(path)
    assert _read(str(path)) == (OUTPUT_SAMPLE_RATE, b"")  # valid before any audio
    chunks = [np.full(480, 0.5, np.float32), np.linspace(-1, 1, 960).astype(np.float32)]
    for i in range(len(chunks)):
        w.write(chunks[i])
        assert _read(str(path))[1] == b"".join(pcm16(c) for c in chunks[: i + 1])  # mid-reply
    assert w.seconds == 1440 / OUTPUT_SAMPLE_RATE
    w.close()
    w.close()  # idempotent
    assert _read(str(path))[1] == pcm16(np.concatenate(chunks))
