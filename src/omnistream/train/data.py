"""Training data: ChatML conversations in JSONL, validated, tokenised, batched by length.

One record per line, the API's message schema plus optional speech targets::

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "text", "text": ...},
                                        {"type": "image", "image": path}, ...]}],
     "codec_ids": [int, ...],              # talker targets for the last assistant turn
     "speech": "reply.wav",                # the reply spoken: encoded to talker targets by the
                                           # checkpoint's codec when codec_ids are absent
     "speech_units": [[c0, c1, t0, t1], ...],  # where each spoken word (unit) of the reply is:
                                           # its characters [c0, c1) and seconds [t0, t1) in
                                           # ``speech`` (guides the Talker's attention)
     "use_audio_in_video": true,           # each video's audio track is an input too
     "chosen_codec_ids": [...], "rejected_codec_ids": [...]}   # talker DPO pairs

Relative media paths are resolved against the JSONL file's folder. Every record is checked and
encoded when the file is loaded; a bad one is skipped and reported as ``file:line: reason``
(``Dataset.errors``), never fatal.

Tokens: the conversation is rendered by ``omnistream.chat`` (the engine's renderer; a missing
system turn gets the prompt the engine would use: the speech prompt for the Talker tasks) turn by
turn, so the labels know where each assistant turn is: the Thinker's targets are the assistant
content tokens and their ``<|im_end|>``; everything else is -100. Media placeholders are expanded
to the item's token count; the items come from the project's input pipeline (``omnistream.media``),
which also gives the features the encoders consume. With ``use_audio_in_video`` a video's
placeholder becomes the processor's interleaved layout (``<|audio_bos|> V0 A0 V1 A1 ...
<|audio_eos|>`` inside the vision bos/eos, ``prompt.interleave_chunks``) and its audio track is an
audio item right after the video item, so ids, features and TMRoPE positions are the engine's.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from omnistream import chat
from omnistream.config import ThinkerConfig
from omnistream.engine.options import CODES_PER_SECOND
from omnistream.nn.positions import audio_token_count, get_rope_index
from omnistream.prompt import ProcessorOptions
from omnistream.tokenizer import Tokenizer

IGNORE = -100
ROLES = chat.ROLES
MEDIA = chat.MEDIA_KINDS
SPEECH_TASKS = ("talker", "talker_dpo")  # tasks whose examples are rendered for speech output
N_CODES = 8292  # codec ids [0, 8292) are speech codes; 8292.. are pad/bos/eos/mask


class RecordError(ValueError):
    """A record that cannot be used (the message says why)."""


@dataclass
class Example:
    """One encoded conversation."""

    input_ids: list[int]
    labels: list[int]  # thinker targets (already aligned: label[t] is the target *of* token t)
    position_ids: Tensor  # [3, T] TMRoPE ids
    media: list[Any] = field(default_factory=list)  # processed media items, prompt order
    reply_start: int = 0  # first content token of the last assistant turn
    reply_len: int = 0  # content tokens of that turn (its <|im_end|> excluded)
    codes: list[int] | None = None  # talker targets (or DPO chosen)
    rejected: list[int] | None = None  # DPO rejected
    # per spoken unit (``speech_units``): (first code, end code, first reply token, end token)
    units: list[tuple[int, int, int, int]] | None = None
    where: str = ""  # file:line

    def __len__(self) -> int:
        n = len(self.input_ids)
        return n + 2 + len(self.codes) if self.codes is not None else n


# -- media ---------------------------------------------------------------------------------------


@dataclass
class AudioItem:
    features: Tensor  # [128, n] normalised log-mel
    feature_len: int  # n valid mel frames

    @property
    def n_tokens(self) -> int:
        return audio_token_count(self.feature_len)


def _audio_item(x) -> AudioItem:
    from omnistream.media.audio import log_mel_spectrogram

    feats, n = log_mel_spectrogram(x)
    return AudioItem(feats[:, :n], n)


def process_media(kind: str, path: str, part: dict | None = None,
                  opts: ProcessorOptions | None = None, normalized: bool = True) -> Any:
    """Decode and featurise one media item as the engine's processor does (``prompt.load_part``:
    the checkpoint's processor options ``opts``, overridden by the content ``part``'s own keys):
    an ``AudioItem`` or a ``VisualInput`` (image / video), each with ``n_tokens`` placeholders
    (``normalized=False``: its patches as uint8 pixels, for ``pack_media``)."""
    from omnistream.media.errors import MediaError
    from omnistream.prompt import load_part

    try:
        item = load_part(part or {}, kind, opts or ProcessorOptions(), path, normalized)
        return _audio_item(item) if kind == "audio" else item
    except (MediaError, ValueError, OSError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"bad {kind} {Path(path).name!r}: {e}") from e


def video_audio(path: str, part: dict | None = None,
                opts: ProcessorOptions | None = None) -> AudioItem:
    """The audio track of a video as an ``AudioItem`` (``use_audio_in_video``), read as the
    processor reads it."""
    from omnistream.media.errors import MediaError
    from omnistream.prompt import load_part

    try:
        return _audio_item(load_part(part or {}, "video_audio", opts or ProcessorOptions(), path))
    except (MediaError, ValueError, OSError) as e:
        raise RecordError(f"bad video audio track {Path(path).name!r}: {e}") from e


def collate_media(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Group the processed items of a batch (prompt order) by kind for the encoders."""
    out: dict[str, list] = {k: [] for k in MEDIA}
    for kind, item in items:
        out[kind].append(item)
    return out


