"""Talker DPO preference pairs from sampled speech (the paper's stability stage).

For each prompt the trained model answers ``samples`` times through the streaming engine (greedy
text, so every sample speaks the same reply; the Talker samples with the release's settings, one
seed per sample) and code2wav turns the codes into speech. Each sample is scored::

    score = WER(recognizer transcript, reply text) + PAUSE_WEIGHT * pause errors

Pause errors compare the sample's silences with the reply spoken by the Piper voice at
length_scale 1.0 (the Talker's training target): one per internal pause (silence of at least
``MIN_PAUSE_S``) more or fewer than the reference has, plus each second of leading, trailing or
internal silence beyond the reference's longest pause plus ``SLACK_S``, plus one when the speech
is more than 1.5x longer or shorter than the reference. The best sample is ``chosen``, the worst
``rejected``; prompts whose samples score within ``MIN_GAP`` of each other give no pair, nor do
those whose samples all spoke the same codes (samples with equal codes count as one, by their
mean score).

Records (JSONL, ``omnistream.train.data``'s DPO format): the prompt, the reply the model wrote,
``chosen_codec_ids``, ``rejected_codec_ids`` and the scores. Progress is appended prompt by prompt
to ``OUT.progress.jsonl`` (a rerun skips the prompts done there); ``OUT`` is written at the end::

    python -m omnistream.train.dpo_pairs --model STAGE_DIR --data talker.jsonl \
        --out dpo.jsonl [--prompts 44] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnistream.engine.events import SAMPLE_RATE

PAUSE_WEIGHT = 0.25  # one pause error costs as much as a quarter of the words wrong
MIN_PAUSE_S = 0.25  # internal silence counted as a pause
SLACK_S = 0.3  # silence allowed beyond the reference's longest pause
MIN_GAP = 0.1  # pairs need at least this score difference
FRAME_S = 0.02  # silence analysis frames
SILENCE_DB = -40.0  # frames this far below the loudest frame are silence


@dataclass
class PauseProfile:
    """Where a clip is silent: leading / trailing silence, internal pauses, speech span."""

    lead_s: float
    trail_s: float
    pauses: list[float]  # internal silences of at least MIN_PAUSE_S
    speech_s: float  # from the first to the last non-silent frame


def pause_profile(pcm: np.ndarray, sr: int) -> PauseProfile:
    """The silences of mono ``pcm`` (frames more than 40 dB under the loudest are silence)."""
    n = max(1, int(FRAME_S * sr))
    x = np.asarray(pcm, np.float64).reshape(-1)
    frames = x[: len(x) // n * n].reshape(-1, n)
    if frames.size == 0:
        return PauseProfile(0.0, 0.0, [], 0.0)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    voiced = db > db.max() + SILENCE_DB
    idx = np.flatnonzero(voiced)
    if idx.size == 0:
        return PauseProfile(len(frames) * FRAME_S, 0.0, [], 0.0)
    first, last = int(idx[0]), int(idx[-1])
    pauses, run = [], 0
    for v in voiced[first : last + 1]:
        if v:
            if run * FRAME_S >= MIN_PAUSE_S:
                pauses.append(run * FRAME_S)
            run = 0
        else:
            run += 1
    return PauseProfile(first * FRAME_S, (len(frames) - 1 - last) * FRAME_S, pauses,
                        (last - first + 1) * FRAME_S)


def pause_errors(sample: PauseProfile, ref: PauseProfile) -> float:
    """Pause errors of ``sample`` against the reference speech ``ref`` (module docstring)."""
    allowed = max([*ref.pauses, 0.0]) + SLACK_S
    err = float(abs(len(sample.pauses) - len(ref.pauses)))
    for s in (sample.lead_s, sample.trail_s, *sample.pauses):
        err += max(0.0, s - allowed)
    if sample.speech_s <= 0 or ref.speech_s <= 0:
        return err + 1.0
    if abs(math.log(sample.speech_s / ref.speech_s)) > math.log(1.5):
        err += 1.0
    return err


def rank(scores: list[float], codes: list[list[int]] | None = None) -> tuple[int, int] | None:
    """(best, worst) sample indices, or None when they are within ``MIN_GAP``.

    Samples that spoke the same ``codes`` are one candidate, scored by their mean: their scores
    differ only by code2wav's noise, which the Talker cannot learn from (a pair of equal codes
    has the DPO loss log 2 and no gradient). A trained Talker often samples the same codes
    every time (the third run: 7 of 9 pairs)."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(scores)):
        groups.setdefault(tuple(codes[i]) if codes is not None else (i,), []).append(i)
    mean = {k: sum(scores[i] for i in v) / len(v) for k, v in groups.items()}
    best, worst = min(mean, key=mean.__getitem__), max(mean, key=mean.__getitem__)
    if best == worst or mean[worst] - mean[best] < MIN_GAP:
        return None
    return groups[best][0], groups[worst][0]


