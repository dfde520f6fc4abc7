"""Token sampling: small logit processors composed by ``sample``.

The order is the reference's (transformers ``generate``): repetition penalty, suppressed ids,
then temperature, top-k, top-p. ``temperature == 0`` means greedy (argmax after the penalty and
suppression). Everything stays on the device: the repetition-penalty state is a ``[B, V]`` bool
mask updated by scatter, and random sampling uses the exponential-race trick
(``argmax(p / Exp(1))``), which draws from ``p`` without ``torch.multinomial``'s host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k best logits; 0 = off
    top_p: float = 1.0  # nucleus mass; 1.0 = off
    repetition_penalty: float = 1.0  # >1 discourages ids already seen; 1.0 = off
    suppress_ids: tuple[int, ...] = ()  # ids that are never produced

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


# Talker defaults from the release (facts §8): top_k 40, top_p 0.8, T 0.9, penalty 1.05, no bos.
TALKER_SAMPLING = SamplingParams(
    temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, suppress_ids=(8293,)
)
# ``generation_config.json`` keys a checkpoint may set for its Talker (the names of transformers'
# ``generate`` arguments for this model); the release's file has none, so it gets the above.
TALKER_CONFIG_KEYS = {"talker_temperature": "temperature", "talker_top_k": "top_k",
                      "talker_top_p": "top_p", "talker_repetition_penalty": "repetition_penalty"}


def talker_sampling_from(generation_config: dict) -> SamplingParams:
    """The Talker sampling a checkpoint asks for: its ``talker_*`` keys over ``TALKER_SAMPLING``;
    ``talker_do_sample: false`` means greedy. A small Talker trained here speaks more clearly
    greedy than at the release's temperature."""
    changes = {f: generation_config[k] for k, f in TALKER_CONFIG_KEYS.items()
               if generation_config.get(k) is not None}
    if generation_config.get("talker_do_sample") is False:
        changes["temperature"] = 0.0
    try:
        p = replace(TALKER_SAMPLING, **changes)
        ok = (p.temperature >= 0 and p.top_k >= 0 and 0 < p.top_p <= 1
              and p.repetition_penalty > 0)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"bad Talker sampling in generation_config.json: {changes}")
    return p


def seen_mask(batch_size: int, vocab_size: int, ids: Tensor | None = None, device=None) -> Tensor:
    """A ``[B, V]`` bool mask of ids already produced (for the repetition penalty)."""
    mask = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
    if ids is not None and ids.numel():
        mark_seen_(mask, ids.to(mask.device))
    return mask


def mark_seen_(seen: Tensor, ids: Tensor) -> Tensor:
    """Add ``ids`` ([B] or [B, n]) to ``seen`` [B, V] in place."""
    ids = ids.reshape(seen.shape[0], -1)
    return seen.scatter_(1, ids, True)


def repetition_penalty_(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive / multiply negative logits of seen ids by ``penalty`` (in place)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return logits.copy_(torch.where(seen, penalized, logits))


def suppress_(logits: Tensor, ids: tuple[int, ...]) -> Tensor:
    if ids:
        logits[..., list(ids)] = -float("inf")
    return logits


def top_k_(logits: Tensor, k: int) -> Tensor:
    if 0 < k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
        logits.masked_fill_(logits < kth, -float("inf"))
    return logits


def top_p_(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of best ids whose probability mass exceeds ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill_(drop.scatter(-1, order, drop), -float("inf"))


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """Apply the processors to ``logits`` [B, V] (a float32 copy; the input is untouched)."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen is not None:
        repetition_penalty_(logits, seen, params.repetition_penalty)
    suppress_(logits, params.suppress_ids)
    if params.greedy:
        return logits
    logits.div_(params.temperature)
    top_k_(logits, params.top_k)
    return top_p_(logits, params.top_p)


def sample(
    logits: Tensor,
    params: SamplingParams,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next ids [B] from ``logits`` [B, V]. Updates ``seen`` in place when given."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        ids = logits.argmax(-1)
    else:
        probs = logits.softmax(-1)
        race = torch.empty_like(probs).exponential_(1, generator=generator)
        ids = (probs / race).argmax(-1)
    if seen is not None:
        mark_seen_(seen, ids)
    return ids