# -- records ---------------------------------------------------------------------------------


def _check_codes(rec: dict, key: str) -> list[int] | None:
    codes = rec.get(key)
    if codes is None:
        return None
    if not isinstance(codes, list) or not codes:
        raise RecordError(f"{key!r} must be a non-empty list of ints")
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < N_CODES for c in codes):
        raise RecordError(f"{key!r} must hold ints in [0, {N_CODES})")
    return codes


def validate(rec: Any, base: Path) -> dict:
    """Schema checks (raises ``RecordError``); returns the record."""
    if not isinstance(rec, dict):
        raise RecordError("record is not a JSON object")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RecordError(f"messages[{i}]: role must be one of {ROLES}")
        c = m.get("content")
        if isinstance(c, str):
            continue
        if not isinstance(c, list) or not c:
            raise RecordError(f"messages[{i}]: content must be a string or a non-empty list")
        for j, part in enumerate(c):
            t = part.get("type") if isinstance(part, dict) else None
            if t == "text":
                if not isinstance(part.get("text"), str):
                    raise RecordError(f"messages[{i}].content[{j}]: text part without 'text'")
            elif t in MEDIA:
                if m["role"] == "assistant":
                    raise RecordError(f"messages[{i}].content[{j}]: assistant turns are text only")
                src = part.get(t)
                if not isinstance(src, str):
                    raise RecordError(f"messages[{i}].content[{j}]: {t} part without a path")
                if not (base / src).is_file():
                    raise RecordError(f"messages[{i}].content[{j}]: {t} file not found: {src}")
            else:
                raise RecordError(f"messages[{i}].content[{j}]: unknown part type {t!r}")
    if msgs[-1]["role"] != "assistant":
        raise RecordError("the last message must be the assistant's reply")
    for key in ("codec_ids", "chosen_codec_ids", "rejected_codec_ids"):
        _check_codes(rec, key)
    if "speech" in rec and not (
        isinstance(rec["speech"], str) and (base / rec["speech"]).is_file()
    ):
        raise RecordError(f"speech file not found: {rec.get('speech')!r}")
    units = rec.get("speech_units")
    if units is not None and not (
        isinstance(units, list)
        and all(isinstance(u, list) and len(u) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in u)
                and 0 <= u[0] < u[1] and 0 <= u[2] < u[3] for u in units)
    ):
        raise RecordError("'speech_units' must be a list of [char_lo, char_hi, start_s, end_s] "
                          "with lo < hi")
    if not isinstance(rec.get("use_audio_in_video", False), bool):
        raise RecordError("'use_audio_in_video' must be true or false")
    return rec