def _pick(records: list[dict], n: int) -> list[int]:
    """``n`` record indices taking the families in turn (each family in file order)."""
    by_fam: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_fam.setdefault(str(r.get("family", "")), []).append(i)
    out: list[int] = []
    queues = [list(v) for v in by_fam.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def make_pairs(model: str | Path, data: str | Path, out: str | Path, prompts: int = 44,
               samples: int = 4, seed: int = 0, recognize: bool = True,
               solver: str | None = None, log=print) -> int:
    """Preference pairs for up to ``prompts`` records of ``data``, written to ``out`` (same
    folder as ``data``: media paths stay relative to it); returns the number of pairs."""
    from omnistream.engine.options import SessionOptions
    from omnistream.engine.sampling import TALKER_SAMPLING
    from omnistream.engine.session import Engine
    from omnistream.eval.tasks import SPEECH_SECONDS, record_messages, respond
    from omnistream.media.audio import decode_audio
    from omnistream.train.mini_speech import speech_file
    from omnistream.train.model import write_whole

    data, out = Path(data), Path(out)
    if out.parent.resolve() != data.parent.resolve():
        raise ValueError("write the pairs beside the data (their media paths are relative)")
    rec_mod = None
    if recognize:
        from omnistream.eval import recognizer

        if not recognizer.available():
            raise recognizer.RecognizerMissing(
                "ranking by WER needs the recognizer: pip install 'omnistream[eval]' "
                "(or --no-recognizer: pause errors only)")
        rec_mod = recognizer
    records = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines() if x.strip()]
    progress = out.with_name(out.stem + ".progress.jsonl")
    rows = []
    if progress.exists():
        rows = [json.loads(x) for x in progress.read_text(encoding="utf-8").splitlines()
                if x.strip()]
    done = {r["source"] for r in rows}
    engine = Engine.load(model, quiet=True)
    # the release's Talker sampling, whatever the checkpoint speaks with: samples must differ
    base = SessionOptions(max_new_tokens=48, solver=solver, talker_sampling=TALKER_SAMPLING,
                          talker_max_new_tokens=SessionOptions.speech_limit(SPEECH_SECONDS))
    with progress.open("a", encoding="utf-8") as f:
        for idx in _pick(records, prompts):
            if idx in done:
                continue
            rec = records[idx]
            msgs = record_messages(rec, data.parent)
            aiv = bool(rec.get("use_audio_in_video", False))
            replies = [respond(engine, msgs, base.replace(use_audio_in_video=aiv,
                                                          seed=seed * 100_003 + idx * 97 + k))
                       for k in range(samples)]
            text = replies[0].text.strip()
            if not text or any(not r.codes for r in replies):
                f.write(json.dumps({"source": idx, "skipped": "empty reply or speech"}) + "\n")
                f.flush()
                continue
            try:  # the reply in the Piper voice: the Talker's target speech for this text
                ref = pause_profile(*decode_audio(str(speech_file(text, data.parent / "speech"))))
            except ValueError as e:  # MediaError too: Piper spoke nothing (e.g. symbols only)
                f.write(json.dumps({"source": idx, "skipped": f"no reference speech: {e}"}) + "\n")
                f.flush()
                continue
            scores, parts = [], []
            for r in replies:
                w = 0.0
                if rec_mod is not None:
                    w = rec_mod.wer([text], [rec_mod.transcribe(r.pcm, SAMPLE_RATE)])
                p = pause_errors(pause_profile(r.pcm, SAMPLE_RATE), ref)
                scores.append(w + PAUSE_WEIGHT * p)
                parts.append({"wer": round(w, 3), "pause_errors": round(p, 2)})
            pick = rank(scores, [r.codes for r in replies])
            row: dict = {"source": idx, "scores": parts}
            if pick is None:
                row["skipped"] = "samples score alike"
            else:
                best, worst = pick
                row |= {"messages": [*rec["messages"][:-1],
                                     {"role": "assistant", "content": text}],
                        "chosen_codec_ids": replies[best].codes,
                        "rejected_codec_ids": replies[worst].codes,
                        "family": rec.get("family")}
                if aiv:
                    row["use_audio_in_video"] = True
            rows.append(row)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            log(json.dumps({"prompt": idx, "family": rec.get("family"), "reply": text,
                            "scores": [round(s, 3) for s in scores],
                            "pair": pick is not None}))
    pairs = [r for r in rows if "chosen_codec_ids" in r]
    write_whole(out, lambda p: p.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8"))
    return len(pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnistream.train.dpo_pairs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the trained model (after the Talker stage)")
    ap.add_argument("--data", required=True, help="records (JSONL) whose prompts are used")
    ap.add_argument("--out", required=True, help="pairs JSONL, beside --data")
    ap.add_argument("--prompts", type=int, default=44)
    ap.add_argument("--samples", type=int, default=4, help="sampled replies per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", default=None, choices=["rk4", "euler"],
                    help="code2wav ODE solver (default: the checkpoint's)")
    ap.add_argument("--no-recognizer", action="store_true", help="rank by pause errors only")
    a = ap.parse_args(argv)
    n = make_pairs(a.model, a.data, a.out, a.prompts, a.samples, a.seed,
                   recognize=not a.no_recognizer, solver=a.solver)
    print(f"{n} preference pairs -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
