"""Thinker parity against transformers' ``Qwen2_5OmniThinkerForConditionalGeneration`` (fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny_hf_config

from omnistream.bench.common import VS, hf_thinker_to_ckpt
from omnistream.config import OmniConfig
from omnistream.engine.offline import generate_text
from omnistream.nn.cache import KVCache
from omnistream.nn.thinker import Thinker
from omnistream.tiny import tiny_config

ATOL = 1e-4
hf_to_ckpt = hf_thinker_to_ckpt  # transformers-5 names -> checkpoint names (test_talker uses it)


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
    text = "thinker_config.text_config."  # a small vocabulary keeps the three builds cheap
    ref, ours = build(**{text + "num_key_value_heads": kv_heads, text + "vocab_size": 4096})
    ids = text_ids(2, 11) % 4096
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
    gen = generate_text(ours, ids, 6, attention_mask=mask, eos_ids=())
    for row, alone in ((0, long), (1, short)):
        single = generate_text(ours, alone, 6, eos_ids=())
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
    got = generate_text(ours, ids, 32, eos_ids=())
    assert got.tokens.shape == (2, 32)
    assert torch.equal(got.tokens, want[:, ids.shape[1] :])


def mm_prompt(seed: int = 0, batch: int = 1):
    """Token ids with expanded audio / image / video placeholders plus random processor-shaped
    inputs: (input_ids [B, T], attention_mask [B, T], media kwargs for the reference). Row b > 0
    has a shorter leading text and is left-padded."""
    g = torch.Generator().manual_seed(seed)
    mel, valid = 320, 300  # padded mel frames, real frames -> 75 audio tokens
    image_grid, video_grid = (1, 4, 4), (2, 4, 8)

    def text(n):
        return torch.randint(0, 150000, (n,), generator=g).tolist()

    rows = []
    for b in range(batch):
        ids = text(5 - 2 * b) + [151647] + [151646] * 75 + [151648] + text(3)
        ids += [VS, *[151655] * 4, 151653] + text(2) + [VS, *[151656] * 16, 151653] + text(4)
        rows.append(ids)
    T = max(len(r) for r in rows)
    input_ids = torch.tensor([[151643] * (T - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    fmask = torch.zeros(batch, mel, dtype=torch.long)
    fmask[:, :valid] = 1
    n_img, n_vid = (
        image_grid[0] * image_grid[1] * image_grid[2],
        video_grid[0] * video_grid[1] * video_grid[2],
    )
    media = dict(
        input_features=torch.randn(batch, 128, mel, generator=g) * fmask[:, None],
        feature_attention_mask=fmask,
        pixel_values=torch.randn(batch * n_img, 1176, generator=g),
        image_grid_thw=torch.tensor([image_grid] * batch),
        pixel_values_videos=torch.randn(batch * n_vid, 1176, generator=g),
        video_grid_thw=torch.tensor([video_grid] * batch),
        video_second_per_grid=torch.tensor([1.0] * batch),
    )
    return input_ids, attention_mask, media


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_multimodal_logits(pair, batch):
    ref, ours = pair
    ids, mask, media = mm_prompt(batch=batch)
    want = ref(input_ids=ids, attention_mask=mask, **media).logits
    m = ours.encode_media(media) if batch == 2 else ours.encode_media(**media)  # mapping / kwargs
    pos, _ = ours.position_ids(ids, mask, m)
    got, _ = ours(ours.embed(ids, m), pos, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_multimodal_greedy_matches_reference(pair):
    ref, ours = pair
    ids, mask, media = mm_prompt(seed=1, batch=2)
    ref.model.rope_deltas = None
    want = ref.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **media
    )
    m = ours.encode_media(**media)
    got = generate_text(ours, ids, 12, attention_mask=mask, media=m, eos_ids=())
    assert torch.equal(got.tokens, want[:, ids.shape[1] :])
    chunked = ours.prefill(ids, ours.model.new_cache(2, 160), mask, ours.encode_media(**media), 16)
    torch.testing.assert_close(chunked.logits, got.prompt.logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_meta_build_and_assign_load(pair):
    """Built on ``meta`` and loaded with ``assign=True`` (no buffers to materialise)."""
    _, ours = pair
    with torch.device("meta"):
        lazy = Thinker(ours.cfg)
    assert not list(lazy.model.buffers())
    lazy.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ids = text_ids(1, 6, seed=8)
    a = ours.prefill(ids, ours.model.new_cache(1, 8))
    b = lazy.prefill(ids, lazy.model.new_cache(1, 8))
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)


def aiv_prompt(seed: int = 0):
    """One video with its audio track (use_audio_in_video): 4 frames at 1 s per grid -> two
    2-second chunks of 8 video tokens, 75 audio tokens split 50 + 25, laid out V0 A0 V1 A1."""
    g = torch.Generator().manual_seed(seed)
    mel = 300
    body = [151656] * 8 + [151646] * 50 + [151656] * 8 + [151646] * 25
    ids = torch.randint(0, 150000, (6,), generator=g).tolist() + [VS, 151647, *body, 151648, 151653]
    ids += torch.randint(0, 150000, (3,), generator=g).tolist()
    media = dict(
        input_features=torch.randn(1, 128, mel, generator=g),
        feature_attention_mask=torch.ones(1, mel, dtype=torch.long),
        pixel_values_videos=torch.randn(4 * 4 * 4, 1176, generator=g),
        video_grid_thw=torch.tensor([[4, 4, 4]]),
        video_second_per_grid=torch.tensor([1.0]),
        use_audio_in_video=True,
    )
    ids = torch.tensor([ids])
    return ids, torch.ones_like(ids), media


@torch.no_grad()
def test_audio_in_video_matches_reference(pair):
    ref, ours = pair
    ids, mask, media = aiv_prompt()
    want = ref(input_ids=ids, attention_mask=mask, **media).logits
    m = ours.encode_media(**media)
    pos, _ = ours.position_ids(ids, mask, m)
    got, _ = ours(ours.embed(ids, m), pos)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    ref.model.rope_deltas = None
    want = ref.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **media
    )
    got = generate_text(ours, ids, 6, media=m, eos_ids=())
    assert torch.equal(got.tokens, want[:, ids.shape[1] :])
