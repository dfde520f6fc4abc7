"""Static, pre-allocated KV cache (gpt-fast style).

One ``[B, H_kv, max_len, D]`` key and value tensor per layer, written in place by position index;
nothing is concatenated or reallocated while decoding. ``length`` is the number of filled slots
(shared by every row: batches are left-padded). ``valid`` marks which filled slots are real tokens
(False at left padding) and is what the attention mask is built from.

Rollback is ``crop(n)``: slots past ``n`` are simply overwritten later; the causal mask never lets
a query see a slot at or beyond its own index, so stale entries are harmless.
"""

from __future__ import annotations

import torch
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
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
