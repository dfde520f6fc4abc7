"""Thinker parity against transformers' ``Qwen2_5OmniThinkerForConditionalGeneration`` (fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny_hf_config

from omnistream.config import OmniConfig
from omnistream.engine.cache import KVCache
from omnistream.nn import thinker as thinker_mod
from omnistream.nn.thinker import Thinker
from omnistream.tiny import tiny_config

ATOL = 1e-4
VS = 151652  # the 5.24 thinker config lacks vision_start_token_id; the release json has it


def hf_to_ckpt(sd: dict) -> dict:
    """transformers-5 module names -> checkpoint names (under ``thinker.``)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "model.")
        k = k.replace("model.audio_tower.", "audio_tower.").replace("model.visual.", "visual.")
        out[k] = v
    return out


def build(**overrides):
    """(reference, ours) tiny thinkers with identical random weights."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    overrides = {"thinker_config.vision_start_token_id": VS, **overrides}
    hf_cfg = tiny_hf_config(**overrides).thinker_config
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = randomize_(Qwen2_5OmniThinkerForConditionalGeneration(hf_cfg)).eval()
    ours = Thinker(OmniConfig.from_dict(tiny_config(**overrides)).thinker_config).eval()
    sd = hf_to_ckpt(ref.state_dict())
    if thinker_mod.AudioEncoder is None:  # encoders not written yet: text-only comparison
        sd = {k: v for k, v in sd.items() if not k.startswith(("audio_tower.", "visual."))}
    ours.load_state_dict(sd, strict=True)
    return ref, ours


def text_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150000, (B, T), generator=g)


@pytest.fixture(scope="module")
def pair():
    return build()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@torch.no_grad()
def test_text_logits(kv_heads):
    ref, ours = build(**{"thinker_config.text_config.num_key_value_heads": kv_heads})
    ids = text_ids(2, 11)
    want = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    pos, _ = ours.position_ids(ids)
    got, _ = ours(ours.embed(ids), pos)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_final_hidden_matches_reference(pair):
    ref, ours = pair
    ids = text_ids(1, 9)
    out = ref(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    cache = ours.model.new_cache(1, 16)
    step = ours.prefill(ids, cache)
    torch.testing.assert_close(step.hidden, out.hidden_states[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.embeds, out.hidden_states[0], atol=0, rtol=0)


@torch.no_grad()
def test_prefill_decode_equals_full_forward(pair):
    _, ours = pair
    ids = text_ids(2, 14, seed=1)
    pos, _ = ours.position_ids(ids)
    full, _ = ours(ours.embed(ids), pos)
    cache = ours.model.new_cache(2, 32)
    step = ours.prefill(ids[:, :8], cache)
    torch.testing.assert_close(step.logits, full[:, 7], atol=ATOL, rtol=0)
    for t in range(8, 14):
        step = ours.decode_step(ids[:, t], cache, step.rope_deltas)
        torch.testing.assert_close(step.logits, full[:, t], atol=ATOL, rtol=0)
    assert cache.length == 14


@torch.no_grad()
def test_chunked_prefill_equals_full(pair):
    _, ours = pair
    ids = text_ids(2, 13, seed=2)
    one = ours.prefill(ids, ours.model.new_cache(2, 16))
    chunked = ours.prefill(ids, ours.model.new_cache(2, 16), chunk_size=4)
    torch.testing.assert_close(chunked.logits, one.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked.hidden, one.hidden, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_crop_and_reset(pair):
    _, ours = pair
    ids = text_ids(1, 10, seed=3)
    cache = ours.model.new_cache(1, 16)
    a = ours.prefill(ids, cache)
    cache.crop(6)  # roll back, then redo the tail
    b = ours.prefill(ids[:, 6:], cache, position_offset=6)
    torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)
    cache.reset()
    c = ours.prefill(ids, cache)
    torch.testing.assert_close(c.logits, a.logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        KVCache(1, 1, 1, 4, 2).mark(None, 3)


@torch.no_grad()
def test_left_padding_matches_unpadded(pair):
    ref, ours = pair
    long, short = text_ids(1, 12, seed=4), text_ids(1, 7, seed=5)
    pad = torch.full((1, 5), 151643)
    ids = torch.cat([long, torch.cat([pad, short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    gen = ours.generate(ids, 6, attention_mask=mask, eos_ids=())
    for row, alone in ((0, long), (1, short)):
        single = ours.generate(alone, 6, eos_ids=())
        assert torch.equal(gen.tokens[row], single.tokens[0])
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen.tokens, want[:, ids.shape[1] :])


@torch.no_grad()
def test_greedy_matches_reference_generate(pair):
    ref, ours = pair
    ids = text_ids(2, 10, seed=6)
    want = ref.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
    )
    got = ours.generate(ids, 32, eos_ids=())
    assert got.tokens.shape == (2, 32)
    assert torch.equal(got.tokens, want[:, ids.shape[1] :])
