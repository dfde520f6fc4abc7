"""Streaming code2wav: talker codes in, 24 kHz PCM chunks out, as the official chunked path does.

The mel timeline (2 frames per code) is cut into chunks of ``chunk_size`` frames (optionally
doubling up to ``max_chunk_size``). A chunk covering frames [lo, hi) is produced by one DiT solve
over the window [lo - 48, hi + 24) (2 blocks of past, 1 of future: the DiT's per-call receptive
field), from the same slice of one fixed noise buffer; the middle frames are kept. The vocoder then
runs on the 40 previous mel frames + the chunk and keeps [lo - 20, hi - 20) frames' samples (20
frames of vocoder context on either side of every inner boundary); the first chunk starts at 0,
the last runs to the end.

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
                 max_chunk_size: int | None = None, steps: int = 10, solver: str = "rk4",
                 guidance_scale: float = 0.5, noise: Tensor | None = None, seed: int = 0):
        """cond [1, 192], ref_mel [1, T_ref, 80]: the voice. ``chunk_size``: mel frames per chunk,
        a positive multiple of the DiT block size (24); 72 is the official value, 48 halves the
        first-chunk latency. ``noise`` [1, frames, 80] fixes the initial state (it must cover the
        utterance); by default it is drawn from a generator seeded with ``seed``.

        ``max_chunk_size``: chunks double in size from ``chunk_size`` up to this (a multiple of
        24; default: no growth). The first audio still needs only one small chunk, and later
        chunks re-solve less context: each solve covers 48 past + C + 24 future frames, so the
        work per output frame is 2.5x at C = 48 but 1.5x at C = 144. Growing needs the Talker
        ahead of playback (chunk k + 1 waits for C_k more codes), which a real-time engine is."""
        dit_cfg = model.cfg.dit_config
        bs = dit_cfg.block_size
        max_chunk_size = chunk_size if max_chunk_size is None else max_chunk_size
        for name, v in (("chunk_size", chunk_size), ("max_chunk_size", max_chunk_size)):
            if v <= 0 or v % bs:
                raise ValueError(f"{name} must be a positive multiple of {bs}, got {v}")
        self.model, self.C, self.C_max = model, chunk_size, max(max_chunk_size, chunk_size)
        self.repeats, self.mel_dim = dit_cfg.repeats, dit_cfg.mel_dim
        self.past, self.future = 2 * bs, bs  # DiT window context (frames)
        self.steps, self.solver, self.guidance_scale = steps, solver, guidance_scale
        self.spk = model.speaker(cond, ref_mel, guidance_scale)  # ECAPA once per utterance
        self._noise = None if noise is None else noise.to(model.device, torch.float32)
        self._gen = torch.Generator().manual_seed(seed) if noise is None else None
        self._codes = torch.zeros(0, dtype=torch.long, device=model.device)
        self._mel_tail = torch.zeros(1, self.mel_dim, 0, device=model.device)  # [1, 80, <=40]
        self._lo = 0  # first frame of the next chunk
        self._size = chunk_size  # frames of the next chunk
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
        while self._lo + self._size + self.future <= self.frames:
            out.append(self._chunk(self._lo + self._size, final=False))
        return out

    def flush(self) -> list[np.ndarray]:
        """The utterance ended: produce the remaining chunks (the last one runs to the end)."""
        if self._done:
            return []
        self._done = True
        M, out = self.frames, []
        while self._lo < M:
            hi = min(self._lo + self._size, M)
            out.append(self._chunk(hi, final=hi >= M))
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

    def _chunk(self, hi: int, final: bool) -> np.ndarray:
        """Frames [self._lo, hi) -> PCM; advances to the next chunk."""
        M, r = self.frames, self.repeats
        lo = self._lo
        self._lo, self._size = hi, min(2 * self._size, self.C_max)
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
