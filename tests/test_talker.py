"""Talker parity against transformers' Qwen2.5-Omni talker (fp32), and the thinker -> talker
composition against ``Qwen2_5OmniForConditionalGeneration.generate`` (codec ids, no waveform)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny_hf_config
from test_thinker import VS, aiv_prompt, hf_to_ckpt, mm_prompt, text_ids

from omnistream.config import OmniConfig
from omnistream.engine.offline import generate_codes, generate_text
from omnistream.engine.sampling import SamplingParams
from omnistream.nn.talker import Talker
from omnistream.nn.thinker import Thinker
from omnistream.tiny import tiny_config

ATOL = 1e-4
SPEAKER_BOS = 151872  # "Chelsie"
GREEDY_TALKER = SamplingParams(temperature=0, repetition_penalty=1.05, suppress_ids=(8293,))


@pytest.fixture(scope="module")
def omni():
    """(reference Qwen2_5OmniForConditionalGeneration, our thinker, our talker)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    overrides = {"thinker_config.vision_start_token_id": VS}
    hf_cfg = tiny_hf_config(**overrides)
    hf_cfg.thinker_config._attn_implementation = "sdpa"
    hf_cfg.talker_config._attn_implementation = "sdpa"
    ref = Qwen2_5OmniForConditionalGeneration(hf_cfg)
    randomize_(ref.thinker, seed=1)
    randomize_(ref.talker, seed=2, std=0.1)
    ref.eval()
    cfg = OmniConfig.from_dict(tiny_config(**overrides))
    thinker, talker = Thinker(cfg.thinker_config).eval(), Talker(cfg.talker_config).eval()
    sd = hf_to_ckpt(ref.thinker.state_dict())
    thinker.load_state_dict(sd, strict=True)
    talker.load_state_dict(ref.talker.state_dict(), strict=True)
    return ref, thinker, talker


@torch.no_grad()
def test_talker_logits_prefill_and_steps(omni):
    ref, _, talker = omni
    B, L, E = 2, 9, talker.cfg.embedding_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(B, L, E, generator=g)
    bos, reply = torch.randn(1, 1, E, generator=g), torch.randn(B, 4, E, generator=g)
    ids = text_ids(B, L)
    text_ids_ = torch.cat([ids, torch.full((B, 1), SPEAKER_BOS), torch.full((B, 1), 1000)], 1)
    codec_ids = torch.cat([torch.full((B, L), 8296), torch.tensor([[8292, 8293]]).expand(B, -1)], 1)
    embeds = torch.cat([prompt, bos.expand(B, 1, E), reply[:, :1]], 1)
    mask = torch.ones(B, L + 2, dtype=torch.long)
    ref.talker.rope_deltas = None
    out = ref.talker(
        input_ids=codec_ids,
        input_text_ids=text_ids_,
        inputs_embeds=embeds.clone(),
        attention_mask=mask,
        use_cache=True,
    )
    rcache = out.cache

    cache = talker.new_cache(B, 32)
    pos = torch.arange(L).expand(3, B, L)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    got = talker.prefill(cache, prompt, pos, deltas, bos[0, 0], reply[:, :1])
    torch.testing.assert_close(got, out.logits[:, -1], atol=ATOL, rtol=0)

    codes = torch.tensor([17, 4000])
    for k in range(1, 4):
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        out = ref.talker(
            input_ids=codes[:, None],
            thinker_reply_part=reply[:, k:],
            cache=rcache,
            attention_mask=mask,
            use_cache=True,
        )
        got = talker.step(cache, codes, reply[:, k : k + 1], deltas)
        torch.testing.assert_close(got, out.logits[:, -1], atol=ATOL, rtol=0)
        codes = (codes * 7 + 11) % 8192


def _reference_codes(ref, ids, mask, n_text, n_codes, media):
    """Codec ids from the reference's full generate (token2wav stubbed out).

    transformers 5.24's ``generate`` drops an all-ones attention mask before the first forward,
    and its talker only adds the codec pad/bos embeddings (and computes its rope deltas) when it
    gets a mask: without padding it silently skips them (a regression; 4.x and the release add
    them, facts §8). The wrapper below hands the talker the all-ones mask it should have got, so
    the reference follows its intended path; with left padding the mask survives and the wrapper
    is a no-op."""
    captured = []
    talker_generate = ref.talker.generate

    def capture(*a, **k):
        captured.append(talker_generate(*a, **k))
        return captured[-1]

    def give_mask(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            x = kwargs.get("inputs_embeds")
            x = x if x is not None else kwargs["input_ids"]
            cache = kwargs.get("cache")
            past = cache.get_seq_length() if cache is not None else 0
            kwargs["attention_mask"] = torch.ones(x.shape[0], past + x.shape[1], dtype=torch.long)
        return args, kwargs

    ref.talker.generate = capture
    hook = ref.talker.register_forward_pre_hook(give_mask, with_kwargs=True)
    ref.token2wav.forward = lambda codes, **k: torch.zeros(240)
    ref.speaker_map = {
        "Chelsie": {
            "bos_token": SPEAKER_BOS,
            "cond": torch.zeros(1, 192),
            "ref_mel": torch.zeros(1, 40, 80),
        }
    }
    ref.talker.rope_deltas = None
    ref.thinker.model.rope_deltas = None
    # pixels go to the thinker only (5.24 would also hand them to talker.generate, which rejects
    # them); grids / seconds per grid / feature masks are shared, as the reference intends
    media = {("thinker_" + k if k.startswith("pixel_values") else k): v for k, v in media.items()}
    try:
        text, _ = ref.generate(
            input_ids=ids,
            attention_mask=mask,
            speaker="Chelsie",
            thinker_max_new_tokens=n_text,
            thinker_do_sample=False,
            thinker_eos_token_id=151645,
            talker_max_new_tokens=n_codes,
            talker_do_sample=False,
            **media,
        )
    finally:
        del ref.talker.generate
        hook.remove()
    return text[:, ids.shape[1] :], captured[0][:, ids.shape[1] + 2 :]


@pytest.mark.parametrize("prompt", ["text", "text-padded", "media-padded", "audio-in-video"])
@torch.no_grad()
def test_greedy_codes_match_reference_generate(omni, prompt):
    ref, thinker, talker = omni
    if prompt == "media-padded":  # audio + image + video; placeholders zeroed on the text track
        ids, mask, media = mm_prompt(seed=3, batch=2)
    elif prompt == "audio-in-video":
        ids, mask, media = aiv_prompt(seed=4)
    else:
        ids, mask, media = text_ids(2, 10, seed=7), None, {}
        mask = torch.ones_like(ids)
        if prompt == "text-padded":
            ids[1, :3], mask[1, :3] = 151643, 0
    n_text, n_codes = 8, 20
    want_text, want_codes = _reference_codes(ref, ids, mask, n_text, n_codes, media)

    m = thinker.encode_media(**media) if media else None
    gen = generate_text(thinker, ids, n_text, attention_mask=mask, media=m)
    assert torch.equal(gen.tokens, want_text)
    codes, lengths = generate_codes(
        talker, ids, gen, thinker.model.embed_tokens, SPEAKER_BOS, n_codes, GREEDY_TALKER, mask
    )
    assert codes.shape[1] > n_text + 2  # the codes run past the reply (end / pad text tokens)
    assert torch.equal(codes, want_codes[:, : codes.shape[1]])
    assert codes.shape[1] == want_codes.shape[1]
