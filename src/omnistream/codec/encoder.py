"""The speech tokenizer: 24 kHz speech -> 50 Hz codes in the Talker's codec range.

log mel [80, 100/s] (``codec/features.py``) -> causal conv (k 3) -> causal strided conv (k 4,
stride 2: 50/s) -> ``num_layers`` causal ConvNeXt blocks (depthwise k 7, LayerNorm, MLP) ->
linear to ``len(levels)`` dims -> finite scalar quantisation (FSQ): each dim is bounded with tanh
and rounded to one of ``levels[i]`` values; the code is the mixed-radix number of the rounded
values, in ``[0, prod(levels))``.

Everything is causal, so code ``j`` depends only on mel frames ``<= 2j + 1`` and a bounded past
(``receptive_frames``): ``StreamingEncoder`` recomputes a window of that past and equals the
offline codes exactly. Attribute names equal the checkpoint's under ``codec_encoder.``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.codec.features import N_MELS, StreamingSpeechMel, speech_mel
from omnistream.config import CodecEncoderConfig

MEL_SHIFT, MEL_SCALE = 5.0, 4.0  # log mel (about -11.5 .. 3) -> roughly unit scale


class CausalConv(nn.Conv1d):
    """Conv1d padded on the left only (``kernel - stride`` zeros), so output j sees inputs
    ``<= stride * j + stride - 1``."""

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        return super().forward(F.pad(x, (self.kernel_size[0] - self.stride[0], 0)))


class Block(nn.Module):
    """Causal ConvNeXt block: depthwise conv, LayerNorm, MLP, residual."""

    def __init__(self, dim: int, ffn: int, kernel: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, N]
        h = self.norm(self.dwconv(x).transpose(1, 2))
        return x + self.fc2(F.gelu(self.fc1(h))).transpose(1, 2)


class FSQ(nn.Module):
    """Finite scalar quantisation with a straight-through gradient (no parameters)."""

    def __init__(self, levels: list[int]):
        super().__init__()
        self.levels = list(levels)
        # plain tensors, not buffers: the module may be built on ``meta`` and loaded by assign
        self._levels = torch.tensor(levels, dtype=torch.float32)
        self._basis = torch.cumprod(torch.tensor([1] + list(levels[:-1])), 0)

    @property
    def size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: Tensor) -> Tensor:
        """[..., d] -> values in (-(L-1)/2, (L-1)/2) shifted so rounding gives L values."""
        half = (self._levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [..., d] -> (quantised values with straight-through grad [..., d], codes [...])."""
        b = self.bound(z)
        q = b + (torch.round(b) - b).detach()
        return q, self.to_codes(q)

    def to_codes(self, q: Tensor) -> Tensor:
        digits = (torch.round(q) + self._levels // 2).long()  # [..., d] in [0, L)
        return (digits * self._basis).sum(-1)

    def grid(self) -> Tensor:
        """Quantised values of every code [size, d] (row c = code c)."""
        c = torch.arange(self.size, device=self._basis.device)
        digits = (c[:, None] // self._basis) % self._levels.long()
        return (digits - self._levels.long() // 2).float()


class SpeechEncoder(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.conv_in = CausalConv(N_MELS, d, 3)
        self.down = CausalConv(d, d, 4, stride=2)
        self.blocks = nn.ModuleList(
            Block(d, cfg.intermediate_size, cfg.kernel_size) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, len(cfg.levels))
        self.fsq = FSQ(cfg.levels)

    @property
    def receptive_frames(self) -> int:
        """Mel frames before a code's own two frames that can change it."""
        return 2 + 2 + 2 * self.cfg.num_layers * (self.cfg.kernel_size - 1)

    def latents(self, mel: Tensor) -> Tensor:
        """log mel [B, 80, 2N] -> pre-quantisation latents [B, N, d_q]."""
        x = (mel + MEL_SHIFT) / MEL_SCALE
        h = self.down(F.gelu(self.conv_in(x)))
        for blk in self.blocks:
            h = blk(h)
        return self.proj(self.norm(h.transpose(1, 2)))

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """log mel [B, 80, 2N] -> (quantised values [B, N, d_q], straight-through; codes [B, N])."""
        return self.fsq(self.latents(mel))

    @torch.no_grad()
    def encode(self, wav: np.ndarray | Tensor) -> Tensor:
        """24 kHz mono PCM [n] -> codes [ceil(n / 480)] (int64)."""
        dev = self.proj.weight.device
        return self(speech_mel(wav).to(dev)[None])[1][0]


class StreamingEncoder:
    """Codes for audio arriving in pieces; equal to ``SpeechEncoder.encode`` of the whole clip.

    State: the streaming mel, the mel frames still inside the receptive field, and how many
    codes were emitted. ``push(pcm)`` -> new codes [k]; ``flush()`` -> the remaining codes."""

    def __init__(self, encoder: SpeechEncoder):
        self.enc = encoder
        self.mel = StreamingSpeechMel()
        self.frames = torch.zeros(N_MELS, 0)  # kept frames; the first is frame ``self.base``
        self.base = 0
        self.emitted = 0

    def push(self, pcm: np.ndarray) -> Tensor:
        return self._codes(self.mel.push(pcm))

    def flush(self) -> Tensor:
        return self._codes(self.mel.flush())

    @torch.no_grad()
    def _codes(self, new: Tensor) -> Tensor:
        self.frames = torch.cat([self.frames, new], 1)
        n_codes = (self.base + self.frames.shape[1]) // 2 - self.emitted
        if n_codes <= 0:
            return torch.zeros(0, dtype=torch.long)
        dev = self.enc.proj.weight.device
        codes = self.enc(self.frames.to(dev)[None])[1][0]  # codes from frame ``base`` on
        out = codes[self.emitted - self.base // 2:][:n_codes].cpu()
        self.emitted += n_codes
        # keep an even number of frames covering the next code's receptive field
        keep_from = max(0, 2 * self.emitted - self.enc.receptive_frames)
        keep_from -= keep_from % 2
        if keep_from > self.base:
            self.frames = self.frames[:, keep_from - self.base:]
            self.base = keep_from
        return out
