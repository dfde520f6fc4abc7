"""Block-wise Whisper-style audio encoder (``thinker.audio_tower.*``).

Mel frames are cut into chunks of ``2 * n_window`` frames (2 s at 100 frames/s). Each chunk goes
through conv1 (k3, p1) + GELU and conv2 (k3, s2, p1) + GELU, gets sinusoidal positions that restart
at 0, and then pre-LN transformer layers whose attention never leaves the chunk. Per clip the
encoded frames are average-pooled in pairs (an odd last frame is dropped), layer-normed and
projected to the LLM width: a full chunk of 200 mel frames -> 100 encoder frames -> 50 tokens.

Because nothing crosses a chunk boundary before pooling, the whole computation runs on a padded
batch ``[chunks, frames, D]`` with one key-padding mask, and the same code encodes audio
incrementally (``AudioEncoder.stream()``): chunk-by-chunk output equals whole-clip output.

No buffers: the sinusoid table is recomputed per call (a few hundred rows), so the module can be
built on the ``meta`` device and loaded with ``assign=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.config import AudioEncoderConfig

_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def sinusoids(length: int, channels: int, device: torch.device | None = None) -> Tensor:
    """Whisper positions [length, channels]: sin over the first half, cos over the second."""
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, device=device).float())  # [C/2]
    t = torch.arange(length, device=device)[:, None] * inv  # [L, C/2]
    return torch.cat([t.sin(), t.cos()], dim=1)


def conv_lengths(mel_lens: Tensor) -> Tensor:
    """Encoder frames after the stride-2 conv, per chunk or per clip: ceil(n / 2)."""
    return (mel_lens - 1) // 2 + 1


class AudioAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        c, t, d = x.shape  # [C, T, D]
        q, k, v = (
            p(x).view(c, t, self.n_heads, -1).transpose(1, 2)  # [C, H, T, hd]
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [C, H, T, hd]
        return self.out_proj(o.transpose(1, 2).reshape(c, t, d))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = AudioAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = _ACT[cfg.activation_function]

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """Mel features -> audio tokens in LLM space. State dict == ``thinker.audio_tower.*``."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.chunk = 2 * cfg.n_window  # mel frames per attention block
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Embeddings of the <|audio_bos|>/<|audio_eos|> markers; unused by the released model.
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)

    @staticmethod
    def output_lengths(feature_lens: Tensor) -> Tensor:
        """Tokens per clip for ``feature_lens`` mel frames: floor(ceil(n / 2) / 2)."""
        return conv_lengths(feature_lens) // 2

    def encode_chunks(self, chunks: Tensor, lens: Tensor) -> Tensor:
        """Encoder frames before pooling for a batch of independent chunks.

        chunks: [C, n_mels, T] zero-padded mel chunks (T <= 2 * n_window); lens: [C] valid frames.
        Returns [C, ceil(T/2), D]; row c is valid up to ``conv_lengths(lens[c])``."""
        chunks = chunks.to(self.conv1.weight.dtype)
        t = torch.arange(chunks.shape[-1], device=chunks.device)
        x = F.gelu(self.conv1(chunks)) * (t < lens[:, None]).unsqueeze(1).to(chunks.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [C, T', D]
        if x.shape[1] > self.cfg.max_source_positions:
            raise ValueError(f"chunk of {x.shape[1]} frames > max_source_positions")
        # (``scale_embedding`` is ignored, as in the reference: positions are added unscaled)
        x = x + sinusoids(x.shape[1], x.shape[2], x.device).to(x.dtype)
        out_lens = conv_lengths(lens)
        mask = None
        if bool((out_lens < x.shape[1]).any()):
            mask = (torch.arange(x.shape[1], device=x.device) < out_lens[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def head(self, frames: Tensor) -> Tensor:
        """Pool pairs of encoder frames [2n, D] and project: [n, output_dim]."""
        pooled = frames.view(-1, 2, frames.shape[-1]).mean(1)
        return self.proj(self.ln_post(pooled))

    def forward(self, input_features: Tensor, feature_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a batch of clips.

        input_features: [n_mels, sum(feature_lens)], clips concatenated along time (the layout of
        the reference processor's ``input_features[mask]``); feature_lens: [N] mel frames per clip.
        Returns (tokens [sum(token_lens), output_dim], token_lens [N])."""
        chunk_lens = []
        for n in feature_lens.tolist():
            full, tail = divmod(int(n), self.chunk)
            chunk_lens += [self.chunk] * full + ([tail] if tail else [])
        chunks = input_features.T.split(chunk_lens)  # each [t, n_mels]
        padded = nn.utils.rnn.pad_sequence(chunks, batch_first=True).mT  # [C, n_mels, T]
        lens = torch.tensor(chunk_lens, device=input_features.device)
        x = self.encode_chunks(padded, lens)  # [C, T', D]
        valid = torch.arange(x.shape[1], device=x.device) < conv_lengths(lens)[:, None]
        frames = x[valid]  # [sum conv frames, D], clip order
        per_clip = conv_lengths(feature_lens).tolist()
        even = [f[: n - n % 2] for f, n in zip(frames.split(per_clip), per_clip, strict=True)]
        return self.head(torch.cat(even)), self.output_lengths(feature_lens)

    def stream(self) -> AudioStream:
        """A fresh incremental encoder state for one clip."""
        return AudioStream(self)


class AudioStream:
    """Incremental encoding of one clip: ``push`` mel frames as they arrive and get the tokens of
    every 2 s chunk completed so far; ``flush`` encodes the partial last chunk. The concatenated
    outputs equal ``AudioEncoder.forward`` on the whole clip."""

    def __init__(self, encoder: AudioEncoder):
        self.enc = encoder
        self.pending: Tensor | None = None  # [n_mels, t] mel frames not yet encoded, t < chunk
        self.carry: Tensor | None = None  # [1, D] encoder frame waiting for its pooling partner
        self.frames_in = 0  # mel frames pushed so far
        self.tokens_out = 0  # tokens emitted so far

    def _emit(self, chunks: Tensor, lens: Tensor) -> Tensor:
        x = self.enc.encode_chunks(chunks, lens)  # [C, T', D]
        valid = torch.arange(x.shape[1], device=x.device) < conv_lengths(lens)[:, None]
        frames = x[valid]
        if self.carry is not None:
            frames = torch.cat([self.carry, frames])
        n = frames.shape[0] - frames.shape[0] % 2
        self.carry = frames[n:] if n < frames.shape[0] else None
        out = self.enc.head(frames[:n])
        self.tokens_out += out.shape[0]
        return out

    def _empty(self) -> Tensor:
        return self.enc.proj.weight.new_zeros(0, self.enc.proj.out_features)  # [0, output_dim]

    @torch.no_grad()
    def push(self, mel: Tensor) -> Tensor:
        """mel: [n_mels, t] new frames (any t >= 0). Returns [k, output_dim] new tokens, k >= 0."""
        self.frames_in += mel.shape[1]
        buf = mel if self.pending is None else torch.cat([self.pending, mel], dim=1)
        c = self.enc.chunk
        n_full = buf.shape[1] // c
        self.pending = buf[:, n_full * c :]
        if n_full == 0:
            return self._empty()
        chunks = buf[:, : n_full * c].unflatten(1, (n_full, c)).transpose(0, 1)  # [C, n_mels, c]
        return self._emit(chunks, torch.full((n_full,), c, device=mel.device))

    @torch.no_grad()
    def flush(self) -> Tensor:
        """Encode the partial last chunk and end the clip (a dangling odd frame is dropped)."""
        buf, self.pending = self.pending, None
        if buf is None or buf.shape[1] == 0:
            self.carry = None
            return self._empty()
        out = self._emit(buf[None], torch.tensor([buf.shape[1]], device=buf.device))
        self.carry = None
        return out