def encode(
    rec: dict, tok: Tokenizer, cfg: ThinkerConfig, base: Path, task: str = "thinker",
    speech_codes: Callable[[str], list[int]] | None = None,
    opts: ProcessorOptions | None = None, media_cache: dict | None = None,
) -> Example:
    """Render + tokenise one validated record (media through ``process_media``).
    ``speech_codes(path)``: the codec that turns a record's ``speech`` file into talker targets
    (``engine.codec.Codec.encode``) when it has no ``codec_ids``. ``media_cache``: processed
    media by file and part, shared by the records that show the same file."""
    sp = tok.special
    msgs = rec["messages"]
    aiv = bool(rec.get("use_audio_in_video", False))
    system = chat.system_prompt_for(speech_output=task in SPEECH_TASKS)
    placeholder = {sp.audio: "audio", sp.image: "image", sp.video: "video"}
    ids: list[int] = []
    labels: list[int] = []
    media: list[tuple[str, Any]] = []
    reply_start = reply_len = 0
    reply_text, reply_body = "", []
    for m, (head_text, content, tail_text) in zip(msgs, chat.render_turns(msgs, system),
                                                  strict=True):
        head, tail = tok.encode(head_text), tok.encode(tail_text)
        items = [(p["type"], _media(p, base, opts, media_cache), p) for p in chat.media_parts([m])]
        body: list[int] = []
        k = 0
        for i in tok.encode(content):  # each placeholder token -> the item's token count
            if i not in placeholder:
                body.append(i)
                continue
            if k >= len(items) or items[k][0] != placeholder[i]:
                raise RecordError("a text part holds a media placeholder token")
            kind, item, part = items[k]
            media.append((kind, item))
            if kind == "video" and aiv:  # the processor's layout, then the track's features
                from omnistream.prompt import interleave_chunks

                track = video_audio(str(base / part["video"]), part, opts)
                body += [sp.audio_bos]
                for nv, na in interleave_chunks(item.grid_thw, item.second_per_grid,
                                                int(track.n_tokens), cfg.seconds_per_chunk,
                                                cfg.position_id_per_seconds):
                    body += [sp.video] * nv + [sp.audio] * na
                body += [sp.audio_eos]
                media.append(("audio", track))
            else:
                body += [i] * int(item.n_tokens)
            k += 1
        if k != len(items):
            raise RecordError("a text part holds a media placeholder token")
        is_asst = m["role"] == "assistant"
        if is_asst:
            reply_start, reply_len = len(ids) + len(head), len(body)
            reply_text, reply_body = content, body
            if not body:
                raise RecordError("empty assistant reply")
        ids += head + body + tail
        # target of position t is token t+1: assistant body tokens and <|im_end|> are targets
        labels += [IGNORE] * len(head)
        labels += body + [sp.im_end] if is_asst else [IGNORE] * (len(body) + 1)
        labels += [IGNORE] * (len(tail) - 1)
    # shift: labels[t] = target for the prediction made at t (= token t+1)
    labels = labels[1:] + [IGNORE]
    if sp.image in ids or sp.video in ids or sp.audio in ids:
        mi = collate_media(media)
        pos = _positions(ids, mi, cfg, aiv)
    else:
        pos = torch.arange(len(ids)).expand(3, -1)
    ex = Example(ids, labels, pos, media, reply_start, reply_len)
    if task == "talker":
        ex.codes = _check_codes(rec, "codec_ids")
        if ex.codes is None and "speech" in rec and speech_codes is not None:
            try:
                ex.codes = speech_codes(str(base / rec["speech"]))
            except ValueError as e:  # MediaError and bad audio name the file
                raise RecordError(f"speech cannot be encoded: {e}") from None
        if ex.codes is None:
            hint = (
                " (a 'speech' file needs a checkpoint with a speech encoder: codec_encoder_config)"
                if "speech" in rec
                else ""
            )
            raise RecordError("talker training needs 'codec_ids' or 'speech'" + hint)
        if rec.get("speech_units"):
            ex.units = unit_alignment(rec["speech_units"], reply_text, reply_body, tok)
    elif task == "talker_dpo":
        ex.codes = _check_codes(rec, "chosen_codec_ids")
        ex.rejected = _check_codes(rec, "rejected_codec_ids")
        if ex.codes is None or ex.rejected is None:
            raise RecordError("DPO needs 'chosen_codec_ids' and 'rejected_codec_ids'")
    return ex


