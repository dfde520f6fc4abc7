"""Talker parity against transformers' Qwen2.5-Omni talker (fp32), and the thinker -> talker
composition against ``Qwen2_5OmniForConditionalGeneration.generate`` (codec ids, no waveform):
the offline loops (``engine/offline.py``, batched, left padding) and the path users run
(``Session.respond`` streaming and offline, and ``omnistream generate``) on a checkpoint written
from the reference's random weights."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, randomize_, tiny_hf_config
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


OVERRIDES = {"thinker_config.vision_start_token_id": VS}


def _reference(seed: int = 1):
    """A tiny ``Qwen2_5OmniForConditionalGeneration`` with every parameter random."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    hf_cfg = tiny_hf_config(**OVERRIDES)
    hf_cfg.thinker_config._attn_implementation = "sdpa"
    hf_cfg.talker_config._attn_implementation = "sdpa"
    ref = Qwen2_5OmniForConditionalGeneration(hf_cfg)
    randomize_(ref.thinker, seed=seed)
    randomize_(ref.talker, seed=seed + 1, std=0.1)
    return ref.eval()


@pytest.fixture(scope="module")
def omni():
    """(reference Qwen2_5OmniForConditionalGeneration, our thinker, our talker)."""
    ref = _reference(seed=1)
    cfg = OmniConfig.from_dict(tiny_config(**OVERRIDES))
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
            kwargs["attention_mask"] = torch.ones(x.shape[0], past + x.shape[1], dtype=torch.long,
                                                  device=x.device)
        return args, kwargs

    ref.talker.generate = capture
    hook = ref.talker.register_forward_pre_hook(give_mask, with_kwargs=True)
    ref.token2wav.forward = lambda codes, **k: torch.zeros(240)
    ref.speaker_map = {
        "Chelsie": {
            "bos_token": SPEAKER_BOS,
            "cond": torch.zeros(1, 192, device=ids.device),
            "ref_mel": torch.zeros(1, 40, 80, device=ids.device),
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


# -- the path users run: Session.respond and the CLI ---------------------------------------------

EOS = 151645  # <|im_end|>
N_CODES = 24
EOS_PROMPT, LENGTH_PROMPT = "Say something short.", "Tell me a long story."


def _write_checkpoint(ref, src: Path, out: Path) -> Path:
    """A released-layout checkpoint (fp32) of the reference's thinker and talker weights, with
    ``src``'s token2wav, configs, tokenizer and voices."""
    from omnistream.checkpoint import read_tensors
    from omnistream.maketiny import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):  # not the weights or their index
            shutil.copy2(f, out / f.name)
    tensors = {f"thinker.{k}": v for k, v in hf_to_ckpt(ref.thinker.state_dict()).items()}
    tensors |= {f"talker.{k}": v for k, v in ref.talker.state_dict().items()}
    tensors |= {k: v.clone() for k, v in read_tensors(src, "token2wav.")}
    write_safetensors(out, [tensors])
    return out


@pytest.fixture(scope="module")
def user_path(tiny_dir, tmp_path_factory):
    """{"plain": (reference, checkpoint dir, ``Engine.load`` of it) with the same random
    weights, "eos": the same with the <|im_end|> row of the LM head made to win at the third
    reply token of ``EOS_PROMPT``} (random weights never end a reply by themselves)."""
    from omnistream.engine.session import Engine

    ref = _reference(seed=5)
    d = _write_checkpoint(ref, tiny_dir, tmp_path_factory.mktemp("plain"))
    plain = Engine.load(d, quiet=True, device=DEVICE)
    done = list(plain.session(max_new_tokens=3, talker_max_new_tokens=1).respond(EOS_PROMPT))[-1]
    ref_eos = copy.deepcopy(ref)
    with torch.no_grad():
        head = ref_eos.thinker.lm_head.weight
        head[EOS] = head[done.text_ids[2]] * 1.1  # scores above the greedy token wherever it wins
    d_eos = _write_checkpoint(ref_eos, tiny_dir, tmp_path_factory.mktemp("eos"))
    eos = Engine.load(d_eos, quiet=True, device=DEVICE)
    return {"plain": (ref.to(DEVICE), d, plain), "eos": (ref_eos.to(DEVICE), d_eos, eos)}


def _until_stop(codes: torch.Tensor) -> list[int]:
    """The reference's codes before its first stop id (the engine never reports stop ids)."""
    out = []
    for c in codes.tolist():
        if c in (8292, 8294):
            break
        out.append(c)
    return out


def _media_messages(tmp: Path, kind: str) -> list[dict]:
    from media_helpers import tone, write_video

    small = {"resized_height": 56, "resized_width": 56}  # 4 tokens per 2 frames
    if kind == "audio-in-video":
        video = write_video(tmp / "aiv.mp4", 20, fps=10, size=(56, 56), audio=(tone(2.0, 16000),
                                                                                 16000))
        content = [{"type": "video", "video": str(video), **small}]
    else:
        video = write_video(tmp / "v.mp4", 20, fps=10, size=(56, 56))
        image = (torch.arange(56 * 56 * 3) % 251).reshape(56, 56, 3).to(torch.uint8).numpy()
        content = [{"type": "audio", "audio": (tone(1.5, 16000)[0], 16000)},
                   {"type": "image", "image": image},
                   {"type": "video", "video": str(video), **small}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": "What is this?"}]}]


@pytest.mark.parametrize("case", ["eos", "eos-offline", "length", "audio-image-video",
                                  "audio-in-video"])
def test_session_codes_match_reference_generate(user_path, case, tmp_path):
    """``Session.respond`` (streaming; once ``offline=True``) gives the reference's greedy text
    and codec ids: a reply ending with <|im_end|>, one cut by the token limit, and prompts with
    audio + image + video and with a video's own audio track."""
    from omnistream.nn.thinker import MEDIA_FIELDS

    ref, _, engine = user_path["eos" if case.startswith("eos") else "plain"]
    aiv = case == "audio-in-video"
    n_text = 5 if case == "length" else 8
    if case.startswith("eos"):
        messages = [{"role": "user", "content": EOS_PROMPT}]
    elif case == "length":
        messages = [{"role": "user", "content": LENGTH_PROMPT}]
    else:
        messages = _media_messages(tmp_path, case)
    sess = engine.session(max_new_tokens=n_text, talker_max_new_tokens=N_CODES,
                          talker_sampling=GREEDY_TALKER, use_audio_in_video=aiv, seed=0)
    done = list(sess.respond(messages, offline=case == "eos-offline"))[-1]

    inputs = engine.processor(messages, add_generation_prompt=True, use_audio_in_video=aiv,
                              speech_output=True)
    assert inputs.input_ids.tolist() == sess.last_prompt_ids  # the features the session used
    media = {k: getattr(inputs, k) for k in MEDIA_FIELDS if getattr(inputs, k) is not None}
    media.pop("use_audio_in_video", None)
    media = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in media.items()}
    if aiv:
        media["use_audio_in_video"] = True
    ids = torch.tensor([sess.last_prompt_ids], device=DEVICE)
    want_text, want_codes = _reference_codes(ref, ids, torch.ones_like(ids), n_text, N_CODES,
                                             media)
    assert done.text_ids == want_text[0].tolist()
    assert done.codec_ids == _until_stop(want_codes[0])
    if case.startswith("eos"):
        assert done.finish_reason == "stop" and done.text_ids[-1] == EOS
        assert len(done.text_ids) > 1  # a reply before the <|im_end|>
    if case == "length":
        assert done.finish_reason == "length" and len(done.text_ids) == n_text
    assert len(done.codec_ids) > len(done.text_ids) + 1  # past the reply: text end, then pad


def test_cli_generate_codes_match_reference_generate(user_path, tmp_path, capsys):
    """``omnistream generate --json`` with a greedy Talker gives the reference's ids."""
    from omnistream.cli import main

    ref, d, _ = user_path["plain"]
    rc = main(["generate", "--model", str(d), "--device", DEVICE, "--prompt", LENGTH_PROMPT,
               "--json", "--max-new-tokens", "5", "--talker-max-new-tokens", str(N_CODES),
               "--talker-temperature", "0", "--out", str(tmp_path / "reply.wav")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = torch.tensor([res["prompt_ids"]], device=DEVICE)
    want_text, want_codes = _reference_codes(ref, ids, torch.ones_like(ids), 5, N_CODES, {})
    assert res["text_ids"] == want_text[0].tolist()
    assert res["codec_ids"] == _until_stop(want_codes[0]) and len(res["codec_ids"]) > 6
