"""Streaming code2wav: talker codes in, 24 kHz PCM chunks out, as the official chunked path does.

The mel timeline (2 frames per code) is cut into chunks of ``chunk_size`` frames. Chunk i covers
frames [iC, iC + C) and is produced by one DiT solve over the window [iC - 48, iC + C + 24) (2
blocks of past, 1 of future: the DiT's per-call receptive field), from the same slice of one fixed
noise buffer; the middle C frames are kept. The vocoder then runs on the 40 previous mel frames +
the chunk and keeps [iC - 20, iC + C - 20) frames' samples (20 frames of vocoder context on either
side of every inner boundary); the first chunk starts at 0, the last runs to the end.

A non-final chunk runs as soon as its window's future frames exist, so the first audio needs C + 24
mel frames = (C + 24) / 2 codes (48 codes = 0.96 s of speech for C = 72; 36 for C = 48). The output
has exactly 480 samples per code. With ``chunk_size`` a multiple of the DiT block size the window's
blocks line up with the offline solve's, and the only departure from offline is the context lost at
the window edges as it spreads over the ODE steps (small; see tests/test_code2wav_stream.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from omnistream.nn.bigvgan import HOP
from omnistream.nn.token2wav import Token2Wav

VOC_PAST = 40  # mel frames of context prepended to each vocoder call
VOC_TRIM = 20  # mel frames of vocoder output dropped at each inner chunk boundary
NOISE_PAGE = 1024  # noise frames drawn per page (pages are drawn in order: deterministic)


class Code2WavStream:
    """Stateful chunked code2wav for one utterance.

    >>> stream = Code2WavStream(model, cond, ref_mel)
    >>> for code in talker_codes: play(stream.push(code))   # each: list of float32 PCM chunks
    >>> play(stream.flush())
    """

    def __init__(self, model: Token2Wav, cond: Tensor, ref_mel: Tensor, *, chunk_size: int = 72,
                 steps: int = 10, solver: str = "rk4", guidance_scale: float = 0.5,
                 noise: Tensor | None = None, seed: int = 0):
        """cond [1, 192], ref_mel [1, T_ref, 80]: the voice. ``chunk_size``: mel frames per chunk,
        a positive multiple of the DiT block size (24); 72 is the official value, 48 halves the
        first-chunk latency. ``noise`` [1, frames, 80] fixes the initial state (it must cover the
        utterance); by default it is drawn from a generator seeded with ``seed``."""
        dit_cfg = model.cfg.dit_config
        bs = dit_cfg.block_size
        if chunk_size <= 0 or chunk_size % bs:
            raise ValueError(f"chunk_size must be a positive multiple of {bs}, got {chunk_size}")
        self.model, self.C = model, chunk_size
        self.repeats, self.mel_dim = dit_cfg.repeats, dit_cfg.mel_dim
        self.past, self.future = 2 * bs, bs  # DiT window context (frames)
        self.steps, self.solver, self.guidance_scale = steps, solver, guidance_scale
        self.spk = model.speaker(cond, ref_mel, guidance_scale)  # ECAPA once per utterance
        self._noise = None if noise is None else noise.to(model.device, torch.float32)
        self._gen = torch.Generator().manual_seed(seed) if noise is None else None
        self._codes = torch.zeros(0, dtype=torch.long, device=model.device)
        self._mel_tail = torch.zeros(1, self.mel_dim, 0, device=model.device)  # [1, 80, <=40]
        self._next = 0  # index of the next chunk to produce
        self._done = False

    @property
    def frames(self) -> int:
        """Mel frames pushed so far (2 per code)."""
        return self._codes.numel() * self.repeats

    def push(self, codes: int | list[int] | Tensor) -> list[np.ndarray]:
        """Append talker codes (int, list or tensor [n] / [1, n]); returns the PCM chunks (float32,
        24 kHz) that became ready, possibly none."""
        if self._done:
            raise RuntimeError("push() after flush()")
        new = torch.as_tensor(codes, dtype=torch.long).reshape(-1).to(self._codes.device)
        self._codes = torch.cat([self._codes, new])
        out = []
        while (self._next + 1) * self.C + self.future <= self.frames:
            out.append(self._chunk(self._next, final=False))
            self._next += 1
        return out

    def flush(self) -> list[np.ndarray]:
        """The utterance ended: produce the remaining chunks (the last one runs to the end)."""
        if self._done:
            return []
        self._done = True
        M, out = self.frames, []
        while self._next * self.C < M:
            out.append(self._chunk(self._next, final=(self._next + 1) * self.C >= M))
            self._next += 1
        return out

    def _noise_window(self, lo: int, hi: int) -> Tensor:
        if self._noise is None or self._noise.shape[1] < hi:
            if self._gen is None:
                raise ValueError(f"noise has {self._noise.shape[1]} frames, {hi} are needed")
            pages = [self._noise] if self._noise is not None else []
            have = sum(p.shape[1] for p in pages)
            while have < hi:
                pages.append(torch.randn(1, NOISE_PAGE, self.mel_dim, generator=self._gen))
                have += NOISE_PAGE
            self._noise = torch.cat([p.to(self.model.device) for p in pages], dim=1)
        return self._noise[:, lo:hi]

    def _chunk(self, i: int, final: bool) -> np.ndarray:
        M, r = self.frames, self.repeats
        lo, hi = i * self.C, min((i + 1) * self.C, M)  # chunk frames
        w_lo, w_hi = max(lo - self.past, 0), min(hi + self.future, M)  # DiT window frames
        mel = self.model.solve(self._codes[None, w_lo // r: w_hi // r], self.spk,
                               self._noise_window(w_lo, w_hi), self.steps, self.solver,
                               self.guidance_scale)[..., lo - w_lo: hi - w_lo]  # [1, 80, hi-lo]
        voc_in = torch.cat([self._mel_tail, mel], dim=-1)
        wav = self.model.vocode(voc_in)[0]
        v_lo = lo - self._mel_tail.shape[-1]  # first frame of the vocoder input
        e_lo, e_hi = max(lo - VOC_TRIM, 0), (hi if final else hi - VOC_TRIM)  # emitted frames
        self._mel_tail = voc_in[..., max(voc_in.shape[-1] - VOC_PAST, 0):]
        return wav[(e_lo - v_lo) * HOP: (e_hi - v_lo) * HOP].cpu().numpy()


@torch.no_grad()
def chunked_code2wav(model: Token2Wav, codes: Tensor, cond: Tensor, ref_mel: Tensor,
                     **stream_kwargs) -> Tensor:
    """The whole chunked path at once: codes [1, N] -> waveform [N*480] (``Code2WavStream`` with
    every code pushed, then flushed)."""
    stream = Code2WavStream(model, cond, ref_mel, **stream_kwargs)
    chunks = stream.push(codes) + stream.flush()
    return torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)
