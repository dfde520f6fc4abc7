"""Decode-time weight layout for the output heads.

A decode step multiplies one hidden vector by each head: ``[1, D] @ W.T`` with ``W`` of shape
``[V, D]`` (151936 x D for the Thinker, 8448 x D for the Talker). Stored row-major, that is V
dot products of length D, and with a small D the CPU BLAS gemv does not reach memory bandwidth
(tiny model, D = 64: 2.5 ms for a 39 MB head that reads in 1.8 ms). The same matrix stored
column-major (``W.T`` contiguous, ``W`` its transposed view) is read in long streaks instead. The
parameter keeps its name, shape and values; only its strides change, so nothing that reads the
module can tell, except ``state_dict`` consumers that need contiguous tensors (the engine never
saves). Which layout wins depends on the machine, so it is measured once per head at load.
"""

from __future__ import annotations

import time

import torch
from torch import nn

MIN_BYTES = 16 * 2**20


def _time(fn, n: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


@torch.no_grad()
def tune_head_layout_(head: nn.Linear) -> bool:
    """Store ``head.weight`` column-major if that makes a one-token matmul faster here (CPU
    only; GPUs run either layout at bandwidth). Returns True when the layout was changed."""
    w = head.weight
    if w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():
        return False
    if w.numel() * w.element_size() < MIN_BYTES:  # too small to matter or to time reliably
        return False
    col = w.t().contiguous().t()  # same values, strides (1, V)
    x = torch.randn(1, 1, w.shape[1], dtype=w.dtype)
    t_row = _time(lambda: head(x))
    t_col = _time(lambda: nn.functional.linear(x, col, head.bias))
    if not t_col < 0.9 * t_row:  # keep the stored layout unless clearly slower
        return False
    head.weight = nn.Parameter(col, requires_grad=w.requires_grad)
    return True
