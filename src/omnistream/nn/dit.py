"""Token2wav's flow-matching DiT (codes -> mel) and its ECAPA-TDNN speaker encoder.

The DiT predicts the flow velocity for a noisy mel ``x`` [B, T, 80] at time ``t`` given a per-frame
condition ``c`` = cat[ECAPA(ref_mel) 128, code embedding 512 (each code repeated ``repeats`` = 2
times), speaker x-vector 192]; the input is ``proj(cat[x, c])``. Blocks are AdaLN-Zero (the time
embedding modulates both sublayers). Attention is block-local: frames form ``block_size``-frame
blocks and layer l sees key blocks in [-back_l, +ahead_l] (back 1 on ``look_backward_layers``,
ahead 1 on ``look_ahead_layers``, 0 elsewhere), so a frame's receptive field per model call is 2
blocks back and 1 ahead. RoPE is applied to head 0 only, on interleaved (even, odd) pairs.

Attribute names equal the checkpoint's names under ``token2wav.code2wav_dit_model.``, including
the stored ``rotary_embed.inv_freq`` buffer (bf16-rounded in the release; loaded as stored,
recomputed when a state dict lacks it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.config import DiTConfig
from omnistream.nn.rope import inv_freq

# --------------------------------------------------------------------------- ECAPA-TDNN


class TDNN(nn.Module):
    """Conv1d ('same' length, reflect padding) + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding="same",
                              padding_mode="reflect")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class Res2Net(nn.Module):
    """Split channels into ``scale`` groups; group 0 passes, group i>0 is conv(x_i + y_{i-1})."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(
            TDNN(channels // scale, channels // scale, kernel, dilation) for _ in range(scale - 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        parts = list(x.chunk(self.scale, dim=1))
        y = None
        for i, block in enumerate(self.blocks, start=1):
            y = block(parts[i] if y is None else parts[i] + y)
            parts[i] = y
        return torch.cat(parts, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, se_channels, 1)
        self.conv2 = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        s = x.mean(dim=2, keepdim=True)
        return x * torch.sigmoid(self.conv2(F.relu(self.conv1(s))))


class SERes2NetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, scale: int, se_channels: int, kernel: int,
                 dilation: int):
        super().__init__()
        self.tdnn1 = TDNN(c_in, c_out)
        self.res2net_block = Res2Net(c_out, scale, kernel, dilation)
        self.tdnn2 = TDNN(c_out, c_out)
        self.se_block = SqueezeExcite(c_out, se_channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _mean_std(x: Tensor, w: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Weighted mean and std over time: x [B, C, T], weights w (sum 1 over T) -> 2 x [B, C, 1]."""
    mean = (w * x).sum(dim=2, keepdim=True)
    std = ((w * (x - mean).pow(2)).sum(dim=2, keepdim=True)).clamp(min=eps).sqrt()
    return mean, std


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling: per-channel attention over time, conditioned on the global
    mean/std, returns cat[weighted mean, weighted std] [B, 2C, 1]."""

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNN(channels * 3, attention_channels)
        self.conv = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        T = x.shape[-1]
        mean, std = _mean_std(x, torch.full_like(x[:, :1], 1.0 / T))
        ctx = torch.cat([x, mean.expand(-1, -1, T), std.expand(-1, -1, T)], dim=1)
        attn = self.conv(torch.tanh(self.tdnn(ctx))).softmax(dim=2)
        return torch.cat(_mean_std(x, attn), dim=1)


class ECAPA(nn.Module):
    """ECAPA-TDNN speaker encoder: ref_mel [B, T, mel_dim] -> embedding [B, enc_dim]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if not len(ch) == len(ks) == len(dil):
            raise ValueError("enc_channels, enc_kernel_sizes and enc_dilations differ in length")
        self.blocks = nn.ModuleList([TDNN(cfg.mel_dim, ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale,
                                              cfg.enc_se_channels, ks[i], dil[i]))
        self.mfa = TDNN(sum(ch[1:-1]), ch[-1], ks[-1], dil[-1])  # multi-layer feature aggregation
        self.asp = AttentiveStatsPool(ch[-1], cfg.enc_attention_channels)
        self.fc = nn.Conv1d(ch[-1] * 2, cfg.enc_dim, 1)

    def forward(self, mel: Tensor) -> Tensor:
        x = mel.transpose(1, 2)  # [B, mel_dim, T]
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        x = self.mfa(torch.cat(feats[1:], dim=1))
        return self.fc(self.asp(x)).squeeze(-1)  # [B, enc_dim]


# --------------------------------------------------------------------------- DiT


class InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim,
                              cfg.hidden_size)
        self.spk_encoder = ECAPA(cfg)


