"""A small synthetic ChatML dataset (tests, demos): spoken and written questions about generated
images, answered in text, with random but per-answer consistent codec ids as speech targets.

``python -m omnistream.train.synth DIR`` writes ``DIR/train.jsonl`` and its media files."""

from __future__ import annotations

import json
import random
import wave
from pathlib import Path

import numpy as np

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
}
SHAPES = ("square", "circle")
TONES = {"red": 330.0, "green": 440.0, "blue": 550.0, "yellow": 660.0}


def write_wav(
    path: Path, freq: float, seconds: float = 0.6, sr: int = 16000, seed: int = 0
) -> None:
    """A tone plus a little noise, 16-bit mono."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def write_image(path: Path, color: str, shape: str, size: int = 56) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (8, 8, size - 8, size - 8)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    img.save(path)


def codes_for(answer: str, n: int = 12) -> list[int]:
    """Random codec ids, the same for the same answer."""
    rng = random.Random(answer)
    return [rng.randrange(0, 8192) for _ in range(n)]


def make_dataset(
    root: Path, n: int = 16, media: bool = True, seed: int = 0, dpo: bool = False
) -> Path:
    """``root/train.jsonl`` with ``n`` records (media files next to it). With ``media`` each
    question shows an image; every other question is spoken (an audio tone) instead of written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        answer = f"The {shape} is {color}."
        content: list[dict] = []
        if media:
            img = f"img_{i}.png"
            write_image(root / img, color, shape)
            content.append({"type": "image", "image": img})
            if i % 2:
                wav = f"q_{i}.wav"
                write_wav(root / wav, TONES[color], seed=i)
                content.append({"type": "audio", "audio": wav})
            else:
                content.append({"type": "text", "text": "What color is the shape?"})
        else:
            content.append({"type": "text", "text": f"Describe a {color} {shape}."})
        rec = {
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": answer},
            ],
            "codec_ids": codes_for(answer),
            # "The {shape}" on the first 6 codes, "is {color}" on the last 6
            "speech_units": [[0, 4 + len(shape), 0.0, 0.12],
                             [5 + len(shape), len(answer) - 1, 0.12, 0.24]],
        }
        if dpo:
            rec["chosen_codec_ids"] = codes_for(answer)
            rec["rejected_codec_ids"] = codes_for(answer + "x")
        lines.append(json.dumps(rec))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    import sys

    print(
        make_dataset(Path(sys.argv[1]), n=int(sys.argv[2]) if len(sys.argv) > 2 else 16, dpo=True)
    )