def unit_alignment(units: list[list[float]], text: str, body: list[int],
                   tok: Tokenizer) -> list[tuple[int, int, int, int]]:
    """``speech_units`` of a reply -> per unit ``(code_lo, code_hi, tok_lo, tok_hi)``: its codes
    (``CODES_PER_SECOND``) and the reply tokens (``body``, the ids of ``text``) that overlap its
    characters. A unit whose characters no token covers is refused (``RecordError``)."""
    starts, pos = [], 0  # byte offset where each token starts
    for i in body:
        starts.append(pos)
        pos += len(tok.token_bytes(i))
    if pos != len(text.encode("utf-8")):
        raise RecordError("'speech_units': the reply's tokens do not spell its text")
    ends = starts[1:] + [pos]
    out = []
    for c0, c1, t0, t1 in units:
        b0, b1 = len(text[: int(c0)].encode("utf-8")), len(text[: int(c1)].encode("utf-8"))
        toks = [j for j, (s, e) in enumerate(zip(starts, ends, strict=True)) if e > b0 and s < b1]
        if not toks or int(c1) > len(text):
            raise RecordError(f"'speech_units': characters [{c0}, {c1}) are not in the reply")
        lo = int(t0 * CODES_PER_SECOND)
        out.append((lo, max(math.ceil(t1 * CODES_PER_SECOND), lo + 1), toks[0], toks[-1] + 1))
    return out


def _media(part: dict, base: Path, opts: ProcessorOptions | None, cache: dict | None) -> Any:
    kind = part["type"]
    path = str(base / part[kind])
    if cache is None:
        return process_media(kind, path, part, opts)
    key = (path, json.dumps(part, sort_keys=True))
    if key not in cache:
        cache[key] = pack_media(process_media(kind, path, part, opts, normalized=False))
    return cache[key]


@dataclass
class PackedPixels:
    """Image or video patches ``[N, 3 * k]`` (colour-major columns, ``image.patchify``) kept as
    uint8 indices into each channel's 256 normalised pixel values (``_pixel_levels``)."""

    index: Tensor  # [N, 3, k] uint8

    def unpack(self) -> Tensor:
        """The float32 patches, bit for bit as the processor gave them."""
        offset = torch.arange(0, 768, 256)[None, :, None]  # each channel reads its own levels
        flat = torch.take(_pixel_levels(), self.index.long() + offset)  # [N, 3, k]
        return flat.reshape(self.index.shape[0], -1)


def pack_pixels(x: Tensor) -> PackedPixels | Tensor:
    """``x`` as ``PackedPixels`` when that gives back every bit, else ``x`` itself (float32
    patches already normalised; ``pack_media`` packs the processor's uint8 ones without this).

    A record's image and video patches are CLIP-normalised uint8 pixels, so each channel has
    256 possible values: kept as float32 patches, the media of a Thinker stage with 37,000
    records (15,000 images) held 19 GB (sixteenth session); packed, a quarter of that."""
    if x.dtype != torch.float32 or x.ndim != 2 or x.shape[1] % 3:
        return x
    x = x.contiguous()
    levels = _pixel_levels()  # [3, 256]: affine in the uint8 value, so inverted directly
    channels = x.reshape(x.shape[0], 3, -1)
    lo, step = levels[:, :1], (levels[:, 255:] - levels[:, :1]) / 255  # [3, 1]
    # (the inverse is within 3e-5 of every level's index, far inside the rounding)
    packed = PackedPixels(((channels - lo) / step).round_().clamp_(0, 255).to(torch.uint8))
    # every bit must come back: a value that is not one of the levels keeps the float tensor
    if torch.equal(packed.unpack().view(torch.int32), x.view(torch.int32)):
        return packed
    return x


@functools.cache
def _pixel_levels() -> Tensor:
    """``[3, 256]``: each colour channel's 256 uint8 pixel values as the processor normalises
    them (ascending)."""
    from omnistream.media.image import normalize

    pixels = torch.arange(256, dtype=torch.uint8).expand(1, 3, 1, 256)
    return normalize(pixels)[0, :, 0].contiguous()


def pack_media(item: Any) -> Any:
    """A processed media item (``process_media(..., normalized=False)``) with its uint8 patches
    kept as ``PackedPixels``: each pixel value is its level's index."""
    pixels = getattr(item, "pixel_values", None)
    if isinstance(pixels, Tensor) and pixels.dtype == torch.uint8:
        return replace(item, pixel_values=PackedPixels(pixels.reshape(pixels.shape[0], 3, -1)))
    return item


def unpack_media(item: Any) -> Any:
    """``pack_media``'s item as the processor gave it."""
    pixels = getattr(item, "pixel_values", None)
    if isinstance(pixels, PackedPixels):
        return replace(item, pixel_values=pixels.unpack())
    return item