class CodecEmbedding(nn.Module):
    def __init__(self, num_embeds: int, dim: int):
        super().__init__()
        self.codec_embed = nn.Embedding(num_embeds + 1, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of 1000*t (256 dims: sin | cos) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:  # [B] -> [B, dim]
        half = self.freq_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                          * (-math.log(10000.0) / (half - 1)))
        angles = 1000.0 * t.float()[:, None] * freqs
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(t.dtype))


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` [head_dim/2] as a persistent buffer: the release stores it (bf16-rounded
    values, which the model was run with); a state dict without it keeps the computed values."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", inv_freq(head_dim, theta))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "inv_freq"
        if key in missing_keys:
            missing_keys.remove(key)
            if self.inv_freq.is_meta:  # built on meta, loaded with assign=True
                self.inv_freq = inv_freq(self.head_dim, self.theta)

    def forward(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(T, device=device, dtype=torch.float32)
        # an inv_freq rebuilt after an assign=True load is on the CPU wherever the weights are:
        # the state dict this module is handed holds only its own (absent) keys
        angles = pos[:, None] * self.inv_freq.to(device, torch.float32)
        return angles.cos(), angles.sin()  # [T, head_dim/2] each


def _rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (even, odd) pairs of x [..., T, D] by cos/sin [T, D/2]. The result is stored as
    [rotated evens | rotated odds]: q and k share the permutation, so q.k is unchanged."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by the time embedding; ``n`` chunks of modulation."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * n)
        self.n = n

    def modulation(self, temb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(temb))[:, None].chunk(self.n, dim=-1)  # n x [B, 1, dim]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.to_q = nn.Linear(hidden, n_heads * head_dim)
        self.to_k = nn.Linear(hidden, n_heads * head_dim)
        self.to_v = nn.Linear(hidden, n_heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(n_heads * head_dim, hidden)])

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.to_q, self.to_k, self.to_v))  # [B, H, T, hd]
        # RoPE on head 0 only (as trained)
        q = torch.cat([_rope_interleaved(q[:, :1], *rope), q[:, 1:]], dim=1)
        k = torch.cat([_rope_interleaved(k[:, :1], *rope), k[:, 1:]], dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](o.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh"),
                                nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, look_back: int, look_ahead: int):
        super().__init__()
        self.look_back, self.look_ahead = look_back, look_ahead
        self.attn_norm = AdaLayerNormZero(cfg.hidden_size, 6)
        self.attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
        self.ff = FeedForward(cfg.hidden_size, cfg.ff_mult)

    def forward(self, x: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.attn_norm.modulation(temb)
        x = x + gate_a * self.attn(_modulate(x, shift_a, scale_a), rope, mask)
        return x + gate_f * self.ff(_modulate(x, shift_f, scale_f))


def block_mask(T: int, block_size: int, back: int, ahead: int, device: torch.device) -> Tensor:
    """[T, T] bool: query frame i may attend key frame j iff their block offset is in
    [-back, +ahead] (blocks counted from frame 0)."""
    blk = torch.arange(T, device=device) // block_size
    diff = blk[None, :] - blk[:, None]
    return (diff >= -back) & (diff <= ahead)


class DiT(nn.Module):
    """The velocity model. Build the condition once per utterance with ``speaker`` + ``condition``,
    then call ``forward(x, t, c)`` per ODE evaluation."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.hidden_size)
        self.text_embed = CodecEmbedding(cfg.num_embeds, cfg.emb_dim)
        self.input_embed = InputEmbedding(cfg)
        self.rotary_embed = RotaryEmbedding(cfg.head_dim, cfg.theta)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg, int(i in cfg.look_backward_layers), int(i in cfg.look_ahead_layers))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm_out = AdaLayerNormZero(cfg.hidden_size, 2)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.mel_dim)

    def speaker(self, cond: Tensor, ref_mel: Tensor, cfg: bool) -> Tensor:
        """Per-utterance speaker part of the condition: cat[ECAPA(ref_mel), cond] [B', enc_dim +
        enc_emb_dim]. With ``cfg`` the batch doubles: rows [B, 2B) are the unconditional ones
        (zero ref_mel through ECAPA, zero x-vector)."""
        if cfg:
            cond = torch.cat([cond, torch.zeros_like(cond)])
            ref_mel = torch.cat([ref_mel, torch.zeros_like(ref_mel)])
        return torch.cat([self.input_embed.spk_encoder(ref_mel), cond], dim=-1)

    def code_embedding(self, codes: Tensor) -> Tensor:
        """codes [B, N] -> [B, N*repeats, emb_dim]. Codes outside [0, num_embeds] (e.g. the talker's
        special codes) are mapped to code 0, as the official chunked path does."""
        n = self.text_embed.codec_embed.num_embeddings
        codes = torch.where((codes >= 0) & (codes < n), codes, torch.zeros_like(codes))
        return self.text_embed.codec_embed(codes).repeat_interleave(self.cfg.repeats, dim=1)

    def condition(self, codes: Tensor, spk: Tensor, emb: Tensor | None = None) -> Tensor:
        """Per-frame condition c [B', N*repeats, enc_dim + emb_dim + enc_emb_dim] from codes [B, N]
        and ``speaker(...)`` [B', ...]; unconditional rows (B' = 2B) use code 0 everywhere.
        ``emb`` [B, N*repeats, emb_dim] replaces the code embeddings (codec training passes a
        differentiable one)."""
        emb = self.code_embedding(codes) if emb is None else emb
        if spk.shape[0] == 2 * codes.shape[0]:
            emb = torch.cat([emb, self.code_embedding(torch.zeros_like(codes))])
        T, e = emb.shape[1], self.cfg.enc_dim
        spk = spk[:, None].expand(-1, T, -1)
        return torch.cat([spk[..., :e], emb, spk[..., e:]], dim=-1)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """Velocity for noisy mel x [B, T, mel_dim] at times t (scalar or [B]) under condition c
        [B, T, C] -> [B, T, mel_dim]."""
        B, T, _ = x.shape
        temb = self.time_embed(t.reshape(-1).expand(B))  # [B, hidden]
        h = self.input_embed.proj(torch.cat([x, c], dim=-1))
        rope = self.rotary_embed(T, x.device)
        masks: dict[tuple[int, int], Tensor] = {}
        for blk in self.transformer_blocks:
            key = (blk.look_back, blk.look_ahead)
            if key not in masks:
                masks[key] = block_mask(T, self.cfg.block_size, *key, x.device)
            h = blk(h, temb, rope, masks[key])
        scale, shift = self.norm_out.modulation(temb)
        return self.proj_out(_modulate(h, shift, scale))
