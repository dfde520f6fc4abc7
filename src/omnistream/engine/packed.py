"""Decoder weights in oneDNN's packed layout (CPU, fp32), for batched decoding.

``Engine.load`` swaps the wide ``nn.Linear`` layers of the Thinker and the Talker for
``PackedLinear`` when they run in fp32 on a CPU (not with ``quantize``). A ``Batcher``
(``engine/batch.py``) multiplies a few rows by each weight per step, and MKL's sgemm, which
``nn.Linear`` calls, re-packs the whole weight on every such call: 8 rows cost it 2-3x one row.
oneDNN packs the weight once, at load, and then 8 rows cost ~1.5x one row (one row itself is
faster too). Names stay the checkpoint's (``q_proj``, ``lm_head``, ...); ``weight`` and ``bias``
become oneDNN tensors, so nothing that needs dense parameters (training, ``state_dict``) should
see a packed module (the engine never saves).

The numbers differ from ``F.linear``'s by float rounding only (~1e-6 relative).
"""

from __future__ import annotations

import torch
from torch import nn

PACK_MIN_IN = 512  # narrower layers: oneDNN's per-call cost (~30 us) outweighs what it saves
PACK_MIN_NUMEL = 2048 * 2048  # smaller weights: packing loses on CPUs without AVX-512


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is kept in oneDNN's packed layout (CPU, fp32).

    Decoding several sessions at once multiplies a few rows by each weight. MKL's sgemm re-packs
    the weight on every such call; oneDNN packs it once, here. One-core timings on this project's
    2-core AVX-512 CPU (torch 2.13, shared machine: +-20%), microseconds per call:

        weight [N x K]     rows:    1       2       8          (MKL F.linear: 1 / 2 / 8)
        11008 x 2048             3 318   5 129   6 061          4 322 /  9 328 / 11 548
        18944 x  896             2 455   3 816   5 282          4 053 /  8 607 /  7 923
        151936 x 2048           47 426  69 466  82 653         58 524 / 134 345 / 190 733
        128 x 64                    30      32      30              2 /      4 /      4

    so only layers with at least ``PACK_MIN_IN`` inputs are packed. On the 2-core AMD EPYC
    of the eighteenth session (no AVX-512; one thread, quiet) oneDNN's per-call cost is larger
    and it only breaks even at about 4 M weights:

        weight [N x K]     rows:    1       8          (MKL F.linear: 1 / 8)
        2048 x 2048                680   2 668            693 / 3 025
        1024 x 1024                223     681            163 /   626
         896 x  896                129     478             73 /   283
         192 x  576                 66     119             14 /    39

    so a layer must also hold ``PACK_MIN_NUMEL`` weights: the small models' layers (omni-mini's
    Talker ``down_proj``, 192 x 576, took 4.7x longer packed) are fused instead
    (``TextModel.fuse_projections_``). ``weight`` (and ``bias``) are oneDNN tensors;
    ``in_features`` / ``out_features`` as in ``nn.Linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w, b = linear.weight.detach(), linear.bias
        self.register_buffer("weight", w.contiguous().to_mkldnn())
        self.register_buffer("bias", None if b is None else b.detach().to_mkldnn())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        y = torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.weight, self.bias)
        return y.to_dense()


def should_pack(linear: nn.Module) -> bool:
    """Whether ``linear`` decodes batched rows faster packed (fp32 on a CPU, wide enough)."""
    if type(linear) is not nn.Linear or not torch.backends.mkldnn.is_available():
        return False
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype == torch.float32
            and linear.in_features >= PACK_MIN_IN and w.numel() >= PACK_MIN_NUMEL)


@torch.no_grad()
def pack_linears_(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Swap every ``nn.Linear`` in ``module`` (outside the ``exclude`` subtrees) that
    ``should_pack`` for a ``PackedLinear``, one at a time (the unpacked original is released
    before the next is copied), except a head tied to an embedding (packing would copy it).
    Returns how many were swapped."""
    from omnistream.checkpoint import release_pages

    tied = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    skip = {id(m) for e in exclude for m in e.modules()}
    n = 0
    for child in [m for m in module.modules() if id(m) not in skip]:
        for attr, sub in list(child.named_children()):
            if should_pack(sub) and id(sub.weight) not in tied:
                setattr(child, attr, PackedLinear(sub))
                release_pages(sub.weight)
                n += 1
    return n
