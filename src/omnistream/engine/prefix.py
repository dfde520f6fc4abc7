"""Shared prompt prefixes: a system block's Thinker and Talker cache rows, computed once per engine.

Every conversation opens with a system block (``<|im_start|>system\\n...<|im_end|>``): the
release's default prompt for spoken replies is 40-odd tokens of the 50-60 of a short question.
Its keys and values depend on those tokens alone (attention is causal, and a text block at the
start has TMRoPE ids 0..P-1 whatever follows), so the first session that sends a system block
stores its cache rows, the Thinker's hidden states and input embeddings there (the Talker reads
them), and later sessions copy them into their cache and prefill only the rest of the prompt,
at position offset P (as a later turn continues a conversation). The Talker's cache rows of
those positions follow from the same states, so the first session with speech stores them too
(``engine/speech.py``). With many sessions starting at once the server then prefills a
question's own tokens, not the whole prompt, per session.

The copy equals a prefill of the whole prompt up to float rounding (the prefix was computed as
its own chunk, a matmul of other shapes: ~1e-6 relative; tests/test_engine.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from omnistream.nn.cache import KVCache
from omnistream.tokenizer import SpecialIds

IDS = SpecialIds()
MEDIA_IDS = frozenset((IDS.audio, IDS.image, IDS.video))


@dataclass
class Prefix:
    """A system block's Thinker state: cache rows ``k`` / ``v`` (per layer [1, H_kv, P, D]),
    final ``hidden`` states and input ``embeds`` [P, D], TMRoPE ids ``pos`` [3, P]; and the
    Talker's cache rows of its prompt positions once a session with speech has prefilled them
    (they depend on these states alone, not on the voice, which comes after the prompt)."""

    ids: tuple[int, ...]
    k: list[Tensor]
    v: list[Tensor]
    hidden: Tensor
    embeds: Tensor
    pos: Tensor
    talker_k: list[Tensor] | None = None
    talker_v: list[Tensor] | None = None

    @classmethod
    def of(cls, ids: list[int], cache: KVCache, hidden: Tensor, embeds: Tensor,
           pos: Tensor) -> Prefix:
        """The first ``len(ids)`` rows of ``cache`` (copied) and their states."""
        n = len(ids)
        return cls(tuple(ids), *cache.rows(n), hidden[:n].clone(), embeds[:n].clone(),
                   pos[:, :n].clone())


def system_block_length(ids: list[int]) -> int:
    """Tokens of the system block that ``ids`` open with (through its ``<|im_end|>``); 0 when
    they do not open with one, it holds media, or nothing follows it."""
    if ids[:2] != [IDS.im_start, IDS.system] or IDS.im_end not in ids:
        return 0
    n = ids.index(IDS.im_end) + 1
    if n >= len(ids) or MEDIA_IDS.intersection(ids[:n]):
        return 0
    return n


class PrefixStore:
    """The ``limit`` most recently used prefixes (a server has one system prompt or a few)."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._items: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self.hits = 0  # prompts that found their prefix here

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ids: list[int]) -> Prefix | None:
        p = self._items.get(tuple(ids))
        if p is not None:
            self._items.move_to_end(p.ids)
            self.hits += 1
        return p

    def put(self, prefix: Prefix) -> None:
        self._items[prefix.ids] = prefix
        self._items.move_to_end(prefix.ids)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
