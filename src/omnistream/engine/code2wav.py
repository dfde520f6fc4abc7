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

``first_future`` < 24 lets the first chunk start before its look-ahead block exists (0: after C / 2
codes, 12 for C = 24). Its last block is then solved without the block it attends to ahead, but
only its first C - 20 frames are voiced at once (4 frames = 40 ms for C = 24); the next window
reaches one block further back (``Chunk.refresh``) and its solve of that block, now with its
future, replaces the stored one before the rest of it is voiced. What departs from the official
path is those first C - 20 frames and the vocoder context around them.

``push`` / ``flush`` are built from smaller pieces (``append``, ``next_chunk`` to plan a chunk,
``run`` to synthesise it) so that a scheduler can synthesise the chunks of several streams at
once: ``decode_chunks`` stacks the DiT solves whose windows have the same length (and the vocoder
calls whose inputs do), and runs the rest one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

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
                 guidance_scale: float = 0.5, noise: Tensor | None = None, seed: int = 0,
                 first_future: int | None = None, spk: Tensor | None = None):
        """cond [1, 192], ref_mel [1, T_ref, 80]: the voice. ``chunk_size``: mel frames per chunk,
        a positive multiple of the DiT block size (24); 72 is the official value, 48 halves the
        first-chunk latency. ``noise`` [1, frames, 80] fixes the initial state (it must cover the
        utterance); by default it is drawn from a generator seeded with ``seed``.

        ``max_chunk_size``: chunks double in size from ``chunk_size`` up to this (a multiple of
        24; default: no growth). The first audio still needs only one small chunk, and later
        chunks re-solve less context: each solve covers 48 past + C + 24 future frames, so the
        work per output frame is 2.5x at C = 48 but 1.5x at C = 144. Growing needs the Talker
        ahead of playback (chunk k + 1 waits for C_k more codes), which a real-time engine is.

        ``first_future``: mel frames of look-ahead the first chunk waits for, 0..24 (default 24,
        one DiT block, as the official path; see the module docstring).

        ``spk``: the voice's ``model.speaker(cond, ref_mel, guidance_scale)``, when the caller
        keeps it (``Engine.voice_condition``); by default it is computed here."""
        dit_cfg = model.cfg.dit_config
        bs = dit_cfg.block_size
        max_chunk_size = chunk_size if max_chunk_size is None else max_chunk_size
        for name, v in (("chunk_size", chunk_size), ("max_chunk_size", max_chunk_size)):
            if v <= 0 or v % bs:
                raise ValueError(f"{name} must be a positive multiple of {bs}, got {v}")
        self.model, self.C, self.C_max = model, chunk_size, max(max_chunk_size, chunk_size)
        self.repeats, self.mel_dim = dit_cfg.repeats, dit_cfg.mel_dim
        self.past, self.future = 2 * bs, bs  # DiT window context (frames): 2 blocks, 1
        self.first_future = bs if first_future is None else first_future
        if not 0 <= self.first_future <= bs:
            raise ValueError(f"first_future must be 0..{bs}, got {first_future}")
        self.steps, self.solver, self.guidance_scale = steps, solver, guidance_scale
        if spk is None:
            spk = model.speaker(cond, ref_mel, guidance_scale)  # ECAPA once per utterance
        self.spk = spk
        self._noise = None if noise is None else noise.to(model.device, torch.float32)
        self._gen = torch.Generator().manual_seed(seed) if noise is None else None
        self._codes = torch.zeros(0, dtype=torch.long, device=model.device)
        self._mel_tail = torch.zeros(1, self.mel_dim, 0, device=model.device)  # [1, 80, <=40]
        self._lo = 0  # first frame of the next chunk
        self._size = chunk_size  # frames of the next chunk
        self._short = False  # the last planned chunk's last block was solved without its future
        self._done = False

    @property
    def frames(self) -> int:
        """Mel frames pushed so far (2 per code)."""
        return self._codes.numel() * self.repeats

    def push(self, codes: int | list[int] | Tensor) -> list[np.ndarray]:
        """Append talker codes (int, list or tensor [n] / [1, n]); returns the PCM chunks (float32,
        24 kHz) that became ready, possibly none."""
        self.append(codes)
        return [self.run(c) for c in iter(self.next_chunk, None)]

    def flush(self) -> list[np.ndarray]:
        """The utterance ended: produce the remaining chunks (the last one runs to the end)."""
        self.close()
        return [self.run(c) for c in iter(self.next_chunk, None)]

    # -- the pieces of push / flush (a scheduler batches ``run`` across streams: decode_chunks) --

    def append(self, codes: int | list[int] | Tensor) -> None:
        """Append talker codes without synthesising anything."""
        if self._done:
            raise RuntimeError("push() after flush()")
        new = torch.as_tensor(codes, dtype=torch.long).reshape(-1).to(self._codes.device)
        self._codes = torch.cat([self._codes, new])

    def close(self) -> None:
        """No more codes: ``next_chunk`` now also plans the last chunks, to the end."""
        self._done = True

    def next_chunk(self) -> Chunk | None:
        """Plan the next chunk whose inputs exist (None: wait for more codes). Chunks must be
        ``run`` in the order they are planned."""
        M = self.frames
        fut = self.first_future if self._lo == 0 else self.future  # the same however codes come
        if not self._done:
            if self._lo + self._size + fut > M:
                return None
            hi, final = self._lo + self._size, False
        elif self._lo < M:
            hi = min(self._lo + self._size, M)
            final = hi >= M
        else:
            return None
        lo, refresh = self._lo, self._short
        w_lo = max(lo - self.past - (self.future if refresh else 0), 0)  # + 1 block
        w_hi = min(hi + fut, M)
        self._short = not final and w_hi < hi + self.future
        self._lo, self._size = hi, min(2 * self._size, self.C_max)
        return Chunk(lo, hi, w_lo, w_hi, final, refresh)

    def dit_inputs(self, c: Chunk) -> tuple[Tensor, Tensor]:
        """The DiT window's codes [1, (w_hi - w_lo) / 2] and noise [1, w_hi - w_lo, 80]."""
        r = self.repeats
        return self._codes[None, c.w_lo // r : c.w_hi // r], self._noise_window(c.w_lo, c.w_hi)

    def vocoder_input(self, c: Chunk, window_mel: Tensor) -> Tensor:
        """The window's solved mel [1, 80, w_hi - w_lo] -> the vocoder input [1, 80, <=40 + C]
        (the previous frames, then the chunk's); keeps the tail for the next chunk."""
        mel = window_mel[..., c.lo - c.w_lo : c.hi - c.w_lo]  # [1, 80, hi - lo]
        if c.refresh:  # the stored last block lacked its future; this window solved it with it
            k = min(self.future, self._mel_tail.shape[-1])  # that block
            fresh = window_mel[..., c.lo - k - c.w_lo : c.lo - c.w_lo]
            self._mel_tail = torch.cat([self._mel_tail[..., : self._mel_tail.shape[-1] - k],
                                        fresh], dim=-1)
        voc_in = torch.cat([self._mel_tail, mel], dim=-1)
        c.voc_lo = c.lo - self._mel_tail.shape[-1]  # first frame of the vocoder input
        self._mel_tail = voc_in[..., max(voc_in.shape[-1] - VOC_PAST, 0) :]
        return voc_in

    def output(self, c: Chunk, wav: Tensor) -> np.ndarray:
        """The vocoder's waveform [T * 240] of ``vocoder_input`` -> the chunk's PCM."""
        e_lo, e_hi = max(c.lo - VOC_TRIM, 0), (c.hi if c.final else c.hi - VOC_TRIM)
        return wav[(e_lo - c.voc_lo) * HOP : (e_hi - c.voc_lo) * HOP].cpu().numpy()

    def run(self, c: Chunk) -> np.ndarray:
        """Synthesise one planned chunk alone."""
        codes, noise = self.dit_inputs(c)
        mel = self.model.solve(codes, self.spk, noise, self.steps, self.solver,
                               self.guidance_scale)
        return self.output(c, self.model.vocode(self.vocoder_input(c, mel))[0])

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


@dataclass
class Chunk:
    """One planned chunk: output frames [lo, hi), DiT window frames [w_lo, w_hi)."""

    lo: int
    hi: int
    w_lo: int
    w_hi: int
    final: bool
    refresh: bool = False  # the window reaches a block further back: it re-solves the stored
    # last block of a chunk that ran without its look-ahead (``first_future``)
    voc_lo: int = 0  # first frame of its vocoder input (set by ``vocoder_input``)


@torch.no_grad()
def decode_chunks(work: list[tuple[Code2WavStream, Chunk]]) -> list[np.ndarray]:
    """Planned chunks of several streams (one model) -> their PCM, in order. Chunks whose DiT
    windows have the same length and ODE settings are solved as one batch (their vocoder
    inputs likewise when of equal length); the rest run in groups of one. Each stream's noise,
    codes and speaker stay its own, so a row's numbers are its solo numbers up to float
    rounding."""
    mels: list[Tensor | None] = [None] * len(work)
    for idx in _groups([(c.w_hi - c.w_lo, s.steps, s.solver, s.guidance_scale, s.spk.shape[0])
                        for s, c in work]):
        s0 = work[idx[0]][0]
        inputs = [s.dit_inputs(c) for s, c in (work[i] for i in idx)]
        spk = torch.stack([work[i][0].spk for i in idx], 1)  # [1 or 2, b, C]: cond, then uncond
        mel = s0.model.solve(torch.cat([x[0] for x in inputs]), spk.flatten(0, 1),
                             torch.cat([x[1] for x in inputs]), s0.steps, s0.solver,
                             s0.guidance_scale)  # [b, 80, w]
        for j, i in enumerate(idx):
            mels[i] = mel[j : j + 1]
    voc = [s.vocoder_input(c, m) for (s, c), m in zip(work, mels, strict=True)]
    out: list[np.ndarray | None] = [None] * len(work)
    for idx in _groups([v.shape[-1] for v in voc]):
        wav = work[idx[0]][0].model.vocode(torch.cat([voc[i] for i in idx]))  # [b, T * 240]
        for j, i in enumerate(idx):
            out[i] = work[i][0].output(work[i][1], wav[j])
    return out


def _groups(keys: list) -> list[list[int]]:
    """Indices of equal ``keys``, grouped (first appearance first)."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


@torch.no_grad()
def chunked_code2wav(model: Token2Wav, codes: Tensor, cond: Tensor, ref_mel: Tensor,
                     **stream_kwargs) -> Tensor:
    """The whole chunked path at once: codes [1, N] -> waveform [N*480] (``Code2WavStream`` with
    every code pushed, then flushed)."""
    stream = Code2WavStream(model, cond, ref_mel, **stream_kwargs)
    chunks = stream.push(codes) + stream.flush()
    return torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)
