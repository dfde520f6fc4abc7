"""Token2wav: talker codes -> mel (flow-matching DiT) -> 24 kHz waveform (BigVGAN). Always float32.

Sampling integrates dx/dt = v(x, t) from x0 ~ N(0, 1) [B, 2N, 80] over ``steps`` time points
``linspace(0, 1)`` warped by the sway schedule t + s*(cos(pi t / 2) - 1 + t), s = -1, with RK4
(3/8 rule, 4 calls per interval: 36 for 10 points) or Euler (1 call per interval). Classifier-free
guidance: v = v_c + g * (v_c - v_u), the unconditional branch having zero x-vector, zero ref_mel
and code 0; both branches run as one batch.

Each code becomes 2 mel frames and each mel frame 240 samples: 480 samples (20 ms) per code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from omnistream.config import Token2WavConfig
from omnistream.nn.bigvgan import HOP, BigVGAN
from omnistream.nn.dit import DiT

SWAY = -1.0  # sway-sampling coefficient of the time schedule
SAMPLES_PER_CODE = 2 * HOP  # 2 mel frames per code (DiT repeats) x 240 samples per frame


def time_points(steps: int, device: torch.device | None = None) -> Tensor:
    """The ``steps`` ODE time points in [0, 1], denser near t = 0 (sway schedule)."""
    t = torch.linspace(0.0, 1.0, steps, device=device, dtype=torch.float32)
    return t + SWAY * (torch.cos(math.pi / 2 * t) - 1 + t)


class Token2Wav(nn.Module):
    def __init__(self, cfg: Token2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.code2wav_dit_model = DiT(cfg.dit_config)
        self.code2wav_bigvgan_model = BigVGAN(cfg.bigvgan_config)

    def _apply(self, fn, recurse=True):
        """Token2wav runs in float32: a parent's dtype cast (``omni.to(torch.bfloat16)``) leaves
        these tensors float32, device moves apply."""

        def keep_f32(t: Tensor) -> Tensor:
            r = fn(t)
            return t.to(r.device) if t.is_floating_point() and r.dtype != t.dtype else r

        return super()._apply(keep_f32, recurse)

    @property
    def device(self) -> torch.device:
        return self.code2wav_dit_model.proj_out.weight.device

    @torch.no_grad()
    def speaker(self, cond: Tensor, ref_mel: Tensor, guidance_scale: float = 0.5) -> Tensor:
        """The per-voice part of the DiT condition (computed once per voice/utterance):
        cond [B, 192] x-vector, ref_mel [B, T_ref, 80] -> [B or 2B, enc_dim + 192]."""
        dev = self.device
        return self.code2wav_dit_model.speaker(
            cond.to(dev, torch.float32), ref_mel.to(dev, torch.float32), cfg=guidance_scale >= 1e-5
        )

    @torch.no_grad()
    def solve(self, codes: Tensor, spk: Tensor, noise: Tensor, steps: int = 10,
              solver: str = "rk4", guidance_scale: float = 0.5) -> Tensor:
        """Integrate the flow from ``noise`` [B, 2N, 80] for codes [B, N] with a precomputed
        ``speaker(...)``; returns mel [B, 80, 2N] (natural log, channel-first for the vocoder)."""
        if solver not in ("rk4", "euler"):
            raise ValueError(f"solver must be 'rk4' or 'euler', not {solver!r}")
        dit = self.code2wav_dit_model
        codes = codes.to(self.device)
        x = noise.to(self.device, torch.float32)
        if x.shape[1] != (T := codes.shape[1] * dit.cfg.repeats):
            raise ValueError(f"noise has {x.shape[1]} frames, the codes need {T}")
        cfg = spk.shape[0] == 2 * codes.shape[0]
        c = dit.condition(codes, spk)

        def velocity(t: Tensor, x: Tensor) -> Tensor:
            if not cfg:
                return dit(x, t, c)
            v_c, v_u = dit(torch.cat([x, x]), t, c).chunk(2)
            return v_c + (v_c - v_u) * guidance_scale

        ts = time_points(steps, x.device)
        for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
            h = t1 - t0
            k1 = velocity(t0, x)
            if solver == "euler":
                x = x + h * k1
                continue
            k2 = velocity(t0 + h / 3, x + h * k1 / 3)
            k3 = velocity(t0 + 2 * h / 3, x + h * (k2 - k1 / 3))
            k4 = velocity(t1, x + h * (k1 - k2 + k3))
            x = x + (k1 + 3 * (k2 + k3) + k4) * h / 8
        return x.transpose(1, 2)

    @torch.no_grad()
    def sample(self, codes: Tensor, cond: Tensor, ref_mel: Tensor, steps: int = 10,
               solver: str = "rk4", guidance_scale: float = 0.5, noise: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """codes [B, N] -> mel [B, 80, 2N]. ``noise`` [B, 2N, 80] fixes the initial state (else
        drawn from ``generator``); ``steps`` time points, ``solver`` "rk4" or "euler"."""
        if noise is None:
            shape = (codes.shape[0], codes.shape[1] * self.code2wav_dit_model.cfg.repeats,
                     self.cfg.dit_config.mel_dim)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else self.device)
        spk = self.speaker(cond, ref_mel, guidance_scale)
        return self.solve(codes, spk, noise, steps, solver, guidance_scale)

    @torch.no_grad()
    def vocode(self, mel: Tensor) -> Tensor:
        """mel [B, 80, T] -> waveform [B, T*240] float32 in [-1, 1]."""
        return self.code2wav_bigvgan_model(mel.to(self.device, torch.float32))

    @torch.no_grad()
    def forward(self, codes: Tensor, cond: Tensor, ref_mel: Tensor, steps: int = 10,
                solver: str = "rk4", guidance_scale: float = 0.5, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """codes [1, N] (+ voice: cond [1, 192], ref_mel [1, T_ref, 80]) -> waveform [N*480]."""
        mel = self.sample(codes, cond, ref_mel, steps, solver, guidance_scale, noise, generator)
        return self.vocode(mel)[0]

