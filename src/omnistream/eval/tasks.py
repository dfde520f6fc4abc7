"""The omni-mini task evaluation: fresh cases of every family (``../shared/mini/TASKS.md``),
answered by the streaming engine, scored as the spec says.

    omnistream eval [--model DIR] [--n 50] [--seed S] [--no-recognizer]

Cases come from the task generator (``train/tasks.py``) with seeds from ``EVAL_SEED_BASE``
(1,000,000) up, which training never uses. Each case is one fresh session (``Engine.load``,
``session.respond``, streamed: text and speech as a user gets them). Per family the table gives:

* ``acc``: replies equal to the answer after lower-casing and removing punctuation;
* ``WER``: the recognizer's (``eval/recognizer.py``, an optional extra) word error rate of each
  spoken reply against its own text, over the family's words ("-" without the recognizer);
* ``voice WER``: the same recognizer on the Piper voice (the one omni-mini learned to speak in)
  reading the expected answers: what the recognizer itself gets wrong on this voice and these
  words (number lists, "omnistream"), the floor for ``WER`` ("-" without the data extra);
* ``codec WER`` (``--codec-wer``): the same recordings through the checkpoint's own codec
  (encode, then the streamed decode): the Talker's targets as well as this codec can say them,
  so ``WER`` - ``codec WER`` is the Talker's share and ``codec WER`` - ``voice WER`` the codec's
  on replies the Talker has not learnt by heart (lists, sums); the templated replies it learnt
  from the clearest of several renderings (``train.clear_speech``), so there it may beat this;
* ``TTFA``: time to first audio (median, from the call to ``respond``);
* ``RTF``: real-time factor of the whole reply (median of reply wall time / speech seconds).
"""

from __future__ import annotations

import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnistream.chat import SPEECH_SYSTEM_PROMPT
from omnistream.engine.events import SAMPLE_RATE, AudioChunk, Done

MAX_NEW_TOKENS = 48  # the longest answer (the chat answer) is under 20 tokens
SPEECH_SECONDS = 12.0  # codes per reply at most (the longest answer speaks in about 5 s)


def normalize_answer(text: str) -> str:
    """The spec's comparison form: lower case, punctuation removed, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class Reply:
    """One answered conversation."""

    text: str
    pcm: np.ndarray  # [n] float32 at 24 kHz
    codes: list[int]
    timings: dict[str, float]
    finish_reason: str


def gapless_start(arrivals: list[tuple[float, int]]) -> float | None:
    """The least playback delay (seconds after the question) after which a reply's audio,
    played from then on at 24 kHz, never runs dry: ``max(t_i - n_i / 24000)`` over its chunks,
    chunk i arriving at ``t_i`` with ``n_i`` samples before it. A first chunk far ahead of the
    rest gives an early first audio but no earlier gapless start."""
    return max((t - n / SAMPLE_RATE for t, n in arrivals), default=None)


def respond(engine, messages: list[dict], options) -> Reply:
    """``messages`` answered by a fresh session with ``options`` (``SessionOptions``), streamed;
    ``timings`` are the engine's plus ``wall_s``, the whole reply, and ``gapless_s``
    (``gapless_start``) when there is audio."""
    sess = engine.session(options)
    pcm: list[np.ndarray] = []
    arrivals: list[tuple[float, int]] = []  # (seconds after t0, samples before the chunk)
    n = 0
    done = None
    t0 = time.perf_counter()
    for ev in sess.respond(messages):
        if isinstance(ev, AudioChunk):
            arrivals.append((time.perf_counter() - t0, n))
            pcm.append(ev.pcm)
            n += ev.pcm.size
        elif isinstance(ev, Done):
            done = ev
    wall = time.perf_counter() - t0
    assert done is not None
    audio = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
    timings = {**done.timings, "wall_s": wall}
    if arrivals:
        timings["gapless_s"] = gapless_start(arrivals)
    return Reply(done.text, audio, list(done.codec_ids), timings, done.finish_reason)


def record_messages(rec: dict, base: Path) -> list[dict]:
    """A training/eval record's prompt as engine messages: media paths made absolute, the
    assistant's reply and a speech-prompt system turn dropped (the engine adds that one)."""
    out = []
    for m in rec["messages"][:-1]:
        if m["role"] == "system" and m["content"] == SPEECH_SYSTEM_PROMPT:
            continue
        c = m["content"]
        if isinstance(c, list):
            c = [{**p, p["type"]: str(base / p[p["type"]])} if p.get("type") in
                 ("audio", "image", "video") else p for p in c]
        out.append({"role": m["role"], "content": c})
    return out


