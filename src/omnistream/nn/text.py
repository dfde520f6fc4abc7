"""The Qwen2 decoder stack shared by the Thinker and the Talker.

Pre-norm blocks (RMSNorm) with GQA attention (q/k/v with bias, o without), M-RoPE and a SiLU-gated
MLP. Attribute names are the checkpoint's: ``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``layers.N.mlp.{gate,up,down}_proj``, ``layers.N.{input,post_attention}_layernorm``, ``norm``.

``TextModel.forward`` takes input *embeddings* (the callers merge media features / add codec
embeddings first) and works with or without a ``KVCache``; with one, the T new tokens are appended
at ``cache.length`` (prefill, chunked prefill and decode are the same call).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.nn.cache import CacheRows, KVCache, KVPool
from omnistream.nn.rope import MRoPE, apply_rotary


class DecoderConfig(Protocol):
    """What ``TextModel`` reads: satisfied by ``TextConfig`` and ``TalkerConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    theta: float
    mrope_section: list[int]


@torch.no_grad()
def fuse_linears(linears: list[nn.Linear], max_numel: int | None = None) -> nn.Linear | None:
    """One ``nn.Linear`` computing ``linears`` (same input) side by side, or None when they are
    not all plain ``nn.Linear`` layers of one dtype and device with or without bias alike, or
    the fused weight would exceed ``max_numel`` elements.

    Decoding one token multiplies a vector by many small matrices, and each call has a fixed
    cost (dispatch, thread wake-up) that dominates a small model's step; one call for q, k and v
    (or gate and up) pays it once. The parts' parameters become views of the fused weight and
    bias, so the state dict (names, shapes, values) and the memory stay as they were. For
    inference only: the parts no longer require gradients, and converting the module's dtype
    or device afterwards would separate the parts from the fused copy."""
    first = linears[0]
    if any(type(m) is not nn.Linear for m in linears):
        return None
    same = {(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}
    out = sum(m.out_features for m in linears)
    if len(same) != 1 or (max_numel is not None and out * first.in_features > max_numel):
        return None
    weight = torch.cat([m.weight for m in linears])  # [sum out, in]
    bias = None if first.bias is None else torch.cat([m.bias for m in linears])
    fused = nn.Linear(first.in_features, out, bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    lo = 0
    for m in linears:
        hi = lo + m.out_features
        m.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
        lo = hi
    return fused


def scatter_rows(x: Tensor, rows: Tensor, B: int, T: int) -> Tensor:
    """x [N, C] at flat positions ``rows`` [N] of a [B, T] layout -> [B, T, C], zeros elsewhere."""
    return x.new_zeros(B * T, x.shape[-1]).index_copy(0, rows, x).view(B, T, -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self._qkv: nn.Linear | None = None  # q, k, v in one matmul (``fuse_``); not a child

    def fuse_(self, max_numel: int | None = None) -> bool:
        """Project q, k and v with one matmul from now on (``fuse_linears``). Returns whether
        they were fused."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj], max_numel)
        object.__setattr__(self, "_qkv", fused or self._qkv)
        return fused is not None

    def project_rows(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [..., hidden] -> q [..., H * D], k and v [..., H_kv * D] (no rotary)."""
        if self._qkv is not None:
            nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            return self._qkv(x).split([nq, nk, nk], -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, hidden] -> q [B, H, T, D], k and v [B, H_kv, T, D]."""
        return self._heads(*self.project_rows(x))

    def _heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, H * D], k and v [B, T, H_kv * D] -> [B, H|H_kv, T, D]."""
        B, T = q.shape[:2]
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # [B, T, hidden]
        cos: Tensor,  # [B, 1, T, D]
        sin: Tensor,
        mask: Tensor | None,  # bool [B|1, 1, T, S] or None
        is_causal: bool,
        cache: KVCache | CacheRows | None,
        layer: int,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)  # [B, H, T, D], [B, Hkv, T, D] x 2
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(cache, CacheRows):  # new tokens for each of several sessions' caches
            o = cache.attend(layer, q, k, v, gqa)  # [B, H, T, D]
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)  # [B, Hkv, S, D]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
            )  # [B, H, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def forward_tokens(self, x: Tensor, rows: Tensor, shape: tuple[int, int], cos: Tensor,
                       sin: Tensor) -> Tensor:
        """Causal attention over right-padded rows given only their real tokens: x [N, hidden]
        at flat positions ``rows`` [N] of a [B, T] batch; returns [N, hidden]. The projections
        see the N tokens only; attention sees the padded [B, T] layout, padding as zeros that
        no real token attends (they come after it)."""
        B, T = shape
        q, k, v = self.project_rows(x)  # [N, H * D], [N, H_kv * D] x 2
        qkv = scatter_rows(torch.cat([q, k, v], -1), rows, B, T)  # [B, T, (H + 2 H_kv) D]
        q, k, v = self._heads(*qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B * T, -1)[rows])  # [N, hidden]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._gate_up: nn.Linear | None = None  # gate and up in one matmul (``fuse_``)

    def fuse_(self, max_numel: int | None = None) -> bool:
        """Project gate and up with one matmul from now on (``fuse_linears``)."""
        fused = fuse_linears([self.gate_proj, self.up_proj], max_numel)
        object.__setattr__(self, "_gate_up", fused or self._gate_up)
        return fused is not None

    def forward(self, x: Tensor) -> Tensor:
        if self._gate_up is not None:
            gate, up = self._gate_up(x).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = Attention(
            h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        self.mlp = MLP(h, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache, layer, tokens=None) -> Tensor:
        """``tokens`` = (rows, (B, T)): x [N, hidden] holds only the real tokens of right-padded
        rows (``Attention.forward_tokens``). One entry point, so that hooks on the layer (FSDP's
        unsharding) run on both paths."""
        h = self.input_layernorm(x)
        if tokens is not None:
            x = x + self.self_attn.forward_tokens(h, *tokens, cos, sin)
        else:
            x = x + self.self_attn(h, cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(
    start: int, T: int, valid: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The SDPA mask for T queries at slots [start, start+T) over keys [0, start+T).

    ``valid`` [B, start+T] marks real (non-padding) keys, or None when there is no padding.
    Returns ``(mask, is_causal)``; the mask is None on the fast paths (plain causal prefill, or a
    single decode token). Every query may see its own slot, so padded rows never go all -inf.
    """
    S = start + T
    if valid is None:
        if start == 0:
            return None, T > 1
        if T == 1:
            return None, False
    q = torch.arange(start, S, device=device)[:, None]  # [T, 1]
    kpos = torch.arange(S, device=device)[None, :]  # [1, S]
    mask = (kpos <= q)[None, None]  # [1, 1, T, S]
    if valid is not None:
        mask = (mask & valid[:, None, None, :S]) | (kpos == q)[None, None]  # [B, 1, T, S]
    return mask, False


class TextModel(nn.Module):
    """Qwen2 decoder: embeddings in, final normed hidden states out.

    ``embed_tokens`` is ``Embedding(vocab_size, embedding_size)`` (``embedding_size`` defaults to
    ``hidden_size``; the Talker's is the Thinker's hidden size and is projected by its caller).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        emb = getattr(cfg, "embedding_size", cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, emb)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRoPE(cfg.head_dim, cfg.theta, cfg.mrope_section)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A static cache sized for this stack (dtype/device default to the weights')."""
        w = self.norm.weight
        return KVCache(
            len(self.layers),
            batch_size,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            max_len,
            dtype=dtype or w.dtype,
            device=device or w.device,
        )

    def fuse_projections_(self, max_numel: int | None = None) -> int:
        """Fuse every layer's q/k/v and gate/up projections for decoding (``fuse_linears``;
        parts over ``max_numel`` elements stay separate). Returns how many groups were fused."""
        return sum(m.fuse_(max_numel) for m in self.modules() if isinstance(m, Attention | MLP))

    def new_pool(self, slots: int, max_len: int) -> KVPool:
        """``slots`` one-row caches of ``max_len`` in one tensor per layer (weights' dtype and
        device), decoded together through ``CacheRows``."""
        w = self.norm.weight
        return KVPool(len(self.layers), slots, self.cfg.num_key_value_heads, self.cfg.head_dim,
                      max_len, dtype=w.dtype, device=w.device)

    def forward(
        self,
        x: Tensor,  # [B, T, hidden] input embeddings
        position_ids: Tensor,  # [3, B, T] (or [B, T] for text-only)
        cache: KVCache | CacheRows | None = None,
        attention_mask: Tensor | None = None,  # [B, T] 1 = token, 0 = left padding
        lengths: Tensor | None = None,  # [B] real tokens of right-padded rows, without a cache
    ) -> Tensor:  # [B, T, hidden] after the final norm
        """With a ``CacheRows`` (T == its padded count) every row extends its own cache; the
        rows' masks live in ``CacheRows.attend``. With ``lengths`` (training's right-padded
        batches) only each row's first ``lengths[b]`` tokens go through the projections and
        MLPs (a batch of mixed lengths is a third padding), and the padded outputs are zeros."""
        B, T = x.shape[:2]
        cos, sin = self.rotary(position_ids, x.dtype)
        if lengths is not None and cache is None and attention_mask is None:
            real = torch.arange(T, device=x.device)[None] < lengths.to(x.device)[:, None]
            rows = real.reshape(-1).nonzero().squeeze(1)  # [N] flat positions of real tokens
            h = x.reshape(B * T, -1)[rows]  # [N, hidden]
            for i, layer in enumerate(self.layers):
                h = layer(h, cos, sin, None, True, None, i, tokens=(rows, (B, T)))
            return scatter_rows(self.norm(h), rows, B, T)
        if isinstance(cache, CacheRows):
            if T != cache.T or attention_mask is not None:
                raise ValueError(f"CacheRows takes {cache.T} right-padded tokens per row, not {T}")
            mask, is_causal = None, False
        else:
            if cache is None:
                start = 0
                valid = None if attention_mask is None else attention_mask.to(torch.bool)
            else:
                start = cache.length
                cache.mark(attention_mask, T)
                valid = cache.valid[:, : start + T] if cache.has_padding else None
            mask, is_causal = build_mask(start, T, valid, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)
