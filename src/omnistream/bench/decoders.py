"""``omnistream bench``: the thinker text decoder and the talker, ours vs transformers (+ int8)."""

from __future__ import annotations

import copy
import gc
import sys
import time

import torch

from omnistream.bench.common import (
    Bench,
    _bytes,
    adopt,
    decode_bytes,
    default_dtype_device,
    hf_omni_config,
    hf_thinker_to_ckpt,
    omni_dict,
)

# ---------------------------------------------------------------------------------------------
# Thinker text decoder


def bench_thinker(b: Bench, name: str, text: dict, layers: int | None) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnistream.config import OmniConfig
    from omnistream.engine.layout import tune_head_layout_
    from omnistream.engine.quant import quantize_int4_, quantize_int8_
    from omnistream.nn.thinker import Thinker

    a = b.args
    full_layers = text["num_hidden_layers"]
    if layers:
        text = dict(text, num_hidden_layers=layers)
    note = (
        ""
        if text["num_hidden_layers"] == full_layers
        else f"{text['num_hidden_layers']}/{full_layers} layers"
    )
    cfg_dict = omni_dict(text=text)
    t0 = time.perf_counter()
    with default_dtype_device(b.dtype, b.device):
        ref = Qwen2_5OmniThinkerForConditionalGeneration(
            hf_omni_config(cfg_dict).thinker_config
        ).eval()
    ours = adopt(
        lambda: Thinker(OmniConfig.from_dict(cfg_dict).thinker_config),
        hf_thinker_to_ckpt(ref.state_dict()),
        b.device,
    )
    tune_head_layout_(ours.lm_head)  # as Engine.load does (by shape)
    print(
        f"[{name}] built in {time.perf_counter() - t0:.1f} s ({note or 'all layers'})",
        file=sys.stderr,
    )

    P, N = a.prompt_len, a.decode_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, P), generator=g).to(b.device)
    mask = torch.ones_like(ids)
    cache = ours.model.new_cache(1, P + N + 8)

    @torch.no_grad()
    def ours_prefill():
        cache.reset()
        return ours.prefill(ids, cache)

    @torch.no_grad()
    def ref_prefill():
        return ref(input_ids=ids, attention_mask=mask, use_cache=True)

    with torch.no_grad():
        t_ours_p, t_ref_p = b.time(ours_prefill), b.time(ref_prefill)
    prefill_row = b.add(
        config=name,
        metric=f"thinker prefill ({P} tok)",
        unit="tok/s",
        ours=P / t_ours_p,
        ref=P / t_ref_p,
        note=note + " ref: all-position logits",
    )

    # engine/batch.py: the chunks of 8 sessions' short prompts in one call (right-padded over
    # their cache slots) against one call each; the baseline is ours, in the same run
    from omnistream.engine.batch import PrefillWork, run_work

    S, n = 8, min(P, 18)
    pool = ours.model.new_pool(S, n + 8)
    with torch.no_grad():
        x, pos = ours.embed(ids[:, :n]), ours.position_ids(ids[:, :n])[0]

    @torch.no_grad()
    def prefill_sessions(together: bool) -> None:
        work = [PrefillWork(ours, pool.view(i), x, pos) for i in range(S)]
        for items in [work] if together else [[w] for w in work]:
            run_work(items)

    t_one = b.time(lambda: prefill_sessions(False))
    t_all = b.time(lambda: prefill_sessions(True))
    b.add(config=name, metric=f"thinker prefill, {S} sessions x {n} tok", unit="tok/s",
          ours=S * n / t_all,
          note=f"{note} one call; a call per session: {S * n / t_one:.0f} tok/s "
               f"({t_one / t_all:.2f}x the time)")
    pool = None

    def ours_decode_fn(step_fn):
        @torch.no_grad()
        def run() -> float:
            step = ours_prefill()
            tok = step.logits.argmax(-1)
            b.sync()
            t0 = time.perf_counter()
            for _ in range(N):
                step = step_fn(tok, cache, step.rope_deltas)
                tok = step.logits.argmax(-1)
            b.sync()
            return time.perf_counter() - t0

        return run

    def best_of(run) -> float:
        run()
        return min(run() for _ in range(a.repeats))

    @torch.no_grad()
    def ref_generate(n: int) -> float:
        b.sync()
        t0 = time.perf_counter()
        ref.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=151643,
        )
        b.sync()
        return time.perf_counter() - t0

    t_ours = best_of(ours_decode_fn(ours.decode_step)) / N
    ref_generate(2)
    t_ref = (
        max(
            min(ref_generate(N + 1) for _ in range(a.repeats))
            - min(ref_generate(1) for _ in range(a.repeats)),
            1e-9,
        )
        / N
    )
    ctx = P + N // 2
    kv_elem = cache.k[0].element_size()
    nbytes = decode_bytes(ours.model, ours.lm_head, ctx, kv_elem)
    limit_s = nbytes / (b.hw["read_GBps"] * 1e9)
    row = b.add(
        config=name,
        metric=f"thinker decode ({N} tok after {P})",
        unit="tok/s",
        ours=1 / t_ours,
        ref=1 / t_ref,
        limit_pct=b.limit_pct(nbytes, t_ours),
        note=f"{note} step reads {nbytes / 1e9:.2f} GB; limit {1e3 * limit_s:.1f} ms/tok",
    )
    first_tok = t_ours_p  # prefill + argmax: time to the first text token
    b.add(
        config=name,
        metric=f"time to first text token ({P}-tok prompt)",
        unit="ms",
        ours=1e3 * first_tok,
        ref=1e3 * t_ref_p,
        higher_is_better=False,
        note="ours prefill + argmax; ref one forward",
    )

    if a.compile:
        try:
            compiled = torch.compile(ours.decode_step, dynamic=True)
            t_c0 = time.perf_counter()
            ours_decode_fn(compiled)()
            t_compile = time.perf_counter() - t_c0
            t_comp = best_of(ours_decode_fn(compiled)) / N
            b.add(
                config=name,
                metric="thinker decode, torch.compile(decode_step)",
                unit="tok/s",
                ours=1 / t_comp,
                ref=1 / t_ref,
                limit_pct=b.limit_pct(nbytes, t_comp),
                note=f"{note} first run incl. compile {t_compile:.1f} s",
            )
        except Exception as e:  # noqa: BLE001 - report, do not abort the suite
            b.add(
                config=name,
                metric="thinker decode, torch.compile(decode_step)",
                unit="tok/s",
                note=f"failed: {type(e).__name__}: {str(e)[:80]}",
            )
        torch._dynamo.reset()

    if a.int8 and b.device.type == "cpu":  # int4: a copy (the int8 swap below is in place)
        q4 = copy.deepcopy(ours)
        g4 = 128 if text["hidden_size"] % 128 == 0 else 32
        quantize_int4_(q4, group_size=g4)
        nbytes4 = decode_bytes(q4.model, q4.lm_head, ctx, kv_elem)
        t4 = best_of(ours_decode_fn(q4.decode_step)) / N
        b.add(config=name, metric=f"thinker decode int4 (g{g4}, {N} tok)", unit="tok/s",
              ours=1 / t4, ref=1 / t_ref, limit_pct=b.limit_pct(nbytes4, t4),
              note=f"{note} int4 step reads {nbytes4 / 1e9:.2f} GB; vs fp32 {t_ours / t4:.2f}x")
        q4 = None
        gc.collect()

    if a.int8:
        ref = None  # shared weights: the fp copies die with the swap below once ref lets go
        gc.collect()
        quantize_int8_(ours)
        nbytes8 = decode_bytes(ours.model, ours.lm_head, ctx, kv_elem)
        t8 = best_of(ours_decode_fn(ours.decode_step)) / N
        row.ours_int8 = 1 / t8
        row.limit_pct_int8 = b.limit_pct(nbytes8, t8)
        row.note += f"; int8 step reads {nbytes8 / 1e9:.2f} GB"
        t8p = b.time(ours_prefill)
        prefill_row.ours_int8 = P / t8p
    ours = cache = None
    gc.collect()


