"""LoRA on the decoders' linear projections, merged back into the weights at save time.

``LoRALinear`` *is* an ``nn.Linear`` (same ``weight``/``bias`` parameters, same names) with two
extra low-rank factors, so the base tensors keep their checkpoint names and ``merge_lora``
can hand back plain checkpoint tensors: ``W + (alpha / r) * B @ A``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """``y = x W^T + b + (alpha/r) * (x A^T) B^T``; W and b frozen, A and B trained."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared: same tensor, same name
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: starts as the base layer

    def forward(self, x: Tensor) -> Tensor:
        return (
            F.linear(x, self.weight, self.bias)
            + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        )


def apply_lora(
    module: nn.Module, r: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> list[str]:
    """Replace every ``nn.Linear`` named one of ``targets`` inside ``module`` by a ``LoRALinear``
    (in place). Returns the qualified names of the wrapped layers."""
    wrapped = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, r, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


@torch.no_grad()
def merge_lora(sd: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Fold ``<layer>.lora_A`` / ``<layer>.lora_B`` into ``<layer>.weight`` (``W + scale * B @ A``)
    and drop the factors: the keys of the model without LoRA."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        owner = k[: -len(".weight")] if k.endswith(".weight") else None
        if owner is not None and owner + ".lora_A" in sd:
            a, b = sd[owner + ".lora_A"].float(), sd[owner + ".lora_B"].float()
            v = (v.float() + (b @ a) * scale).to(v.dtype)
        out[k] = v
    return out
