"""Decode-time weight layout for the output heads, decided by shape (no timing at load).

A decode step multiplies one hidden vector by each head: ``[1, D] @ W.T`` with ``W`` of shape
``[V, D]`` (151936 x D for the Thinker, 8448 x D for the Talker). Stored row-major that is V dot
products of length D; stored column-major (``W.T`` contiguous, ``W`` its transposed view) the
same matrix is read in long streaks. The parameter keeps its name, shape and values; only its
strides change, so nothing that reads the module can tell, except ``state_dict`` consumers that
need contiguous tensors (the engine never saves).

The rule (``column_major_is_faster``), from one-token ``F.linear`` timings on the 2-core AVX-512
CPU this project is developed on (torch 2.13, MKL, 2 threads; best of 5 x 10 calls; the machine
is shared, so ratios are +-15%):

    dtype  V x D            row-major   column-major   col / row
    fp32   151936 x   64     1.7 ms       1.1 ms        0.67
    fp32   151936 x  128     7.7 ms       2.5 ms        0.32
    fp32   151936 x  512    19.0 ms      10.2 ms        0.54
    fp32   151936 x  896    29.9 ms      18.3 ms        0.61
    fp32   151936 x 1024    28.9 ms      21.1 ms        0.73
    fp32   151936 x 2048    53.9 ms      42.1 ms        0.78
    fp32     8448 x  896     0.76 ms      0.72 ms       0.94
    fp32     8448 x 1024     1.21 ms      0.91 ms       0.75
    bf16   151936 x  128     1.1 ms       1.6 ms        1.49
    bf16   151936 x  896     9.3 ms      12.2 ms        1.31
    bf16   151936 x 2048    20.3 ms      30.1 ms        1.48
    bf16     8448 x 1024     0.27 ms      0.32 ms       1.20

so on a CPU: fp32 heads of at least ``MIN_BYTES`` go column-major (MKL's transposed sgemv reads
at 18-23 GB/s, the plain one at ~30); bf16 / fp16 stay row-major (their kernels prefer it); GPUs
read either layout at bandwidth. A head tied to the input embedding changes layout with it (one
parameter, one storage).

Changing the layout costs one transposed copy of the head at load (0.3-0.7 s for 545 MB on this
shared machine, mostly faulting in fresh pages); the row-major original's memory-mapped pages
are handed back right after (``checkpoint.release_pages``), so the two are held together only
during the copy. (A background copy overlapping the tokenizer parse saved ~0.4 s of load but
held both copies while the first step touched every other weight: +0.45 GB peak RSS.)
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BYTES = 16 * 2**20  # smaller heads: the difference is under 0.1 ms per token


def column_major_is_faster(shape: tuple[int, ...], dtype: torch.dtype,
                           device: torch.device | str = "cpu") -> bool:
    """Whether a ``[V, D]`` head of ``dtype`` on ``device`` decodes faster column-major (see the
    measurements in the module docstring)."""
    if torch.device(device).type != "cpu" or len(shape) != 2:
        return False
    nbytes = shape[0] * shape[1] * dtype.itemsize
    return dtype == torch.float32 and nbytes >= MIN_BYTES


@torch.no_grad()
def tune_head_layout_(head: nn.Linear) -> bool:
    """Store ``head.weight`` column-major when the shape rule says that decodes faster. Returns
    True when the layout was changed.

    The parameter object is kept and its data replaced (``weight.data = ...``), so a head tied
    to the input embedding (one shared parameter) stays tied: the embedding reads the same
    column-major storage (a row lookup then gathers D strided values; same results) and there is
    never a second copy of the matrix once this returns. Done at load, before the first forward
    touches the other weights, so the transient second copy never adds to the peak memory of a
    memory-mapped checkpoint."""
    w = head.weight
    if w.dim() != 2 or not w.is_contiguous():
        return False
    if not column_major_is_faster(tuple(w.shape), w.dtype, w.device):
        return False
    from omnistream.checkpoint import release_pages

    old = w.detach()
    w.data = old.t().contiguous().t()  # same values, strides (1, V); a tied embedding sees it
    release_pages(old)  # the row-major original, when it is a view of a loaded file
    return True
