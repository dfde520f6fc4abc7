"""The clearest rendering of each templated reply: Talker targets chosen by the recognizer.

A Talker trained here learns the replies it hears hundreds of times ("I hear four beeps.", the
chat greeting, "There are three red shapes.") by heart: greedy, it speaks their target codes
exactly, so in those families its speech is only as clear as the codec's round trip of the one
Piper recording it was taught (docs/MINI.md, fifteenth session). Piper reads a sentence a little
differently at each speed, and the recognizer hears some of these renderings better after the
codec than others. For each such reply this step renders it at several ``length_scale`` values
(deterministic: Piper's noise is off), sends each rendering through the checkpoint's codec
(encode, then the streamed decode at ``seeds`` noise seeds) and keeps the rendering with the
fewest recognizer errors; ties keep the one nearest the natural speed. The sums are chosen too
(``ANSWER_FAMILIES``): a Talker hears each of their 187 true answers dozens of times, and
without them a DiT that suits the counting replies speaks the sums worse (forty-sixth session).
This is the filtering by
recognizer error rate that speech-generation corpora use, and the same ranking as the DPO stage
(``dpo_pairs``), applied to the targets instead of to sampled pairs.

The talker files' records whose reply was chosen get the rendering's ``speech``, ``speech_units``
and ``codec_ids``; every other record is copied unchanged::

    python -m omnistream.train.clear_speech DATA_DIR --codec MODEL \
        --files talker_s.jsonl talker_counter_s.jsonl --suffix _c

Scores are cached in ``DATA_DIR/clear_speech.json`` (a rerun only scores new replies).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from omnistream.train.mini_speech import SPEECH_LENGTH_SCALE, codec_encoder, reply_text
from omnistream.train.model import write_lines, write_whole

# families whose replies come from a few templates (the rest: one reply per record)
TEMPLATE_FAMILIES = ("chat", "beeps", "image-count", "image-count-color", "image-color",
                     "image-shape", "spoken-image", "video-motion", "audio-in-video")
# families with one reply per case but few distinct true answers (the 187 sums): chosen from the
# first file's records only, the true answers; the counterfactual file's wrong sums (700 more)
# keep Piper's natural speed, since scoring them too would take hours
ANSWER_FAMILIES = ("arithmetic",)
SCALES = (0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
SEEDS = (0, 1)


def templated_replies(files: list[Path], families: tuple[str, ...] = TEMPLATE_FAMILIES,
                      answer_families: tuple[str, ...] = ANSWER_FAMILIES) -> list[str]:
    """The distinct replies of ``families``' records in ``files`` and of ``answer_families``'
    records in ``files[0]`` (first appearance first)."""
    seen: dict[str, None] = {}
    for i, path in enumerate(files):
        wanted = set(families) | (set(answer_families) if i == 0 else set())
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and (rec := json.loads(line)).get("family") in wanted:
                seen.setdefault(reply_text(rec))
    return list(seen)


def choose(errors: dict[float, int], natural: float = SPEECH_LENGTH_SCALE) -> float:
    """The scale with the fewest errors; ties: nearest ``natural``, then the slower."""
    return min(errors, key=lambda s: (errors[s], round(abs(s - natural), 6), -s))


def score(texts: list[str], codec_dir: str | Path, folder: Path, cache: Path,
          scales: tuple[float, ...] = SCALES, seeds: tuple[int, ...] = SEEDS,
          progress: bool = True) -> dict[str, dict[float, int]]:
    """Recognizer word errors of every rendering of every text after the codec's round trip,
    summed over ``seeds``: ``{text: {scale: errors}}`` (cached in ``cache``, JSON)."""
    from omnistream.engine.codec import Codec
    from omnistream.eval import recognizer
    from omnistream.media.audio import OUTPUT_SAMPLE_RATE, decode_audio
    from omnistream.train.mini_speech import speech_file

    if not recognizer.available():
        raise recognizer.RecognizerMissing(
            "choosing renderings needs the recognizer: pip install 'omnistream[eval]'")
    done: dict = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{Path(codec_dir).resolve()}|{list(seeds)}"
    table = done.setdefault(key, {})
    todo = [t for t in texts if any(str(s) not in table.get(t, {}) for s in scales)]
    codec = Codec.load(codec_dir) if todo else None
    it = todo
    if progress:
        from tqdm import tqdm

        it = tqdm(todo, desc="rendering replies", unit="reply")
    for text in it:
        row = table.setdefault(text, {})
        for s in scales:
            if str(s) in row:
                continue
            pcm, sr = decode_audio(str(speech_file(text, folder, s)))
            codes = codec.encode(pcm, sample_rate=sr)
            row[str(s)] = sum(
                recognizer.word_errors(text, recognizer.transcribe(codec.decode(codes, seed=k),
                                                                   OUTPUT_SAMPLE_RATE))[0]
                for k in seeds)
        write_whole(cache, lambda p: p.write_text(json.dumps(done, indent=1)))
    return {t: {float(s): e for s, e in table[t].items()} for t in texts}


def retarget(files: list[Path], suffix: str, choices: dict[str, float],
             encode: Callable[[np.ndarray, int], list[int]],
             speech_dir: str = "speech_c") -> dict[str, int]:
    """Each file ``F.jsonl`` -> ``F{suffix}.jsonl``: records whose reply is in ``choices`` speak
    its chosen rendering (``speech``, ``speech_units``, ``codec_ids`` from ``encode``: pcm,
    sample rate -> codes, ``mini_speech.codec_encoder``); returns records changed per output
    file."""
    from omnistream.train.mini_speech import speech_fields, speech_file

    cache: dict = {}
    changed = {}
    for path in files:
        lines, n = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            text = reply_text(rec)
            if text in choices:
                s = choices[text]
                wav = speech_file(text, path.parent / speech_dir, s)
                rec["speech"] = f"{speech_dir}/{wav.name}"
                rec.update(speech_fields(text, wav, encode, cache, s))
                n += 1
            lines.append(json.dumps(rec, ensure_ascii=False))
        out = path.with_name(path.stem + suffix + path.suffix)
        write_lines(out, lines)
        changed[out.name] = n
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnistream.train.clear_speech",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("data", help="the folder of the talker files")
    ap.add_argument("--codec", required=True, help="checkpoint whose codec encodes and decodes")
    ap.add_argument("--files", nargs="+", required=True, help="talker JSONL files in DATA")
    ap.add_argument("--suffix", default="_c", help="output file name suffix")
    ap.add_argument("--families", default=",".join(TEMPLATE_FAMILIES))
    ap.add_argument("--answer-families", default=",".join(ANSWER_FAMILIES),
                    help="families whose replies are chosen from the first file only")
    ap.add_argument("--scales", default=",".join(map(str, SCALES)))
    a = ap.parse_args(argv)
    data = Path(a.data)
    files = [data / f for f in a.files]
    texts = templated_replies(files, tuple(a.families.split(",")),
                              tuple(f for f in a.answer_families.split(",") if f))
    # the natural speed is always a candidate: what the records speak now
    scales = tuple(sorted({SPEECH_LENGTH_SCALE, *(float(s) for s in a.scales.split(","))}))
    table = score(texts, a.codec, data / "speech_c", data / "clear_speech.json", scales)
    # replies kept at the natural speed keep their records as they are
    choices = {t: s for t, errs in table.items() if (s := choose(errs)) != SPEECH_LENGTH_SCALE}
    before = sum(errs[SPEECH_LENGTH_SCALE] for errs in table.values())
    after = sum(errs[choices.get(t, SPEECH_LENGTH_SCALE)] for t, errs in table.items())
    print(json.dumps({"replies": len(texts), "errors_natural": before, "errors_chosen": after,
                      "changed": retarget(files, a.suffix, choices, codec_encoder(a.codec))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
