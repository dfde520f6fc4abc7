"""The Talker's spoken records for omni-mini's recipe (``train.mini``): each reply spoken whole
in the Piper voice (cached by text), where each word is in it (``speech_units``) and, through the
codec's speech encoder, its codes (``codec_ids``); the same for counterfactual replies."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from omnistream.train.model import write_lines

SPEECH_LENGTH_SCALE = 1.0  # the Talker's targets: the Piper voice at its natural speed


def reply_text(rec: dict) -> str:
    """A record's assistant reply as one string."""
    reply = rec["messages"][-1]["content"]
    return reply if isinstance(reply, str) else "".join(p.get("text", "") for p in reply)


def speech_file(text: str, folder: Path, length_scale: float = SPEECH_LENGTH_SCALE) -> Path:
    """``text`` spoken whole in the Piper voice (``voices.piper_sentence``; cached by text: the
    same reply is spoken once)."""
    from omnistream.train.model import write_whole
    from omnistream.train.voices import piper_sentence, write_wav

    h = hashlib.sha1(f"sentence|{length_scale}|{text}".encode()).hexdigest()[:16]
    path = folder / f"{h}.wav"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        pcm, sr, _ = piper_sentence(text, length_scale)
        if pcm.size == 0:
            raise ValueError(f"the Piper voice speaks nothing for {text!r}")
        write_whole(path, lambda p: write_wav(p, pcm, sr))
    return path


def speech_fields(reply: str, speech: Path, encode: Callable | None, cache: dict,
                   length_scale: float = SPEECH_LENGTH_SCALE) -> dict:
    """``speech_units`` (``voices.piper_sentence`` at ``length_scale``, the recording's) and,
    with the codec's ``encode``, ``codec_ids`` (the codes of the recording ``speech``, as
    stored) of a reply; ``cache``: the fields of recordings already done (replies repeat across
    records)."""
    if speech not in cache:
        from omnistream.media.audio import decode_audio
        from omnistream.train.voices import piper_sentence

        fields: dict = {"speech_units": piper_sentence(reply, length_scale)[2]}
        if encode is not None:
            fields["codec_ids"] = list(encode(*decode_audio(str(speech))))
        cache[speech] = fields
    return cache[speech]


def codec_encoder(codec: str | Path | None) -> Callable | None:
    """``(pcm, sample_rate) -> codes`` of a codec checkpoint's speech encoder (None: no codec)."""
    if codec is None:
        return None
    from omnistream.engine.codec import Codec

    c = Codec.load(codec)
    if c.encoder is None:
        return None
    return lambda pcm, sr: c.encode(pcm, sample_rate=sr).tolist()


def add_speech(data: Path, out: Path, speech_dir: str = "speech",
               encode: Callable | None = None) -> int:
    """``out``: the records of ``data`` with ``speech``, their reply spoken (same folder, so
    media paths stay valid), ``speech_units`` and with ``encode`` (``codec_encoder``) their
    ``codec_ids`` (``speech_fields``). Returns the number of distinct replies spoken."""
    from tqdm import tqdm

    cache: dict = {}

    lines, texts = [], set()
    for line in tqdm(data.read_text(encoding="utf-8").splitlines(), desc="speaking replies",
                     unit="record"):
        if not line.strip():
            continue
        rec = json.loads(line)
        reply = reply_text(rec)
        path = speech_file(reply, data.parent / speech_dir)
        rec["speech"] = f"{speech_dir}/{path.name}"
        rec.update(speech_fields(reply, path, encode, cache))
        texts.add(reply)
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_lines(out, lines)
    return len(texts)


def add_counterfactuals(talker: Path, out: Path, seed: int, speech_dir: str = "speech",
                        encode: Callable | None = None) -> int:
    """``out``: a copy of each record of ``talker`` (records with ``speech``) whose reply has a
    content word (``tasks.counterfactual_answer``), with that word changed and the new reply
    spoken; the media are unchanged, so the reply contradicts them. Returns the record count."""
    import numpy as np

    from omnistream.train.tasks import counterfactual_answer

    rng = np.random.default_rng([seed, 7])
    lines, cache = [], {}
    for line in talker.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("family") in ("chat", "repeat"):
            continue
        reply = counterfactual_answer(rec["messages"][-1]["content"], rng)
        if reply is None:
            continue
        rec["messages"][-1]["content"] = reply
        path = speech_file(reply, talker.parent / speech_dir)
        rec["speech"] = f"{speech_dir}/{path.name}"
        rec.update(speech_fields(reply, path, encode, cache))
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_lines(out, lines)
    return len(lines)