# ---------------------------------------------------------------------------------------------
# Talker


def bench_talker(b: Bench, name: str, talker: dict, layers: int | None) -> None:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniTalkerForConditionalGeneration,
    )

    from omnistream.config import OmniConfig
    from omnistream.engine.layout import tune_head_layout_
    from omnistream.engine.quant import quantize_int4_, quantize_int8_
    from omnistream.nn.talker import Talker

    a = b.args
    full_layers = talker["num_hidden_layers"]
    if layers:
        talker = dict(talker, num_hidden_layers=layers)
    note = (
        ""
        if talker["num_hidden_layers"] == full_layers
        else f"{talker['num_hidden_layers']}/{full_layers} layers"
    )
    cfg_dict = omni_dict(talker=talker)
    t0 = time.perf_counter()
    with default_dtype_device(b.dtype, b.device):
        ref = Qwen2_5OmniTalkerForConditionalGeneration(
            hf_omni_config(cfg_dict).talker_config
        ).eval()
    ours = adopt(
        lambda: Talker(OmniConfig.from_dict(cfg_dict).talker_config), ref.state_dict(), b.device
    )
    tune_head_layout_(ours.codec_head)  # as Engine.load does
    print(f"[{name}] talker built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    L, N = a.prompt_len, a.talker_tokens
    E = ours.cfg.embedding_size
    g = torch.Generator().manual_seed(0)
    dev, dt = b.device, b.dtype
    prompt = (torch.randn(1, L, E, generator=g) * 0.1).to(dev, dt)
    bos = (torch.randn(1, 1, E, generator=g) * 0.1).to(dev, dt)
    reply = (torch.randn(1, N + 2, E, generator=g) * 0.1).to(dev, dt)
    text_ids = torch.randint(0, 150000, (1, L + 2), generator=g).to(dev)
    codec_ids = torch.cat([torch.full((1, L), 8296), torch.tensor([[8292, 8293]])], 1).to(dev)
    pos = torch.arange(L, device=dev).expand(3, 1, L)
    deltas = torch.zeros(1, 1, dtype=torch.long, device=dev)
    cache = ours.new_cache(1, L + N + 8)

    @torch.no_grad()
    def ours_run(steps: int) -> tuple[float, float]:
        cache.reset()
        b.sync()
        t0 = time.perf_counter()
        logits = ours.prefill(cache, prompt, pos, deltas, bos[0, 0], reply[:, :1])
        code = logits.argmax(-1)
        b.sync()
        t1 = time.perf_counter()
        for k in range(1, steps + 1):
            logits = ours.step(cache, code, reply[:, k : k + 1], deltas)
            code = logits.argmax(-1)
        b.sync()
        return t1 - t0, time.perf_counter() - t1

    @torch.no_grad()
    def ref_run(steps: int) -> tuple[float, float]:
        ref.rope_deltas = None
        m = torch.ones(1, L + 2, dtype=torch.long, device=dev)
        embeds = torch.cat([prompt, bos, reply[:, :1]], 1)
        b.sync()
        t0 = time.perf_counter()
        out = ref(
            input_ids=codec_ids,
            input_text_ids=text_ids,
            inputs_embeds=embeds.clone(),
            attention_mask=m,
            use_cache=True,
        )
        code = out.logits[:, -1].argmax(-1)
        b.sync()
        t1 = time.perf_counter()
        rc = out.cache
        for k in range(1, steps + 1):
            m = torch.cat([m, m.new_ones(1, 1)], 1)
            out = ref(
                input_ids=code[:, None],
                thinker_reply_part=reply[:, k:],
                cache=rc,
                attention_mask=m,
                use_cache=True,
            )
            rc = out.cache
            code = out.logits[:, -1].argmax(-1)
        b.sync()
        return t1 - t0, time.perf_counter() - t1

    def best(run) -> tuple[float, float]:
        run(2)
        rs = [run(N) for _ in range(a.repeats)]
        return min(r[0] for r in rs), min(r[1] for r in rs)

    (op, od), (rp, rd) = best(ours_run), best(ref_run)
    b.add(
        config=name,
        metric=f"talker prefill ({L + 2} pos)",
        unit="pos/s",
        ours=(L + 2) / op,
        ref=(L + 2) / rp,
        note=note,
    )
    nbytes = decode_bytes(ours.model, ours.codec_head, L + N // 2, cache.k[0].element_size())
    nbytes += _bytes(ours.thinker_to_talker_proj.parameters())
    row = b.add(
        config=name,
        metric=f"talker decode ({N} codes)",
        unit="tok/s",
        ours=N / od,
        ref=N / rd,
        limit_pct=b.limit_pct(nbytes, od / N),
        note=f"{note} step reads {nbytes / 1e9:.2f} GB; ref: manual step loop (no generate)",
    )
    if a.int8 and b.device.type == "cpu":  # int4 on a copy; ours_run reads ``ours`` at call time
        fp, ours = ours, copy.deepcopy(ours)
        quantize_int4_(ours, group_size=128)
        nb4 = decode_bytes(ours.model, ours.codec_head, L + N // 2, cache.k[0].element_size())
        nb4 += _bytes(ours.thinker_to_talker_proj.parameters())
        _, od4 = best(ours_run)
        b.add(config=name, metric=f"talker decode int4 (g128, {N} codes)", unit="tok/s",
              ours=N / od4, ref=N / rd, limit_pct=b.limit_pct(nb4, od4 / N),
              note=f"{note} int4 step reads {nb4 / 1e9:.2f} GB; vs fp32 {od / od4:.2f}x")
        ours = fp
        gc.collect()
    if a.int8:
        ref = None
        gc.collect()
        quantize_int8_(ours)
        nbytes8 = decode_bytes(ours.model, ours.codec_head, L + N // 2, cache.k[0].element_size())
        nbytes8 += _bytes(ours.thinker_to_talker_proj.parameters())
        _, od8 = best(ours_run)
        row.ours_int8 = N / od8
        row.limit_pct_int8 = b.limit_pct(nbytes8, od8 / N)
    ours = cache = None
    gc.collect()
