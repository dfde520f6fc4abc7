"""Logit processors against transformers' processors, and the sampler's distribution."""

from __future__ import annotations

import torch

from omnistream.engine.sampling import (
    TALKER_SAMPLING,
    SamplingParams,
    process_logits,
    sample,
    seen_mask,
)


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    B, V = 3, 8448
    logits = torch.randn(B, V, generator=g) * 3
    history = torch.randint(0, V, (B, 20), generator=g)
    p = TALKER_SAMPLING
    ref = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(p.repetition_penalty),
            SuppressTokensLogitsProcessor(list(p.suppress_ids)),
            TemperatureLogitsWarper(p.temperature),
            TopKLogitsWarper(p.top_k),
            TopPLogitsWarper(p.top_p),
        ]
    )
    want = ref(history, logits.clone())
    got = process_logits(logits, p, seen_mask(B, V, history))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-6)


def test_greedy_is_argmax_after_penalty_and_suppression():
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    seen = seen_mask(1, 4, torch.tensor([[1]]))
    params = SamplingParams(repetition_penalty=1.1, suppress_ids=(2,))
    assert sample(logits, params, seen).item() == 1  # 3/1.1 > 1.0, id 2 suppressed
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen).item() == 2
    assert seen[0, 2]  # the sampled id was recorded


def test_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -9.0]]).expand(20000, -1)
    ids = sample(logits, SamplingParams(temperature=1.0), generator=g)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    top2 = sample(logits, SamplingParams(temperature=1.0, top_k=2), generator=g)
    assert set(top2.unique().tolist()) == {1, 2}
