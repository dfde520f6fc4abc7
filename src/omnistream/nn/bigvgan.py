"""Token2wav's BigVGAN vocoder: log-mel [B, 80, T] -> waveform [B, T*240] at 24 kHz.

The DiT's natural-log mel is turned into normalised dB (amplitude -> dB floored at -115, minus
20 dB, mapped to [-1, 1]); conv_pre; six transposed-conv upsamplers (5*3*2*2*2*2 = 240), each
followed by the mean of three AMP residual blocks; an anti-aliased SnakeBeta; conv_post; clamp to
±1 (no tanh). AMP blocks apply SnakeBeta at twice the sample rate (kaiser-sinc up/down filters,
12 taps) so the activation's harmonics do not alias.

Attribute names equal the checkpoint's under ``token2wav.code2wav_bigvgan_model.``. The fixed
anti-alias filter is not a checkpoint tensor; it is computed once per device (no buffer, so the
model can be built on ``meta`` and loaded with ``assign=True``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.config import BigVGANConfig

HOP = 240  # output samples per mel frame (product of the upsample rates)
AA_RATIO = 2  # anti-alias oversampling factor
AA_TAPS = 12  # kaiser-sinc filter length (6 * ratio)


def kaiser_sinc(cutoff: float, half_width: float, taps: int) -> Tensor:
    """Kaiser-windowed sinc low-pass filter [taps], unit DC gain (cutoff in cycles/sample)."""
    half = taps // 2
    atten = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95  # Kaiser's formula (dB)
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, periodic=False, beta=beta, dtype=torch.float32)
    n = torch.arange(-half, half) + 0.5 if taps % 2 == 0 else torch.arange(taps) - half
    h = 2 * cutoff * window * torch.sinc(2 * cutoff * n)
    return h / h.sum()


@functools.cache
def _aa_filter(device: torch.device) -> Tensor:
    """The low-pass shared by the x2 upsampler and downsampler: [1, 1, 12]."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd (training)
        h = kaiser_sinc(0.5 / AA_RATIO, 0.6 / AA_RATIO, AA_TAPS)
        return h.view(1, 1, -1).to(device)


def replicate_pad(x: Tensor, left: int, right: int) -> Tensor:
    """``F.pad(x, (left, right), mode="replicate")`` for x [B, C, T], as one concatenation: torch's
    replication_pad1d kernel is about 5x slower on CPU and took 11% of the vocoder's time."""
    B, C, _ = x.shape
    return torch.cat([x[..., :1].expand(B, C, left), x, x[..., -1:].expand(B, C, right)], -1)


def anti_aliased(act: nn.Module, x: Tensor) -> Tensor:
    """act applied at 2x rate: upsample (zero-stuff + low-pass, replicate-padded edges), act,
    low-pass + decimate. x [B, C, T] -> [B, C, T]."""
    C, r, k = x.shape[1], AA_RATIO, AA_TAPS
    h = _aa_filter(x.device).to(x.dtype)
    pad = k // r - 1
    # the upsampler's gain r folded into its taps
    y = F.conv_transpose1d(replicate_pad(x, pad, pad), (h * r).expand(C, -1, -1), stride=r,
                           groups=C)
    crop = pad * r + (k - r) // 2  # both sides equal for even k - r
    y = act(y[..., crop:-crop])
    return F.conv1d(replicate_pad(y, k // 2 - 1, k // 2), h.expand(C, -1, -1), stride=r, groups=C)


class SnakeBeta(nn.Module):
    """x + sin^2(a x) / b with per-channel a = exp(alpha), b = exp(beta)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        a = self.alpha.exp()[:, None]
        inv_b = 1.0 / (self.beta.exp()[:, None] + 1e-9)
        if torch.is_grad_enabled():
            return x + inv_b * torch.sin(x * a).pow(2)
        # inference: the same arithmetic in one buffer (a 2x-rate signal per call, memory-bound)
        s = torch.mul(x, a).sin_()
        return s.mul_(s).mul_(inv_b).add_(x)


class AntiAliasedSnake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)

    def forward(self, x: Tensor) -> Tensor:
        return anti_aliased(self.act, x)


class AMPBlock(nn.Module):
    """Three residual units: x += conv2(act(conv1_d(act(x)))), dilations d of conv1 = (1, 3, 5)."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )
        self.activations = nn.ModuleList(
            AntiAliasedSnake(channels) for _ in range(2 * len(dilations))
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            x = x + c2(self.activations[2 * i + 1](c1(self.activations[2 * i](x))))
        return x


def mel_to_input(mel: Tensor) -> Tensor:
    """Natural-log mel -> normalised dB in [-1, 1]: 20*log10(max(e^mel, 10^-5.75)) - 20 dB, then
    [-115, 0] dB -> [-1, 1]."""
    db = (mel * (20.0 / math.log(10.0))).clamp(min=-115.0) - 20.0
    return (2.0 * (db + 115.0) / 115.0 - 1.0).clamp(-1.0, 1.0)


class BigVGAN(nn.Module):
    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        ch0, n_up = cfg.upsample_initial_channel, len(cfg.upsample_rates)
        self.n_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(cfg.mel_dim, ch0, 7, padding=3)
        rates, kernels = cfg.upsample_rates, cfg.upsample_kernel_sizes
        self.ups = nn.ModuleList(  # one-element lists: the checkpoint's ``ups.i.0.*`` names
            nn.ModuleList([nn.ConvTranspose1d(ch0 >> i, ch0 >> i + 1, k, r, padding=(k - r) // 2)])
            for i, (r, k) in enumerate(zip(rates, kernels, strict=True))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock(ch0 >> (i + 1), k, d)
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.activation_post = AntiAliasedSnake(ch0 >> n_up)
        self.conv_post = nn.Conv1d(ch0 >> n_up, 1, 7, padding=3, bias=False)

    def forward(self, mel: Tensor) -> Tensor:
        """mel [B, mel_dim, T] (natural log) -> waveform [B, T*240] in [-1, 1]."""
        x = self.conv_pre(mel_to_input(mel))
        n = self.n_kernels
        for i, (up,) in enumerate(self.ups):
            x = up(x)
            x = sum(rb(x) for rb in self.resblocks[i * n:(i + 1) * n]) / n
        x = self.conv_post(self.activation_post(x))
        return x.squeeze(1).clamp(-1.0, 1.0)