def _positions(ids: list[int], mi: dict[str, list], cfg: ThinkerConfig,
               use_audio_in_video: bool = False) -> Tensor:
    def cat(kind, attr):
        xs = [torch.as_tensor(getattr(it, attr)) for it in mi[kind]]
        return torch.stack(xs) if xs else None

    audio_len = cat("audio", "feature_len")
    spg = [float(it.second_per_grid) for it in mi["video"]] or None
    pos, _ = get_rope_index(
        torch.tensor([ids]),
        cat("image", "grid_thw"),
        cat("video", "grid_thw"),
        None,
        use_audio_in_video,
        audio_len,
        spg,
        cfg,
    )
    return pos[:, 0]  # [3, T]


# -- dataset ---------------------------------------------------------------------------------


class Dataset:
    """All usable examples of one or more JSONL files; ``errors`` lists the skipped records."""

    def __init__(
        self,
        paths: str | Path | list[str | Path],
        tok: Tokenizer,
        cfg: ThinkerConfig,
        task: str = "thinker",
        max_len: int | None = None,
        log: Callable[[dict], None] = lambda obj: print(json.dumps(obj)),
        speech_codes: Callable[[str], list[int]] | None = None,
        processor_options: ProcessorOptions | None = None,
        progress: bool = False,
    ):
        """``log`` receives one dict per skipped record (the training log's JSON lines);
        ``progress``: a bar per file on stderr (loading a stage's media takes minutes)."""
        self.examples: list[Example] = []
        self.errors: list[str] = []
        media_cache: dict = {}  # records that show the same file share its tensors
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            path = Path(path)
            with path.open(encoding="utf-8") as f:
                lines = f.readlines()
            numbered = enumerate(lines, 1)
            if progress:
                from tqdm import tqdm

                numbered = tqdm(numbered, total=len(lines), unit="record",
                                desc=f"loading {path.parent.name}/{path.name}")
            for lineno, line in numbered:
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecordError(f"invalid JSON: {e.msg} (column {e.colno})") from None
                    ex = encode(validate(rec, path.parent), tok, cfg, path.parent, task,
                                speech_codes, processor_options, media_cache)
                    if max_len is not None and len(ex) > max_len:
                        raise RecordError(f"{len(ex)} tokens > max_len {max_len}")
                except RecordError as e:
                    self.errors.append(f"{where}: {e}")
                    log({"event": "bad_record", "where": where, "error": str(e)})
                    continue
                ex.where = where
                self.examples.append(ex)
        if not self.examples:
            raise ValueError(f"no usable records in {paths} ({len(self.errors)} bad)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


# -- batching --------------------------------------------------------------------------------


class Batches:
    """Deterministic, resumable stream of *global* batches (lists of example indices).

    Each epoch shuffles the indices with ``seed + epoch``; each window of ``group`` global batches
    is sorted by length so a batch holds similar lengths (less padding), and the window's batches
    are shuffled again. ``state()``/``load_state()`` give the exact position (epoch, batch)."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int = 0, group: int = 32):
        if global_batch > len(lengths):
            raise ValueError(f"global batch {global_batch} > dataset size {len(lengths)}")
        self.lengths, self.global_batch, self.seed, self.group = lengths, global_batch, seed, group
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        n = len(idx) // self.global_batch * self.global_batch  # drop the ragged tail
        idx, out = idx[:n], []
        win = self.global_batch * max(1, self.group)
        for s in range(0, n, win):
            w = sorted(idx[s : s + win], key=lambda i: (self.lengths[i], i))
            bs = [w[k : k + self.global_batch] for k in range(0, len(w), self.global_batch)]
            rng.shuffle(bs)
            out += bs
        return out

    def __next__(self) -> list[int]:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        b = self._order[self.pos]
        self.pos += 1
        return b

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._order = self._epoch_order(self.epoch)


def split(global_ids: list[int], n_micro: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-batch a of rank r is the
    ``(a * world + r)``-th equal slice (so the same global batch splits the same for any world)."""
    per = len(global_ids) // (n_micro * world)
    return [
        global_ids[(a * world + rank) * per : (a * world + rank + 1) * per] for a in range(n_micro)
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors (causal attention never sees right padding, so no mask is needed)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        pos[:, b, :n] = e.position_ids
        if n < T:  # padding continues the positions (never attended by real tokens)
            pos[:, b, n:] = e.position_ids.max() + 1 + torch.arange(T - n)
    media = [(k, unpack_media(m)) for e in examples for k, m in e.media]  # stored packed
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "lengths": torch.tensor([len(e.input_ids) for e in examples]),  # [B]
        "media": collate_media(media) if media else None,
        "examples": examples,
    }
