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


def test_a_checkpoint_chooses_its_talker_sampling(tiny_dir, tmp_path):
    """generation_config.json's talker_* keys set the Talker sampling of sessions that choose
    none; a session's own choice and the CLI's --talker-* flags still win."""
    import argparse
    import json
    import shutil

    import pytest

    from omnistream.cli import _talker_flags
    from omnistream.engine.options import SessionOptions
    from omnistream.engine.sampling import talker_sampling_from
    from omnistream.engine.session import Engine

    assert talker_sampling_from({}) == TALKER_SAMPLING  # the release's file has no such keys
    p = talker_sampling_from({"talker_top_k": 5, "talker_repetition_penalty": 1.0})
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.9, 5, 0.8, 1.0)
    assert p.suppress_ids == TALKER_SAMPLING.suppress_ids
    assert talker_sampling_from({"talker_do_sample": False}).greedy
    with pytest.raises(ValueError, match="talker_sampling|Talker sampling"):
        talker_sampling_from({"talker_top_p": 0})

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps(
        {**gen, "talker_do_sample": False, "talker_repetition_penalty": 1.0}))
    engine = Engine.load(d, quiet=True)
    want = SamplingParams(temperature=0.0, top_k=40, top_p=0.8, repetition_penalty=1.0,
                          suppress_ids=TALKER_SAMPLING.suppress_ids)
    assert engine.talker_sampling == want
    msgs = [{"role": "user", "content": "Hi!"}]
    codes = []
    for seed in (0, 1):  # greedy: the seed changes nothing
        done = list(engine.session(seed=seed, max_new_tokens=4, talker_max_new_tokens=30)
                    .respond(msgs))[-1]
        codes.append(done.codec_ids)
    assert codes[0] == codes[1] and len(codes[0]) > 4
    assert engine.session(talker_sampling=TALKER_SAMPLING).talker_sampling == TALKER_SAMPLING

    flags = argparse.Namespace(talker_temperature=0.7, talker_top_k=None, talker_top_p=None,
                               talker_repetition_penalty=None)
    o = _talker_flags(SessionOptions(), flags, engine)
    assert o.talker_sampling == SamplingParams(**{**want.__dict__, "temperature": 0.7})
    none = argparse.Namespace(**{k: None for k in vars(flags)})
    assert _talker_flags(SessionOptions(), none, engine).talker_sampling is None
