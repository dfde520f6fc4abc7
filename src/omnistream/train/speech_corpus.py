"""A speech corpus for the codec: seeded sentences read by the shipped voice, cached on disk.

``DIR/clips/NNNNNN.wav`` (24 kHz mono 16-bit) and ``DIR/corpus.jsonl`` with one record per clip
(``{"audio": "clips/000000.wav", "text": ..., "voice": ..., "speed": ...}``). Making it again with
the same arguments reuses the finished clips (the manifest is written last).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from omnistream.media.audio import OUTPUT_SAMPLE_RATE, resample
from omnistream.train.sentences import sentences
from omnistream.train.voices import Voice, speak, write_wav

MANIFEST = "corpus.jsonl"
HELD_OUT_SEED = 1_000_003  # the held-out sentences' seed; training seeds are small integers


def held_out_sentences(n: int = 100) -> list[str]:
    """The codec's held-out sentences (never in a training corpus)."""
    return sentences(n, HELD_OUT_SEED)


def make_corpus(out: str | Path, n: int, seed: int = 0, held_out: bool = False,
                speeds: tuple[float, float] = (0.85, 1.2), espeak_fraction: float = 0.0,
                progress: bool = True) -> Path:
    """Render ``n`` sentences (``held_out``: the held-out set, at speed 1.0) into ``out``;
    returns the manifest path. Training corpora exclude the held-out sentences."""
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    if held_out:
        texts = held_out_sentences(n)
    else:
        texts = sentences(n, seed, exclude=set(held_out_sentences()))
    rng = random.Random(seed * 7919 + 17)
    records = []
    it = range(len(texts))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"speech corpus {out.name}", unit="clip")
    for i in it:
        if held_out:
            voice = Voice("piper", 1.0)
        elif rng.random() < espeak_fraction:
            voice = Voice("espeak", float(rng.randint(140, 190)))
        else:
            voice = Voice("piper", round(rng.uniform(*speeds), 3))
        rel = f"clips/{i:06d}.wav"
        if not (out / rel).exists():
            pcm, sr = speak(texts[i], voice)
            pcm = resample(pcm, sr, OUTPUT_SAMPLE_RATE)
            pcm = pcm / max(1.0, float(np.abs(pcm).max()) / 0.95)
            write_wav(out / rel, pcm, OUTPUT_SAMPLE_RATE)
        records.append({"audio": rel, "text": texts[i], "voice": voice.engine,
                        "speed": voice.speed})
    manifest = out / MANIFEST
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def corpus_manifest(path: str | Path) -> Path:
    """A corpus's manifest, given it or the corpus folder that holds it."""
    manifest = Path(path)
    if manifest.is_dir():
        manifest = manifest / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no speech corpus manifest at {manifest} (make one with "
                                "python -m omnistream.train.speech_corpus DIR)")
    return manifest


def load_corpus(manifest: str | Path) -> list[dict]:
    """Records of a corpus manifest (or of the corpus folder that holds it) with ``audio`` made
    absolute."""
    manifest = corpus_manifest(manifest)
    recs = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for r in recs:
        r["audio"] = str((manifest.parent / r["audio"]).resolve())
    return recs


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out", action="store_true")
    a = ap.parse_args(argv)
    print(make_corpus(a.out, a.n, a.seed, a.held_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
