"""Turn detection (``media.vad``): Silero equals the package's own model, streaming is exact, the
Realtime settings are honoured, and on generated audio (Piper and espeak-ng speech in 10-20 dB
white noise; beeps, chords, clicks, silence) Silero finds every sentence and starts no turn on
the rest. The energy detector's figures are printed beside it (``pytest -s``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from omnistream.bench import vad as bench
from omnistream.media import vad
from omnistream.media.audio import resample
from omnistream.media.vad import EnergyDetector, SileroDetector, VADConfig, make_detector

RATE = bench.RATE
needs_silero = pytest.mark.skipif(not vad.silero_available(),
                                  reason="silero-vad is not installed (the vad extra)")


def spoken(texts=bench.SENTENCES[0], engine: str = "piper", speed: float = 1.0,
           snr_db: float | None = 20.0, **kw) -> bench.Clip:
    """A clip of ``texts`` spoken by ``engine``, or a skip naming the missing tool."""
    from omnistream.train.voices import MissingToolError

    try:
        return bench.speech_clip(texts, engine, speed, snr_db, **kw)
    except MissingToolError as e:
        pytest.skip(str(e))


def push_all(det, pcm: np.ndarray, piece: int, rate: int = RATE) -> list[vad.VADEvent]:
    out = []
    for i in range(0, len(pcm), piece):
        out += det.push(pcm[i:i + piece], rate)
    return out


@needs_silero
def test_silero_equals_the_package_model():
    """Our module on the package's weights gives the package's TorchScript model's
    probabilities, window by window, with the state carried across calls."""
    clip = spoken(snr_db=10.0)
    x = resample(clip.pcm, RATE, 16_000)[: 60 * 512]
    threads = torch.get_num_threads()
    try:
        import silero_vad  # its import sets torch's thread count to 1

        ref_model = silero_vad.load_silero_vad()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        ref = np.array([ref_model(torch.from_numpy(x[i:i + 512]), 16_000).item()
                        for i in range(0, len(x), 512)])
    model, state = vad.load_silero(), vad.SileroState()
    ours = np.concatenate([model(torch.from_numpy(x[i:i + 7 * 512].reshape(-1, 512)),
                                 state).numpy() for i in range(0, len(x), 7 * 512)])
    assert ref.max() > 0.9 and ref.min() < 0.1  # speech and silence both in the clip
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@needs_silero
@pytest.mark.parametrize("kind", ["silero", "energy"])
def test_streaming_events_do_not_depend_on_piece_size(kind):
    clip = spoken()
    whole = make_detector(VADConfig(), kind).push(clip.pcm, RATE)
    assert [e.kind for e in whole] == ["speech_started", "speech_stopped"] * 2
    for piece in (240, 2400, 7919):
        assert push_all(make_detector(VADConfig(), kind), clip.pcm, piece) == whole
    # any input rate: the same turns on the input's clock (within a 16 kHz window)
    x16 = resample(clip.pcm, RATE, 16_000)
    at16 = make_detector(VADConfig(), kind).push(x16, 16_000)
    assert [e.kind for e in at16] == [e.kind for e in whole]
    for a, b in zip(at16, whole, strict=True):
        assert abs(a.speech * RATE // 16_000 - b.speech) <= 24 * 32


@needs_silero
def test_settings_are_honoured():
    clip = spoken()
    base = make_detector(VADConfig(), "silero").push(clip.pcm, RATE)
    st, sp = base[0], base[1]
    assert st.sample == st.speech - 300 * RATE // 1000  # prefix padding
    assert sp.sample - sp.speech >= 500 * RATE // 1000  # silence duration
    padded = make_detector(VADConfig(prefix_padding_ms=100, silence_duration_ms=900),
                           "silero").push(clip.pcm, RATE)
    assert padded[0].speech == st.speech and padded[0].sample == st.speech - RATE // 10
    assert 900 <= (padded[1].sample - padded[1].speech) * 1000 / RATE < 940
    assert padded[1].sample > sp.sample
    # a long enough silence_duration joins the two sentences (1.2 s apart) into one turn
    tail = np.zeros(2 * RATE, np.float32)
    joined = make_detector(VADConfig(silence_duration_ms=1500), "silero").push(
        np.concatenate([clip.pcm, tail]), RATE)
    assert [e.kind for e in joined] == ["speech_started", "speech_stopped"]
    # threshold 1.0: nothing is speech
    assert make_detector(VADConfig(threshold=1.0), "silero").push(clip.pcm, RATE) == []
    # the stream's offset: events on the caller's clock
    shifted = SileroDetector(VADConfig(), start=12_345).push(clip.pcm, RATE)
    assert [e.sample - 12_345 for e in shifted] == [e.sample for e in base]
    det = SileroDetector()
    det.push(clip.pcm[:100], RATE)
    with pytest.raises(ValueError, match="24000 Hz"):
        det.push(clip.pcm[:100], 16_000)


def test_auto_falls_back_to_energy(monkeypatch, caplog):
    monkeypatch.setattr(vad, "silero_available", lambda: False)
    vad._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="omnistream.vad"):
        det = make_detector(VADConfig(), "auto")
    assert isinstance(det, EnergyDetector)
    assert "silero-vad is not installed" in caplog.text
    assert "pip install 'omnistream[vad]'" in caplog.text
    with pytest.raises(ValueError, match="unknown turn detector"):
        make_detector(VADConfig(), "webrtc")


@needs_silero
def test_speech_found_and_non_speech_ignored():
    """Every sentence (Piper and espeak-ng, 20 and 10 dB SNR) is one turn, its onset within
    150 ms and its detected end within the silence duration of the truth; no turn on beeps,
    a long tone, chords, clicks, silence or a noise floor. Energy's figures for comparison."""
    cfg = VADConfig()
    speech, missing = bench.speech_clips()
    if missing:
        pytest.skip("; ".join(missing))
    other = bench.non_speech_clips()
    silero = bench.evaluate("silero", speech, other, cfg)
    energy = bench.evaluate("energy", speech, other, cfg)
    print("\n" + bench.table([silero, energy], cfg))
    assert silero.segments == 16 and silero.found == silero.segments
    assert silero.extra_turns == 0 and silero.false_turns == 0, silero.false_clips
    assert max(abs(v) for v in silero.onset_ms) <= 150
    assert max(abs(v) for v in silero.end_ms) <= cfg.silence_duration_ms
    # speech_stopped: the silence duration after the detected end (32 ms windows)
    assert all(cfg.silence_duration_ms <= s - e <= cfg.silence_duration_ms + 32
               for s, e in zip(silero.stop_ms, silero.end_ms, strict=True))
    # what the fallback misses: loud non-speech starts turns, 10 dB noise merges sentences
    assert energy.false_turns > 0 and energy.found < energy.segments