@dataclass
class CaseResult:
    family: str
    index: int
    answer: str
    reply: str
    correct: bool
    ttfa_s: float | None
    rtf: float | None
    audio_s: float
    wer_edits: int | None = None  # recognizer: word edits of the speech against the reply
    wer_words: int | None = None  # words of the reply
    heard: str | None = None  # the recognizer's transcript
    voice_edits: int | None = None  # the recognizer on the Piper voice reading the answer
    voice_words: int | None = None
    codec_edits: int | None = None  # the same recording through the checkpoint's codec
    codec_words: int | None = None
    gapless_s: float | None = None  # ``gapless_start``: audio from then on never runs dry
    # the rendering's ground truth (``Case.meta``: an image's size and shapes, a voice and its
    # speed ...), so misses can be studied from ``--json-out`` alone
    truth: dict = field(default_factory=dict)
    levels: list[dict] | None = None  # with ``levels``: each WAV's level, as the dataset records it


def evaluate(model: str | Path, n: int = 50, seed: int | None = None,
             families: list[str] | None = None, recognize: bool | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS, speech_seconds: float = SPEECH_SECONDS,
             solver: str | None = None, dtype: str = "float32", levels: bool = False,
             codec_wer: bool = False,
             progress: Callable[[CaseResult], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``n`` fresh cases per family; returns ``{"cases": [...],
    "recognizer": bool, "recognizer_off": bool (not asked for), "model", "seed", "levels"}``
    (``format_table`` prints it).

    ``recognize``: None = when the recognizer is installed. ``seed`` (default
    ``EVAL_SEED_BASE``) must be at least ``EVAL_SEED_BASE``. ``levels``: the same cases with
    their audio at random microphone levels (``train.tasks.render_case``), a robustness check
    beyond TASKS.md's renderings. ``codec_wer``: also the voice's recordings through the
    checkpoint's codec (needs the recognizer, the data extra and a speech encoder)."""
    from omnistream.engine.options import SessionOptions
    from omnistream.engine.session import Engine
    from omnistream.train.tasks import EVAL_SEED_BASE, FAMILIES, check_families, render_case

    seed = EVAL_SEED_BASE if seed is None else seed
    if seed < EVAL_SEED_BASE:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_BASE} (training uses those "
                         f"below); got {seed}")
    # the training-only families only when asked for by name
    families = list(check_families(FAMILIES if families is None else families))
    rec_mod = None
    if recognize is None or recognize:
        from omnistream.eval import recognizer

        if recognizer.available():
            rec_mod = recognizer
        elif recognize:
            raise recognizer.RecognizerMissing(
                "the recognizer is not installed: pip install 'omnistream[eval]'")
    voice_floor = _voice_floor(rec_mod) if rec_mod is not None else None
    codec_floor = None
    if codec_wer:
        if rec_mod is None or voice_floor is None:
            raise ValueError("codec WER needs the recognizer and the Piper voice: pip install "
                             "'omnistream[eval,data]'")
        codec_floor = _codec_floor(rec_mod, model)
    engine = Engine.load(model, dtype=dtype, quiet=True)
    base = SessionOptions(max_new_tokens=max_new_tokens,
                          talker_max_new_tokens=SessionOptions.speech_limit(speech_seconds),
                          solver=solver)
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="omnistream-eval-") as tmp:
        for f in families:
            for i in range(n):
                case, lv = render_case(seed, f, i, levels)
                paths = []
                for k, m in enumerate(case.media):
                    p = Path(tmp) / f"{f}_{i}_{k}.{m.ext}"
                    p.write_bytes(m.data)
                    paths.append(p.name)
                msgs = record_messages(case.record(paths), Path(tmp))
                opts = base.replace(use_audio_in_video=case.use_audio_in_video, seed=i)
                r = respond(engine, msgs, opts)
                audio_s = r.pcm.size / SAMPLE_RATE
                res = CaseResult(
                    f, i, case.answer, r.text,
                    normalize_answer(r.text) == normalize_answer(case.answer),
                    r.timings.get("ttfa_s"),
                    r.timings["wall_s"] / audio_s if audio_s > 0 else None, audio_s,
                    gapless_s=r.timings.get("gapless_s"), truth=case.meta, levels=lv)
                if rec_mod is not None:
                    heard = rec_mod.transcribe(r.pcm, SAMPLE_RATE) if r.pcm.size else ""
                    res.heard = heard
                    res.wer_edits, res.wer_words = rec_mod.word_errors(r.text, heard)
                if voice_floor is not None:
                    res.voice_edits, res.voice_words = voice_floor(case.answer)
                if codec_floor is not None:
                    res.codec_edits, res.codec_words = codec_floor(case.answer)
                results.append(res)
                if progress is not None:
                    progress(res)
    return {"model": str(model), "seed": seed, "n": n, "recognizer": rec_mod is not None,
            "recognizer_off": recognize is False, "levels": levels, "codec_wer": codec_wer,
            "cases": [asdict(r) for r in results]}


def _target_voice(answer: str) -> np.ndarray:
    """``answer`` read by the Talker's target voice (``voices.piper`` at its length_scale), 24 kHz
    float32 PCM."""
    from omnistream.media.audio import resample
    from omnistream.train.mini_speech import SPEECH_LENGTH_SCALE
    from omnistream.train.voices import piper

    pcm, sr = piper(answer, SPEECH_LENGTH_SCALE)
    return resample(pcm, sr, SAMPLE_RATE)


