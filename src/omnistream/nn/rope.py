"""M-RoPE: multimodal rotary position embedding with 3 position rows (t, h, w).

The head's ``head_dim/2`` frequency slots are split by ``mrope_section`` = (s0, s1, s2): slots
``[0, s0)`` rotate by the t row, ``[s0, s0+s1)`` by the h row, the rest by the w row. The rotation
is the half-split ``rotate_half`` layout (not interleaved). For text all three rows are equal and
this is plain RoPE.

No buffers: the frequencies are recomputed per forward (a handful of elements), so the module is
safe to build on the ``meta`` device and load with ``assign=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """``1 / theta^(2i/head_dim)`` for i in [0, head_dim/2): [head_dim/2] float32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponent)


class MRoPE(nn.Module):
    """Produces (cos, sin), each [B, 1, T, head_dim], from position ids [3, B, T]."""

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int] | tuple[int, ...]):
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}"
            )
        self.head_dim = head_dim
        self.theta = float(theta)
        self.section = tuple(int(s) for s in mrope_section)

    def forward(
        self, position_ids: Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        if position_ids.ndim == 2:  # [B, T] text positions -> same id on all rows
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        freq = inv_freq(self.head_dim, self.theta, position_ids.device)  # [D/2]
        pos = position_ids.float()  # [3, B, T]
        parts, lo = [], 0
        for row, n in enumerate(self.section):
            parts.append(pos[row, :, :, None] * freq[lo : lo + n])  # [B, T, n]
            lo += n
        angles = torch.cat(parts, dim=-1)  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [B, 1, T, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, T, D] by (cos, sin) [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin
