"""The three training objectives. Each returns ``(loss_sum, count)``: the loop divides by the
count summed over all micro-batches and processes of the optimizer step, so any split of a global
batch (accumulation, data parallel) gives the same loss and gradients.

* ``thinker_loss``: next-token cross entropy on the assistant text (labels from ``data.encode``).
* ``talker_loss``: next-code cross entropy, teacher forced on the dual-track input the Talker sees
  at inference (facts sheet §8), built by ``nn/talker.py``'s one builder from the Thinker's states
  of prompt and reply. The Thinker runs without gradients unless the stage trains some of its
  parameters (joint training: then the talker loss reaches them).
* ``dpo_loss``: DPO on chosen/rejected code sequences of the same reply, against a frozen
  reference Talker.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.nn.rope import apply_rotary
from omnistream.nn.talker import TextTrack
from omnistream.nn.thinker import Media
from omnistream.train.data import IGNORE


def encode_media(thinker: nn.Module, media: dict[str, list] | None) -> Media | None:
    """Run the encoders on a batch's processed media (``data.collate_media``) -> ``Media``."""
    if not media or not any(media.values()):
        return None
    out = Media()
    if media["audio"]:
        feats = torch.cat([it.features for it in media["audio"]], 1)  # [n_mels, sum(frames)]
        lens = torch.tensor([int(it.feature_len) for it in media["audio"]])
        dev = thinker.lm_head.weight.device
        out.audio_embeds, _ = thinker.audio_tower(feats.to(dev), lens.to(dev))
        out.audio_seqlens = lens
    for kind in ("image", "video"):
        items = media[kind]
        if items:
            px = torch.cat([it.pixel_values for it in items])  # [N, C*T*P*P]
            grid = torch.stack([torch.as_tensor(it.grid_thw) for it in items])  # [K, 3]
            emb = thinker.visual(px.to(thinker.lm_head.weight.device), grid)
            setattr(out, f"{kind}_embeds", emb)
            setattr(out, f"{kind}_grid_thw", grid)
    if media["video"]:
        out.video_second_per_grid = torch.tensor(
            [float(it.second_per_grid) for it in media["video"]]
        )
    return out


def thinker_states(thinker: nn.Module, batch: dict[str, Any],
                   media: Media | None = None) -> tuple[Tensor, Tensor]:
    """Final hidden states and input embeddings [B, T, D] of the whole batch (``media``: the
    batch's encoded media when already computed)."""
    if media is None:
        media = encode_media(thinker, batch["media"])
    embeds = thinker.embed(batch["input_ids"], media)  # [B, T, D]
    hidden = thinker.model(embeds, batch["position_ids"],  # [B, T, D] (causal, right padding)
                           lengths=batch.get("lengths"))
    return hidden, embeds


def media_penalty(media: Media | None, rms_limit: float, std_floor: float) -> Tensor | None:
    """Keeps the encoders' outputs informative (None without media): the mean over media
    tokens of ``relu(rms^2 - rms_limit^2)`` (each output row's root-mean-square above the limit)
    plus, per kind (audio, image, video), the mean over dimensions of ``relu(std_floor - std)``
    (each dimension's spread over the batch's tokens of that kind below the floor; per kind, so
    that audio and image tokens merely differing cannot meet it). 0 turns a term off."""
    rows = [e.float() for e in (media.audio_embeds, media.image_embeds, media.video_embeds)
            if e is not None] if media is not None else []
    if not rows:
        return None
    out = rows[0].new_zeros(())
    if rms_limit > 0:
        out = out + F.relu(torch.cat(rows).pow(2).mean(-1) - rms_limit**2).mean()
    if std_floor > 0:
        spread = [F.relu(std_floor - (e.var(0) + 1e-6).sqrt()).mean() for e in rows
                  if e.shape[0] > 1]
        if spread:
            out = out + torch.stack(spread).mean()
    return out


def thinker_loss(thinker: nn.Module, batch: dict[str, Any], media_rms_limit: float = 0.0,
                 media_std_floor: float = 0.0) -> tuple[Tensor, int]:
    """Summed cross entropy over the assistant-text targets, and their number.

    With ``media_rms_limit`` or ``media_std_floor`` > 0 it adds ``media_penalty`` (weight 1 per
    target token). Encoders trained from scratch otherwise collapse to one constant output
    vector (huge, or small with the limit alone): every media token then looks the same to the
    LLM, and the media carry no information."""
    media = encode_media(thinker, batch["media"])
    hidden, _ = thinker_states(thinker, batch, media)
    labels = batch["labels"]  # [B, T], labels[t] = target of position t
    keep = labels != IGNORE
    logits = thinker.lm_head(hidden[keep]).float()  # [N, V]: only the positions with a target
    n = int(keep.sum())
    loss = F.cross_entropy(logits, labels[keep], reduction="sum")
    penalty = media_penalty(media, media_rms_limit, media_std_floor)  # 0 with both off
    if penalty is not None:
        loss = loss + penalty * n
    return loss, n


# -- talker -------------------------------------------------------------------------------------


def talker_side(
    thinker: nn.Module, talker: nn.Module, batch: dict[str, Any], speaker_bos: int
) -> tuple[Tensor, TextTrack]:
    """The Thinker's half of the talker input: the text track of every position [B, T, D]
    (hidden + embedding, the embedding zeroed at media placeholders) and the voice's
    ``TextTrack``. Computed with gradients only when a Thinker parameter is trainable."""
    joint = torch.is_grad_enabled() and any(p.requires_grad for p in thinker.parameters())
    with torch.set_grad_enabled(joint):
        hidden, embeds = thinker_states(thinker, batch)
        both = talker.prompt_track(batch["input_ids"], hidden, embeds)
        track = talker.text_track(thinker.model.embed_tokens, speaker_bos)
    return both, track


def talker_inputs(
    talker: nn.Module, both: Tensor, track: TextTrack, batch: dict[str, Any],
    codes: list[list[int]], code_noise: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced talker inputs; row i uses example ``i % B`` of the batch and ``codes[i]``.

    Per row, with prompt length P (up to and including ``<|im_start|>assistant\\n``), reply
    tokens r_0..r_{n-1} and codes c_0..c_{m-1}: the prompt's text track ``both[:P]``, then
    ``Talker.teacher_forced`` (the start and m steps, exactly as inference builds them), whose
    positions P+1.. predict c_0..c_{m-1} and then codec eos (``Talker.targets``). Positions: the
    thinker's TMRoPE ids for the prompt, then one more per step on all rows.

    ``code_noise`` > 0 replaces that fraction of the input codes (never the targets) by codes
    drawn from the same row, so the exact previous codes are a less reliable cue to the next
    (at 0.15 it did not make the omni-mini Talker read its text: docs/MINI.md).

    Returns inputs [R, L, D], position ids [3, R, L] and targets [R, L] (-100 = none).
    """
    dev = both.device
    examples = batch["examples"]
    rows, poss, tgts = [], [], []
    for i, cs in enumerate(codes):
        b = i % len(examples)
        P, n = examples[b].reply_start, examples[b].reply_len
        c = torch.tensor([cs], dtype=torch.long, device=dev)  # [1, m]
        m = c.shape[1]
        c_in = c
        if code_noise > 0 and m > 0:
            hit = torch.rand(m, device=dev) < code_noise  # [m]
            c_in = torch.where(hit, c[0, torch.randint(m, (m,), device=dev)], c[0])[None]
        step_state = P + torch.arange(m + 1, device=dev).clamp(max=max(n - 1, 0))
        after = talker.teacher_forced(track, both[b, step_state][None], n, c_in)[0]  # [m+2, D]
        x = torch.cat([both[b, :P], after])  # [P+2+m, D]
        p0 = batch["position_ids"][:, b, :P]  # [3, P]
        tail = p0.max() + 1 + torch.arange(m + 2, device=dev)
        pos = torch.cat([p0, tail.expand(3, -1)], 1)  # [3, P+2+m]
        tgt = torch.full((P + 2 + m,), IGNORE, dtype=torch.long, device=dev)
        tgt[P + 1 :] = talker.targets(c)[0]
        rows.append(x), poss.append(pos), tgts.append(tgt)
    L, R = max(len(r) for r in rows), len(rows)
    x = rows[0].new_zeros(R, L, rows[0].shape[-1])
    pos = torch.zeros(3, R, L, dtype=torch.long, device=dev)
    tgt = torch.full((R, L), IGNORE, dtype=torch.long, device=dev)
    for i in range(R):
        k = len(rows[i])
        x[i, :k], pos[:, i, :k], tgt[i, :k] = rows[i], poss[i], tgts[i]
        pos[:, i, k:] = poss[i].max() + 1 + torch.arange(L - k, device=dev)
    return x, pos, tgt


def talker_logits(talker: nn.Module, x: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
    """Codec logits [N, V] at the ``keep`` positions of the dual-track inputs ``x`` [B, L, D]."""
    h = talker.model(talker.thinker_to_talker_proj(x), pos)  # [B, L, H]
    return talker.codec_head(h[keep]).float()


def unit_attention_targets(batch: dict[str, Any], L: int) -> tuple[Tensor, Tensor] | None:
    """Where the Talker should look while it speaks each unit (``Example.units``): queries
    [B, L] (the positions P+1+t that predict code t, from the end of the previous unit to the end
    of this one, so the silence before a unit already looks at it) and their target keys
    [B, L, L] (the text-track positions P+1+j of the unit's reply tokens j, j <= t). None when
    no example of the batch has units."""
    ex = batch["examples"]
    if not any(e.units for e in ex):
        return None
    q = torch.zeros(len(ex), L, dtype=torch.bool)
    keys = torch.zeros(len(ex), L, L, dtype=torch.bool)
    for b, e in enumerate(ex):
        base, m = e.reply_start + 1, len(e.codes or ())
        prev = 0
        for _, c1, j0, j1 in e.units or ():
            t = torch.arange(prev, min(c1, m))  # [T] the unit's codes (and the gap before it)
            j = torch.arange(j0, min(j1, e.reply_len))  # [J] its reply tokens
            seen = j[None] <= t[:, None]  # [T, J] causal: token j is read at step j
            keys[b, base + t[:, None], base + j[None]] = seen
            q[b, base + t] = seen.any(1)
            prev = c1
    return q, keys


def guided_attention(captured: tuple, attn: nn.Module, head: int, queries: Tensor,
                     keys: Tensor) -> tuple[Tensor, int]:
    """``-log`` of the attention mass that ``head`` of the attention module ``attn`` puts on the
    target ``keys`` [B, L, L], summed over the ``queries`` [B, L], and their number. ``captured``:
    the module's inputs in the forward (normed states [B, L, H], cos, sin, ...)."""
    h, cos, sin = captured[:3]
    D, group = attn.head_dim, attn.n_heads // attn.n_kv_heads
    q = attn.q_proj(h)[..., head * D:(head + 1) * D].unsqueeze(1)  # [B, 1, L, D]
    kv = head // group
    k = attn.k_proj(h)[..., kv * D:(kv + 1) * D].unsqueeze(1)
    q, k = apply_rotary(q, cos, sin)[:, 0], apply_rotary(k, cos, sin)[:, 0]  # [B, L, D]
    queries, keys = queries.to(h.device), keys.to(h.device)
    rows, at = queries.nonzero(as_tuple=True)  # [N] each query's row and position
    scores = ((q @ k.transpose(1, 2)).float() / D**0.5)[rows, at]  # [N, L]
    causal = torch.arange(k.shape[1], device=h.device)[None] <= at[:, None]  # [N, L]
    total = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
    hit = scores.masked_fill(~keys[rows, at], float("-inf")).logsumexp(-1)
    return (total - hit).sum(), int(rows.numel())


def guided_logits(talker: nn.Module, x: Tensor, pos: Tensor, keep: Tensor, layer: int,
                  head: int, targets: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, int]:
    """``talker_logits`` and, from the same forward, ``guided_attention`` of ``head`` of
    ``layer`` on ``targets`` (``unit_attention_targets``): (logits, summed -log mass, count)."""
    attn = talker.model.layers[layer].self_attn
    captured: list[tuple] = []
    hook = attn.register_forward_pre_hook(lambda _, args: captured.append(args))
    try:
        logits = talker_logits(talker, x, pos, keep)
    finally:
        hook.remove()
    return (logits, *guided_attention(captured[0], attn, head, *targets))


def talker_loss(thinker, talker, batch, speaker_bos: int, code_noise: float = 0.0,
                guide: float = 0.0, guide_layer: int = 0, guide_head: int = 0,
                ) -> tuple[Tensor, int]:
    """Summed next-code cross entropy and the number of codes. With ``guide`` > 0 and examples
    that carry ``units``, plus ``guide`` times the mean ``guided_attention`` of head
    ``guide_head`` of layer ``guide_layer`` per guided code, times the number of codes (so
    ``guide`` weighs it per code like the cross entropy): a unit's codes attend to its own reply
    tokens (the Talker reads its text one token per code step, far ahead of the speech). On
    omni-mini it puts that head's mass on the right word of fresh replies (94%) but did not by
    itself make the Talker say the right words (docs/MINI.md)."""
    both, track = talker_side(thinker, talker, batch, speaker_bos)
    x, pos, tgt = talker_inputs(talker, both, track, batch, [ex.codes for ex in batch["examples"]],
                                code_noise)
    keep = tgt != IGNORE
    n_codes = int(keep.sum())
    targets = unit_attention_targets(batch, x.shape[1]) if guide > 0 else None
    if targets is None:
        logits = talker_logits(talker, x, pos, keep)
        return F.cross_entropy(logits, tgt[keep], reduction="sum"), n_codes
    logits, g, n = guided_logits(talker, x, pos, keep, guide_layer, guide_head, targets)
    ce = F.cross_entropy(logits, tgt[keep], reduction="sum")
    return ce + guide * g * (n_codes / max(n, 1)), n_codes


def _seq_logp(talker, x, pos, tgt) -> Tensor:
    """Summed log-probability of each row's targets: [R]."""
    keep = tgt != IGNORE
    logp = talker_logits(talker, x, pos, keep).log_softmax(-1)  # [N, V]
    tok = logp.gather(-1, tgt[keep][:, None])[:, 0]  # [N]
    row = keep.nonzero()[:, 0]  # [N] row of each target
    return torch.zeros(x.shape[0], dtype=tok.dtype, device=x.device).index_add(0, row, tok)


def dpo_loss(
    thinker, talker, ref_talker, batch, speaker_bos: int, beta: float
) -> tuple[Tensor, int]:
    """Summed DPO loss ``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))`` over the pairs
    of the batch (sequence log-probs of the codes + EOS), and the number of pairs."""
    ex = batch["examples"]
    B = len(ex)
    codes = [e.codes for e in ex] + [e.rejected for e in ex]  # rows: chosen then rejected
    both, track = talker_side(thinker, talker, batch, speaker_bos)
    x, pos, tgt = talker_inputs(talker, both, track, batch, codes)
    lp = _seq_logp(talker, x, pos, tgt)  # [2B]
    with torch.no_grad():
        xr, _, _ = talker_inputs(ref_talker, both, track, batch, codes)
        ref = _seq_logp(ref_talker, xr, pos, tgt)
    margin = (lp[:B] - lp[B:]) - (ref[:B] - ref[B:])
    return -F.logsigmoid(beta * margin).sum(), B
