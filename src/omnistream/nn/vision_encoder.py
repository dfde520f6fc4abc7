"""ViT with 2-D rotary, window attention and a patch merger (``thinker.visual.*``).

Input is the processor's patch layout: ``pixel_values`` [N, C*T*P*P], one row per 14x14 patch of
a 2-frame temporal slab, frames in order and, inside a frame, patches ordered so that every
``m x m`` merge group (m = spatial_merge_size) is contiguous: (H/m, W/m, m, m) row-major.

Blocks are pre-RMSNorm with separate biased q/k/v and a biased SwiGLU MLP. Attention is local:
most blocks attend within ``window_size`` px windows (8x8 patches at 112 px; windows are cut on the
merged grid, so a window is always whole merge groups, and windows at the right/bottom edge may
be partial); blocks in ``fullatt_block_indexes`` attend within a whole frame. The hidden states
stay in the input order throughout: each layout is a ``Packing`` that gathers rows into a padded
``[segments, L]`` batch for one SDPA call and scatters the result back, so there is no permute /
un-permute of the sequence and the merger reads merge groups straight from the input order.

No buffers: rotary frequencies are recomputed per call, layouts are cached per grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.config import VisionEncoderConfig
from omnistream.nn.rope import apply_rotary, inv_freq
from omnistream.nn.text import RMSNorm

ROPE_THETA = 10000.0
_ACT = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@dataclass(frozen=True)
class Packing:
    """A split of N rows into attention segments, as a padded batch [S, L].

    gather: [S, L] source row of each slot (0 in padding), or None when the segments are
    contiguous, in order and of equal length (then packing is a view); mask: [S, 1, 1, L] valid
    keys, or None when no segment is padded; scatter: [N] flat slot of each row, or None with
    ``gather``."""

    gather: Tensor | None
    mask: Tensor | None
    scatter: Tensor | None
    n_seg: int

    @staticmethod
    def build(order: Tensor, lengths: Tensor) -> Packing:
        """order: [N] rows in segment order; lengths: [S] rows per segment (all > 0)."""
        n, s, width = order.numel(), lengths.numel(), int(lengths.max())
        if bool((lengths == width).all()) and bool((order == torch.arange(n)).all()):
            return Packing(None, None, None, s)
        slot = torch.arange(width)
        valid = slot < lengths[:, None]  # [S, L]
        start = lengths.cumsum(0) - lengths
        gather = order[(start[:, None] + slot).where(valid, 0)]
        scatter = torch.empty(n, dtype=torch.long)
        scatter[order] = valid.flatten().nonzero().squeeze(1)
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        return Packing(gather, mask, scatter, s)

    def to(self, device: torch.device) -> Packing:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Packing(move(self.gather), move(self.mask), move(self.scatter), self.n_seg)

    def pack(self, x: Tensor) -> Tensor:
        """[N, ...] -> [S, L, ...]."""
        return x.view(self.n_seg, -1, *x.shape[1:]) if self.gather is None else x[self.gather]

    def unpack(self, x: Tensor) -> Tensor:
        """[S, L, ...] -> [N, ...]."""
        x = x.flatten(0, 1)
        return x if self.scatter is None else x[self.scatter]


@dataclass(frozen=True)
class Layout:
    pos: Tensor  # [N, 2] (h, w) patch coordinates
    frames: Packing  # per-frame full attention
    windows: Packing  # window attention

    def to(self, device: torch.device) -> Layout:
        return Layout(self.pos.to(device), self.frames.to(device), self.windows.to(device))


@functools.lru_cache(maxsize=64)
def vision_layout(
    grid: tuple[tuple[int, int, int], ...], merge: int, win: int, device: torch.device
) -> Layout:
    """Positions and attention packings for images/videos with ``grid`` = ((t, h, w), ...) in
    patches, merge size ``merge`` and windows of ``win`` x ``win`` merged tokens (built on CPU,
    cached on ``device``)."""
    pos, frame_lens, order, win_lens, offset = [], [], [], [], 0
    mm = merge * merge
    for t, h, w in grid:
        gh, gw = h // merge, w // merge  # merged grid
        a = torch.arange(merge)
        hh = torch.arange(gh)[:, None, None, None] * merge + a[:, None]  # [gh, 1, m, 1]
        ww = torch.arange(gw)[:, None, None] * merge + a  # [gw, 1, m]
        hw = torch.broadcast_tensors(hh, ww)  # each [gh, gw, m, m]
        pos.append(torch.stack(hw, -1).reshape(-1, 2).repeat(t, 1))
        frame_lens += [h * w] * t
        # window id of every merged token, frames outermost; a stable sort keeps row-major order
        nh, nw = -(-gh // win), -(-gw // win)
        row = torch.arange(t)[:, None, None] * nh + torch.arange(gh)[:, None] // win  # [t, gh, 1]
        wid = (row * nw + torch.arange(gw) // win).flatten()  # [t * gh * gw]
        merged = torch.argsort(wid, stable=True)
        order.append(offset + (merged[:, None] * mm + torch.arange(mm)).flatten())
        win_lens.append(torch.bincount(wid, minlength=t * nh * nw) * mm)
        offset += t * h * w
    frames = Packing.build(torch.arange(offset), torch.tensor(frame_lens))
    windows = Packing.build(torch.cat(order), torch.cat(win_lens))
    return Layout(torch.cat(pos), frames, windows).to(device)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, packing: Packing) -> Tensor:
        n, d = x.shape  # [N, D]
        q, k, v = (p(x).view(n, self.n_heads, -1) for p in (self.q, self.k, self.v))  # [N, H, hd]
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        q, k, v = (packing.pack(t).transpose(1, 2) for t in (q, k, v))  # [S, H, L, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.mask)
        return self.proj(packing.unpack(o.transpose(1, 2)).reshape(n, d))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = _ACT[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, packing: Packing) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, packing)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # kernel == stride == one patch: the Conv3d is a matmul over the flattened patch
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))  # [N, D]


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        out = cfg.out_hidden_size
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_q(x)  # [N, D]
        return self.mlp(x.view(-1, self.mlp[0].in_features))  # [N / m^2, out]


class VisionEncoder(nn.Module):
    """Patches -> visual tokens in LLM space. State dict == ``thinker.visual.*``."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.full = frozenset(cfg.fullatt_block_indexes)

    def layout(self, grid_thw: Tensor) -> Layout:
        """Positions and packings for ``grid_thw`` (cached per grid)."""
        c = self.cfg
        grid = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
        win = c.window_size // c.spatial_merge_size // c.patch_size
        device = self.patch_embed.proj.weight.device
        return vision_layout(grid, c.spatial_merge_size, win, device)

    def rotary(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [N, 1, head_dim]: the first half of the rotated pairs follows h, the
        second w (each with head_dim/4 frequencies), in the half-split ``rotate_half`` layout."""
        inv = inv_freq(self.cfg.head_dim // 2, ROPE_THETA, pos.device)  # [hd/4]
        freqs = (pos[:, :, None].float() * inv).flatten(1)  # [N, hd/2]: h freqs, then w freqs
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [N, 1, hd]
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """pixel_values: [N, C*T*P*P] patches in processor order; grid_thw: [K, 3] (t, h, w) in
        patches per image/video. Returns [N / spatial_merge_size^2, out_hidden_size] in the same
        order (one row per LLM placeholder token)."""
        lay = self.layout(grid_thw)
        cos, sin = self.rotary(lay.pos)
        x = self.patch_embed(pixel_values)  # [N, D]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, lay.frames if i in self.full else lay.windows)
        return self.merger(x)