def _heard_floor(rec_mod, speak: Callable[[str], np.ndarray]) -> Callable[[str], tuple[int, int]]:
    """``answer -> (edits, words)`` of the recognizer on ``speak(answer)`` (24 kHz PCM), once
    per distinct answer."""
    memo: dict[str, tuple[int, int]] = {}

    def floor(answer: str) -> tuple[int, int]:
        if answer not in memo:
            memo[answer] = rec_mod.word_errors(answer, rec_mod.transcribe(speak(answer),
                                                                          SAMPLE_RATE))
        return memo[answer]

    return floor


def _voice_floor(rec_mod) -> Callable[[str], tuple[int, int]] | None:
    """The recognizer on the Talker's target voice reading the answer (``_target_voice``); None
    without the data extra."""
    try:
        import piper  # noqa: F401
    except ImportError:
        return None
    return _heard_floor(rec_mod, _target_voice)


def _codec_floor(rec_mod, model: str | Path) -> Callable[[str], tuple[int, int]]:
    """The recognizer on ``_target_voice(answer)`` after the round trip through ``model``'s
    codec (its speech encoder, then the streamed decode from noise seed 0, the checkpoint's ODE
    settings)."""
    from omnistream.engine.codec import Codec

    codec = Codec.load(model)
    if codec.encoder is None:
        raise ValueError(f"codec WER: {model} has no speech encoder (codec_encoder_config), so "
                         "its codec cannot encode the voice")
    return _heard_floor(rec_mod, lambda answer: codec.decode(
        codec.encode(_target_voice(answer), sample_rate=SAMPLE_RATE), seed=0))


def _rate(cases: list[dict], edits: str, words: str) -> float | None:
    e = [c[edits] for c in cases if c.get(edits) is not None]
    w = sum(c[words] for c in cases if c.get(words) is not None)
    return sum(e) / w if e and w else None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% with the default ``z``) of ``k`` right in ``n``: what an
    accuracy on n cases says about the next ones (50 cases at 98% allow 90-100%)."""
    if n == 0:
        return 0.0, 1.0
    p, q = k / n, z * z / n
    mid, half = (p + q / 2) / (1 + q), z * math.sqrt(p * (1 - p) / n + q / (4 * n)) / (1 + q)
    return max(0.0, mid - half), min(1.0, mid + half)


def summarize(cases: list[dict]) -> dict[str, Any]:
    """Accuracy (and its 95% interval, ``wilson``), WER (and the voice's reference WER), median
    TTFA, gapless start and RTF of some cases."""
    def median(key: str) -> float | None:
        v = [c[key] for c in cases if c.get(key) is not None]
        return statistics.median(v) if v else None

    right = sum(c["correct"] for c in cases)
    return {"n": len(cases), "acc": right / max(len(cases), 1),
            "acc_ci": wilson(right, len(cases)),
            "wer": _rate(cases, "wer_edits", "wer_words"),
            "voice_wer": _rate(cases, "voice_edits", "voice_words"),
            "codec_wer": _rate(cases, "codec_edits", "codec_words"),
            "ttfa_s": median("ttfa_s"), "gapless_s": median("gapless_s"), "rtf": median("rtf")}


def format_table(res: dict[str, Any]) -> str:
    """The per-family table (and the overall row) of ``evaluate``'s result."""
    fams: dict[str, list[dict]] = {}
    for c in res["cases"]:
        fams.setdefault(c["family"], []).append(c)
    codec = bool(res.get("codec_wer"))  # the column only when measured
    head = (f"{'family':<18}{'n':>4}{'acc':>8}{'95% CI':>9}{'WER':>8}{'voice WER':>11}"
            + (f"{'codec WER':>11}" if codec else "") + f"{'TTFA s':>9}{'gapless s':>11}{'RTF':>7}")
    rows = [head, "-" * len(head)]

    def row(name: str, cases: list[dict]) -> str:
        s = summarize(cases)
        wer, vw, cw = (f"{100 * s[k]:.1f}%" if s[k] is not None else "-"
                       for k in ("wer", "voice_wer", "codec_wer"))
        ttfa, gapless, rtf = (f"{s[k]:.2f}" if s[k] is not None else "-"
                              for k in ("ttfa_s", "gapless_s", "rtf"))
        ci = "-".join(f"{100 * v:.0f}" for v in s["acc_ci"])
        return (f"{name:<18}{s['n']:>4}{100 * s['acc']:>7.1f}%{ci:>9}{wer:>8}{vw:>11}"
                + (f"{cw:>11}" if codec else "") + f"{ttfa:>9}{gapless:>11}{rtf:>7}")

    rows += [row(f, cs) for f, cs in fams.items()]
    rows += ["-" * len(head), row("all", res["cases"])]
    note = f"model {res['model']}, seed {res['seed']}, {res['n']} fresh cases per family"
    if res.get("levels"):
        note += ", audio at random microphone levels"
    if res.get("recognizer_off"):
        note += "; WER not measured (--no-recognizer)"
    elif not res["recognizer"]:
        note += "; WER needs the recognizer: pip install 'omnistream[eval]'"
    return "\n".join(rows + [note])
