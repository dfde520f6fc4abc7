"""int8 weight-only quantization: kernel vs dequantized matmul, and the tiny Thinker's int8 logits
against fp32 over a generated reply (max abs diff and top-1 agreement are printed; bounds loose)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_
from torch import nn

from omnistream.config import OmniConfig
from omnistream.engine import quant
from omnistream.engine.offline import generate_text
from omnistream.engine.quant import (
    Int8Linear,
    int8_state_dict,
    quantize_int8_,
    swap_int8_,
    weight_bytes,
)
from omnistream.nn.thinker import Thinker
from omnistream.tiny import tiny_config


def tiny_thinker(seed: int = 0) -> Thinker:
    cfg = OmniConfig.from_dict(tiny_config()).thinker_config
    torch.manual_seed(seed)
    return randomize_(Thinker(cfg), seed=seed).eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_int8_linear_equals_dequantized(bias, dtype):
    lin = nn.Linear(96, 40, bias=bias).to(dtype)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 96, dtype=dtype)
    deq = q.weight.float() * q.scales.float()[:, None]  # [N, K]
    want = x.float() @ deq.T + (lin.bias.float() if bias else 0)
    tol = 2e-2 if dtype == torch.float32 else 5e-2  # fp32 inputs run the CPU kernel in bf16
    torch.testing.assert_close(q(x).float(), want, atol=tol, rtol=tol)
    if dtype == torch.float32:
        q.cpu_bf16_activations = False  # exact fp32 activations
        torch.testing.assert_close(q(x), want, atol=1e-4, rtol=1e-4)
    # the quantization error itself is bounded by half a step per weight
    assert (deq - lin.weight.float()).abs().max() <= q.scales.float().max() / 2 + 1e-6


@torch.no_grad()
def test_fallback_path_matches_kernel(monkeypatch):
    lin = nn.Linear(64, 32)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    a = q(x)
    monkeypatch.setattr(
        quant, "_PACK_OK", {("cpu", torch.float32): False, ("cpu", torch.bfloat16): False}
    )
    b = q(x)  # F.linear on the dequantized weight, fp32
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_filter_selects_decoder_and_head_only():
    m = tiny_thinker()
    names = quantize_int8_(m)
    assert "lm_head" in names
    assert all(n.startswith("model.layers.") or n == "lm_head" for n in names)
    assert len(names) == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert not any(isinstance(mod, nn.Linear) for n, mod in m.model.layers.named_modules())


@torch.no_grad()
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_thinker_vs_fp32_over_a_reply(bits):
    fp = tiny_thinker()
    q8 = tiny_thinker()
    if bits == 8:
        quantize_int8_(q8)
    else:
        names = quant.quantize_int4_(q8, group_size=32)  # tiny hidden 64: groups of 32
        assert "lm_head" in names and len(names) == 1 + 7 * len(q8.model.layers)
    assert weight_bytes(q8.model.layers) < weight_bytes(fp.model.layers) / (3 if bits == 8 else 5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, 12), generator=g)
    n_new = 32
    gen = generate_text(fp, ids, max_new_tokens=n_new, eos_ids=(-1,))  # greedy fp32 reply
    seq = torch.cat([ids, gen.tokens], 1)  # [1, T + N]
    # teacher-force the fp32 reply through both models, compare logits at every reply position
    outs = []
    for m in (fp, q8):
        cache = m.model.new_cache(1, seq.shape[1])
        step = m.prefill(seq[:, : ids.shape[1]], cache)
        logits = [step.logits]
        for t in range(ids.shape[1], seq.shape[1] - 1):
            step = m.decode_step(seq[:, t], cache, step.rope_deltas)
            logits.append(step.logits)
        outs.append(torch.stack(logits, 1))  # [1, N, V]
    a, b = outs
    max_abs = (a - b).abs().max().item()
    scale = a.abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(
        f"\nint{bits} vs fp32 tiny thinker over {a.shape[1]} reply positions: "
        f"max|dlogit| = {max_abs:.4g} (max|logit| = {scale:.3g}), top-1 agreement = {agree:.1%}"
    )
    assert max_abs < (0.1 if bits == 8 else 0.3) * scale
    assert agree >= (0.8 if bits == 8 else 0.6)


@torch.no_grad()
def test_before_load_path_equals_after_load():
    fp = tiny_thinker()
    after = tiny_thinker()
    names = quantize_int8_(after)
    sd = int8_state_dict(fp.state_dict(), names)
    with torch.device("meta"):
        before = Thinker(OmniConfig.from_dict(tiny_config()).thinker_config)
    swap_int8_(before, names)
    before.load_state_dict(sd, assign=True, strict=True)
    before.eval()
    ids = torch.randint(0, 150000, (2, 9), generator=torch.Generator().manual_seed(1))
    pos, _ = after.position_ids(ids)
    want, _ = after(after.embed(ids), pos)
    got, _ = before(before.embed(ids), pos)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, width, changed", [
    (torch.float32, 64, True),  # 39 MB fp32 head: column-major decodes faster
    (torch.bfloat16, 64, False),  # bf16 kernels prefer row-major
    (torch.float32, 16, False),  # 10 MB: below MIN_BYTES
])
def test_head_layout_by_shape_keeps_name_shape_and_values(dtype, width, changed):
    from omnistream.engine import layout

    torch.manual_seed(0)
    head = torch.nn.Linear(width, 151936, bias=False).to(dtype)
    x = torch.randn(1, 3, width, dtype=dtype)
    want = head(x)
    param = head.weight
    assert layout.tune_head_layout_(head) is changed
    assert layout.tune_head_layout_(head) is False  # already decided
    assert head.weight is param and [n for n, _ in head.named_parameters()] == ["weight"]
    assert head.weight.stride() == ((1, 151936) if changed else (width, 1))
    assert head.weight.shape == (151936, width)
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5)


def test_tied_head_shares_its_new_layout_with_the_embedding():
    from omnistream.engine import layout

    emb = torch.nn.Embedding(151936, 64)
    head = torch.nn.Linear(64, 151936, bias=False)
    head.weight = emb.weight  # tied: one parameter
    ids = torch.tensor([[0, 5, 151935]])
    want_e, want_h = emb(ids), head(emb(ids))
    assert layout.tune_head_layout_(head)
    assert head.weight is emb.weight and emb.weight.stride() == (1, 151936)
    assert torch.equal(emb(ids), want_e)
    torch.testing.assert_close(head(emb(ids)), want_h, rtol=1e-5, atol=1e-5)


def test_quantize_weight_of_a_column_major_weight():
    q = torch.nn.Linear(64, 8, bias=False)
    q.weight = torch.nn.Parameter(q.weight.detach().t().contiguous().t())  # column-major input
    from omnistream.engine.quant import quantize_weight

    w8, _ = quantize_weight(q.weight)
    assert w8.is_contiguous()


@torch.no_grad()
def test_int4_linear_equals_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=True)
    q, sz = quant.quantize_weight_int4(lin.weight, 64)
    assert q.min() >= 0 and q.max() <= 15
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # [N, K / G]
    deq = ((q.float().reshape(48, 4, 64) - 8) * scale[..., None] + zero[..., None]).reshape(48, 256)
    assert (deq - lin.weight).abs().max() <= scale.max() * 0.51 + 1e-3  # round to nearest level
    x = torch.randn(5, 256)
    got = quant.Int4Linear(lin, 64)(x)
    want = x.bfloat16().float() @ deq.t() + lin.bias
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 activations
    assert not quant.int4_ok(nn.Linear(256, 40), 64)  # N must be a multiple of 16
