"""Static, pre-allocated KV cache (gpt-fast style).

One ``[B, H_kv, max_len, D]`` key and value tensor per layer, written in place by position index;
nothing is concatenated or reallocated while decoding. ``length`` is the number of filled slots
(shared by every row: batches are left-padded). ``valid`` marks which filled slots are real tokens
(False at left padding) and is what the attention mask is built from.

Rollback is ``crop(n)``: slots past ``n`` are simply overwritten later; the causal mask never lets
a query see a slot at or beyond its own index, so stale entries are harmless.

Serving many sessions (``engine/batch.py``): a ``KVPool`` holds ``slots`` one-row caches in one
tensor per layer; ``pool.view(i)`` is slot i as an ordinary ``KVCache`` (each with its own
``length``), so a session prefills, crops and decodes alone exactly as with a private cache. One
token (a decode step) or a prompt chunk for each of several slots then runs in one batched call
through ``CacheRows``: each row's new keys/values are written from its own length and attention
runs once over the rows, masked to each row's own filled slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # [B, S]
        self.has_padding = False
        self.length = 0
        self.max_len = max_len
        self.pool: KVPool | None = None  # set on ``KVPool.view`` caches
        self.slot = 0  # their row in the pool

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reset(self) -> None:
        self.length = 0
        self.valid.fill_(True)
        self.has_padding = False

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` slots."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
        self.valid[:, length:] = True
        self.has_padding = bool(not self.valid[:, :length].all()) if length else False

    def mark(self, attention_mask: Tensor | None, n: int) -> None:
        """Record the padding of the ``n`` slots about to be appended (``attention_mask`` [B, n],
        1 = token, 0 = padding; None = all tokens)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > {self.max_len}")
        if attention_mask is not None:
            m = attention_mask.to(torch.bool)
            self.valid[:, self.length : self.length + n] = m
            if not self.has_padding and not bool(m.all()):
                self.has_padding = True

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, H_kv, T, D] at slots [length, length+T) of ``layer``; return the filled
        prefix [B, H_kv, length+T, D]. ``length`` is advanced by ``advance`` once all layers ran."""
        end = self.length + k.shape[2]
        if self.pool is not None:
            self.pool.zero_to(end)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def rows(self, n: int) -> tuple[list[Tensor], list[Tensor]]:
        """Copies of the first ``n`` filled slots of every layer (keys, values [B, H_kv, n, D])."""
        return [k[:, :, :n].clone() for k in self.k], [v[:, :, :n].clone() for v in self.v]

    def put_rows(self, k: list[Tensor], v: list[Tensor]) -> None:
        """Fill the empty cache with ``rows`` taken from another (a shared prompt prefix)."""
        if self.length:
            raise ValueError("rows go into an empty cache")
        n = k[0].shape[2]
        self.mark(None, n)
        for layer, (kl, vl) in enumerate(zip(k, v, strict=True)):
            self.update(layer, kl, vl)
        self.advance(n)


class KVPool:
    """``slots`` one-row caches in one tensor per layer: k/v ``[slots, H_kv, max_len, D]``.

    Allocated empty (on a CPU no memory is touched yet) and zeroed in blocks as the longest slot
    grows (``zero_to``): a batched step reads every row up to the longest row's length, and a
    masked key or value must still be finite (NaN * 0 is NaN in the attention)."""

    ZERO_BLOCK = 256  # positions zeroed at a time

    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        shape = (slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len
        self.zeroed = 0  # positions [0, zeroed) of every slot hold zeros or written entries

    def zero_to(self, n: int) -> None:
        """Make positions ``< n`` of every slot finite: zero ``[zeroed, n)`` (rounded up to a
        block), where no slot has written yet (every write calls this first)."""
        if n <= self.zeroed:
            return
        n = min(self.max_len, max(n, self.zeroed + self.ZERO_BLOCK))
        for t in self.k + self.v:
            t[:, :, self.zeroed : n].zero_()
        self.zeroed = n

    def view(self, slot: int, max_len: int | None = None) -> KVCache:
        """Slot ``slot`` as an empty one-row ``KVCache`` of ``max_len`` (<= the pool's) slots
        whose tensors are views of the pool (writes land in the pool)."""
        n = self.max_len if max_len is None else max_len
        if not 0 <= slot < self.slots or not 0 < n <= self.max_len:
            raise ValueError(f"slot {slot} / length {n} outside the pool ({self.slots} x "
                             f"{self.max_len})")
        c = KVCache.__new__(KVCache)
        c.k = [t[slot : slot + 1, :, :n] for t in self.k]  # [1, H_kv, n, D] views
        c.v = [t[slot : slot + 1, :, :n] for t in self.v]
        c.valid = torch.ones(1, n, dtype=torch.bool, device=self.k[0].device)
        c.has_padding, c.length, c.max_len = False, 0, n
        c.pool, c.slot = self, slot
        return c


class CacheRows:
    """New tokens for each of B pool-slot caches (``KVPool.view``s of one pool), run in one call:
    pass it as the ``cache`` of ``TextModel.forward``. Row b feeds ``counts[b]`` tokens (default
    1: a decode step), right-padded to ``T = max(counts)``.

    ``length`` is a ``[B, 1]`` tensor (each row's filled slots), so the callers' position
    arithmetic (``cache.length + rope_deltas``) is unchanged. ``attend`` writes each row's T new
    keys/values from its own length and runs one attention over the rows, query t of row b masked
    to its first ``length + t + 1`` slots (the padding of shorter rows is never seen). A row's
    padding tokens are written past its new length, where, as after a ``crop``, nothing reads
    them before they are overwritten."""

    def __init__(self, caches: list[KVCache], counts: list[int] | None = None):
        pool = caches[0].pool
        if pool is None or any(c.pool is not pool or c.has_padding for c in caches):
            raise ValueError("CacheRows needs unpadded views of one KVPool")
        self.counts = [1] * len(caches) if counts is None else list(counts)
        self.T = max(self.counts)
        for c, n in zip(caches, self.counts, strict=True):
            if c.length + n > c.max_len:
                raise ValueError(f"KV cache overflow: {c.length} + {n} > {c.max_len}")
            if c.length + self.T > pool.max_len:
                raise ValueError(f"a row padded to {self.T} tokens overflows the pool at "
                                 f"{c.length}")
        self.caches, self.pool = caches, pool
        dev = pool.k[0].device
        lens = [c.length for c in caches]
        slots = [c.slot for c in caches]
        self.lens = torch.tensor(lens, device=dev)  # [B]
        self.slots = torch.tensor(slots, device=dev)  # [B]
        # consecutive slots are read as a view of the pool; others are gathered (a copy)
        self.lo = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        self.S = max(lens) + self.T  # keys read per row
        pool.zero_to(self.S)
        self.at = self.lens[:, None] + torch.arange(self.T, device=dev)  # [B, T] written slots
        keys = torch.arange(self.S, device=dev)
        self.mask = (keys <= self.at[:, :, None])[:, None]  # [B, 1, T, S]

    @property
    def length(self) -> Tensor:
        return self.lens[:, None]  # [B, 1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> Tensor:
        """q [B, H, T, D], the new k/v [B, H_kv, T, D] -> attention output [B, H, T, D]."""
        K, V = self.pool.k[layer], self.pool.v[layer]  # [slots, H_kv, max_len, D]
        K[self.slots[:, None], :, self.at] = k.transpose(1, 2)  # row b's slots lens[b] + t
        V[self.slots[:, None], :, self.at] = v.transpose(1, 2)
        if self.lo is not None:
            rows = slice(self.lo, self.lo + len(self.caches))
            keys, vals = K[rows, :, : self.S], V[rows, :, : self.S]  # [B, H_kv, S, D] views
        else:
            keys = K[:, :, : self.S].index_select(0, self.slots)
            vals = V[:, :, : self.S].index_select(0, self.slots)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=self.mask,
                                              enable_gqa=enable_gqa)

    def advance(self, n: int) -> None:
        """Every row moves on by its own count (``n``: the padded T the layers ran)."""
        if n != self.T:
            raise ValueError(f"CacheRows ran {self.T} tokens per row, not {n}")
        for c, k in zip(self.caches, self.counts, strict=True):
            c.advance(k)
