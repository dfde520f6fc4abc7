"""Offline loops over a whole batch, in the reference's order: the Thinker writes every reply to
the end, then the Talker speaks them (``generate_text`` then ``generate_codes``).

Tests, benchmarks and batch jobs use these; the streaming engine (``session.py`` +
``speech.py``) drives the same ``nn`` steps one token at a time and interleaves the two stages.
Both build the Talker's input with ``nn/talker.py``'s one builder, so they give the same ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from omnistream.engine.sampling import TALKER_SAMPLING, SamplingParams, sample, seen_mask
from omnistream.nn.talker import Talker
from omnistream.nn.thinker import Media, Thinker, ThinkerStep


@dataclass
class ThinkerGeneration:
    tokens: Tensor  # [B, N] generated ids (pad after a row's eos)
    prompt: ThinkerStep  # the prefill
    reply_hidden: Tensor  # [B, N-1, D] hidden of generated tokens 0..N-2 (the ones fed back)
    reply_embeds: Tensor  # [B, N-1, D]
    eos_ids: tuple[int, ...]  # the ids that ended a reply


@torch.no_grad()
def generate_text(
    thinker: Thinker,
    input_ids: Tensor,  # [B, T], left padded
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_ids: tuple[int, ...] | None = None,  # None: the config's eos
    attention_mask: Tensor | None = None,  # [B, T]
    media: Media | None = None,
    generator: torch.Generator | None = None,
) -> ThinkerGeneration:
    """Greedy / sampled Thinker generation; stops when every row produced an eos id (a row's
    later tokens are the config's pad id)."""
    cfg = thinker.cfg
    eos_ids = (cfg.eos_token_id,) if eos_ids is None else eos_ids
    B, T = input_ids.shape
    dev = input_ids.device
    cache = thinker.model.new_cache(B, T + max_new_tokens)
    step = thinker.prefill(input_ids, cache, attention_mask, media)
    prompt, deltas = step, step.rope_deltas
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_mask(B, step.logits.shape[-1], input_ids, device=dev)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    tokens, hidden, embeds = [], [], []
    for i in range(max_new_tokens):
        tok = sample(step.logits, params, seen, generator)
        tok = torch.where(done, cfg.pad_token_id, tok)
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        step = thinker.decode_step(tok, cache, deltas)
        hidden.append(step.hidden)
        embeds.append(step.embeds)
    empty = prompt.hidden.new_zeros(B, 0, prompt.hidden.shape[-1])
    return ThinkerGeneration(
        torch.stack(tokens, 1),
        prompt,
        torch.cat(hidden, 1) if hidden else empty,
        torch.cat(embeds, 1) if embeds else empty,
        tuple(eos_ids),
    )


@torch.no_grad()
def generate_codes(
    talker: Talker,
    input_ids: Tensor,  # [B, L] the thinker prompt
    thinker: ThinkerGeneration,  # the thinker's finished reply (greedy or sampled)
    text_embed: Callable[[Tensor], Tensor],  # the thinker's token embedding
    speaker_bos: int,
    max_new_tokens: int,
    params: SamplingParams = TALKER_SAMPLING,
    attention_mask: Tensor | None = None,  # [B, L] left padding of the prompt
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The Talker over finished replies: codes [B, n] (codec pad after a row's end) and per-row
    lengths [B] (codes before the first stop id)."""
    dev = input_ids.device
    B, L = input_ids.shape
    tokens, N = thinker.tokens, thinker.tokens.shape[1]
    # row b's reply is r_0 .. r_{n_b - 1}, n_b = its first thinker eos (clamped to [1, N-1]: a
    # reply cut by the token limit ends with its last fed token)
    is_eos = torch.isin(tokens, torch.tensor(thinker.eos_ids, dtype=torch.long, device=dev))
    n = torch.where(is_eos, torch.arange(N, device=dev), N).amin(-1).clamp(1, max(N - 1, 1))
    r = thinker.reply_hidden + thinker.reply_embeds  # [B, N-1, E]
    track = talker.text_track(text_embed, speaker_bos)

    def text(k: int) -> Tensor:  # [B, 1, E]
        return track.at(k, n, r[:, min(k, N - 2)].unsqueeze(1))

    p = thinker.prompt
    cache = talker.new_cache(B, L + 2 + max_new_tokens)
    prompt = talker.prompt_track(input_ids, p.hidden, p.embeds)
    logits = talker.prefill(cache, prompt, p.position_ids, p.rope_deltas, track.bos, text(0),
                            attention_mask)
    seen = seen_mask(B, talker.cfg.vocab_size, torch.tensor(talker.penalty_ids, device=dev)
                     .expand(B, -1), dev)
    stop = torch.tensor(talker.stop_ids, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    codes = []
    for k in range(1, max_new_tokens + 1):
        code = sample(logits, params, seen, generator)
        code = torch.where(done, talker.cfg.tts_codec_pad_token_id, code)
        codes.append(code)
        done |= torch.isin(code, stop)
        if k == max_new_tokens or bool(done.all()):
            break
        logits = talker.step(cache, code, text(k), p.rope_deltas)
    codes = torch.stack(codes, 1)  # [B, n]
    m = codes.shape[1]
    lengths = torch.where(torch.isin(codes, stop), torch.arange(m, device=dev), m).amin(-1)
    return codes, lengths
