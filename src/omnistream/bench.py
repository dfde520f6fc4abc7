"""``omnistream bench``: omnistream vs the transformers reference, side by side, and vs the
hardware.

Each configuration builds the transformers module once (random weights, real shapes unless
``tiny``), hands *the same tensors* to our module (built on ``meta``, ``load_state_dict(assign=
True)``: one copy of the weights), feeds both the same inputs and times them in the same process:

* ``tiny``           the whole tiny model: thinker prefill/decode, talker decode, token2wav RTF,
                     and end to end time to first text / first audio (our streaming engine vs the
                     reference ``generate`` of a whole reply) + model-loading peak RSS;
* ``3b-text``        the 3B thinker text decoder (``--layers`` of 36; fp32 36 layers would not fit
                     beside the rest of the machine) + int8;
* ``7b-text``        the 7B thinker text decoder (GPU script; ``--layers`` of 28);
* ``7b-talker``      the 7B talker (24 layers) + int8;
* ``token2wav``      the release DiT + BigVGAN: RTF offline RK4 (both) and Euler, and streaming;
* ``audio-encoder``  the release audio tower on ``--audio-seconds`` of audio (+ streaming block);
* ``vision-encoder`` the release vision tower on one ``--image-size`` image.

Beside every decode figure: the hardware limit. Memory bandwidth is measured (a large tensor sum
= read bandwidth), the bytes one decode step must read are counted (every decoder weight except the
embedding table, + the KV cache), and ``limit = bytes / bandwidth`` is the fastest a step can be;
``% of limit`` = limit / measured step time.

Prints a table; ``--json-out F`` writes every row (and the hardware) as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

VS = 151652  # transformers 5.24's thinker config lacks vision_start_token_id
MROPE = {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}

# Real shapes (facts sheet §2).
TEXT_3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rope_scaling=MROPE,
    tie_word_embeddings=False,
)
TEXT_7B = dict(
    TEXT_3B,
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
)
TALKER_7B = dict(
    vocab_size=8448,
    embedding_size=3584,
    hidden_size=896,
    intermediate_size=18944,
    num_hidden_layers=24,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    rope_scaling=MROPE,
    max_position_embeddings=32768,
)
# The tiny BigVGAN width must survive 6 halvings (tiny.py's 32 -> 0 channels in the last stage).
TINY_BIGVGAN = dict(
    mel_dim=80,
    upsample_initial_channel=64,
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5]] * 3,
    upsample_rates=[5, 3, 2, 2, 2, 2],
    upsample_kernel_sizes=[11, 7, 4, 4, 4, 4],
)
CONFIGS = ("tiny", "3b-text", "7b-talker", "token2wav", "audio-encoder", "vision-encoder")
EXTRA_CONFIGS = ("7b-text",)  # GPU-sized; not part of "all" on CPU


# ---------------------------------------------------------------------------------------------
# Rows and timing


@dataclass
class Row:
    config: str
    metric: str
    unit: str
    ours: float | None = None
    ref: float | None = None
    ours_int8: float | None = None
    limit_pct: float | None = None  # ours (fp) as % of the hardware limit
    limit_pct_int8: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if not self.ours or not self.ref:
            return None
        return self.ours / self.ref if self.higher_is_better else self.ref / self.ours


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    rows: list[Row] = field(default_factory=list)
    hw: dict[str, Any] = field(default_factory=dict)

    def add(self, **kw) -> Row:
        r = Row(**kw)
        self.rows.append(r)
        if not self.args.quiet:
            print(
                f"  {r.config:15s} {r.metric:42s} ours={_fmt(r.ours)} int8={_fmt(r.ours_int8)} "
                f"ref={_fmt(r.ref)} {r.unit} {r.note}",
                file=sys.stderr,
                flush=True,
            )
        return r

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int = 1) -> float:
        """Best wall time (s) of ``repeats`` calls after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(repeats or self.args.repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    def limit_pct(self, bytes_per_step: int, step_s: float) -> float:
        return 100.0 * bytes_per_step / (self.hw["read_GBps"] * 1e9) / step_s


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process from /proc (0, 0 where unavailable)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0, 0
    vals = {}
    for line in status.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


# ---------------------------------------------------------------------------------------------
# Hardware


def measure_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (sum of a large fp32 tensor) and copy bandwidth (read + write), GB/s."""
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def best(fn) -> float:
        fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_sum = best(lambda: x.sum())
    t_copy = best(lambda: y.copy_(x))
    nbytes = x.numel() * 4
    return {
        "read_GBps": nbytes / t_sum / 1e9,
        "copy_GBps": 2 * nbytes / t_copy / 1e9,
        "probe_MiB": mib,
    }


def hardware(b: Bench) -> None:
    a = b.args
    info: dict[str, Any] = {
        "device": str(b.device),
        "dtype": str(b.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if b.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(b.device)
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    info.update(measure_bandwidth(b.device, a.bandwidth_mib))
    b.hw = info
    print(f"hardware: {info}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Shared weights: the reference module's tensors, adopted by ours


def hf_thinker_to_ckpt(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers-5 thinker names -> checkpoint names (under ``thinker.``)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "model.")
        k = k.replace("model.audio_tower.", "audio_tower.").replace("model.visual.", "visual.")
        out[k] = v
    return out


def adopt(build: Callable[[], nn.Module], sd: dict[str, Tensor], device: torch.device) -> nn.Module:
    """Our module holding the same tensors as ``sd`` (built on meta, loaded with assign=True);
    falls back to a real build + copy when a buffer that is not in ``sd`` stayed on meta."""
    with torch.device("meta"):
        m = build()
    m.load_state_dict(sd, strict=True, assign=True)
    if any(t.device.type == "meta" for t in list(m.parameters()) + list(m.buffers())):
        with torch.device(device):
            m = build()
        dt = next(iter(sd.values())).dtype
        m.to(dt).load_state_dict(sd, strict=True)
    return m.eval()


@contextlib.contextmanager
def default_dtype_device(dtype: torch.dtype, device: torch.device):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def hf_omni_config(cfg_dict: dict):
    from transformers import Qwen2_5OmniConfig

    cfg = Qwen2_5OmniConfig(**cfg_dict)
    for sub in (
        cfg.thinker_config,
        cfg.talker_config,
        cfg.token2wav_config,
        cfg.thinker_config.audio_config,
        cfg.thinker_config.vision_config,
        cfg.token2wav_config.dit_config,
        cfg.token2wav_config.bigvgan_config,
    ):
        sub._attn_implementation = "sdpa"
    return cfg


def omni_dict(
    text: dict | None = None,
    talker: dict | None = None,
    dit: dict | None = None,
    bigvgan: dict | None = None,
    audio: dict | None = None,
    vision: dict | None = None,
) -> dict:
    """The tiny config with some components replaced (whole sub-dicts)."""
    from omnistream.tiny import tiny_config

    ov: dict[str, Any] = {"thinker_config.vision_start_token_id": VS}
    if text is not None:
        ov["thinker_config.text_config"] = dict(text)
        ov["thinker_config.audio_config.output_dim"] = text["hidden_size"]
        ov["thinker_config.vision_config.out_hidden_size"] = text["hidden_size"]
    if talker is not None:
        ov["talker_config"] = dict(talker)
    if dit is not None:
        ov["token2wav_config.dit_config"] = dict(dit)
    if bigvgan is not None:
        ov["token2wav_config.bigvgan_config"] = dict(bigvgan)
    if audio is not None:
        ov["thinker_config.audio_config"] = dict(audio)
    if vision is not None:
        ov["thinker_config.vision_config"] = dict(vision)
    return tiny_config(**ov)


def _bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def decode_bytes(stack: nn.Module, head: nn.Module, ctx: int, kv_elem: int) -> int:
    """Bytes a one-token decode step reads: the decoder weights except the embedding table (one
    row), the final norm, the head, and the K/V cache of ``ctx`` positions."""
    cfg = stack.cfg
    w = [t for n, t in stack.named_parameters() if not n.startswith("embed_tokens")]
    w += list(t for n, t in stack.named_buffers())
    w += list(head.parameters()) + list(head.buffers())
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx * kv_elem
    return _bytes(w) + kv


# ---------------------------------------------------------------------------------------------
# Thinker text decoder


def bench_thinker(b: Bench, name: str, text: dict, layers: int | None) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omnistream.config import OmniConfig
    from omnistream.engine.quant import quantize_int8_
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
    from omnistream.engine.quant import quantize_int8_
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


# ---------------------------------------------------------------------------------------------
# Token2wav


def bench_token2wav(b: Bench, name: str, dit: dict | None, bigvgan: dict | None) -> None:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

    from omnistream.config import OmniConfig
    from omnistream.nn.token2wav import Token2Wav

    a = b.args
    cfg_dict = omni_dict(dit=dit, bigvgan=bigvgan)
    if a.dit_layers:
        d = cfg_dict["token2wav_config"]["dit_config"]
        full = d.get("num_hidden_layers", 22)
        d["num_hidden_layers"] = a.dit_layers
        d["look_ahead_layers"] = [i for i in d.get("look_ahead_layers", [10]) if i < a.dit_layers]
        d["look_backward_layers"] = [
            i for i in d.get("look_backward_layers", [0, 20]) if i < a.dit_layers
        ]
    t0 = time.perf_counter()
    with default_dtype_device(torch.float32, b.device):
        ref = Qwen2_5OmniToken2WavModel(hf_omni_config(cfg_dict).token2wav_config).eval()
    ours = adopt(
        lambda: Token2Wav(OmniConfig.from_dict(cfg_dict).token2wav_config),
        ref.state_dict(),
        b.device,
    )
    print(f"[{name}] token2wav built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    note = f"{a.dit_layers}/{full} DiT layers" if a.dit_layers else ""

    n_codes = max(2, round(a.t2w_seconds * 50))
    secs = n_codes / 50
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8192, (1, n_codes), generator=g).to(b.device)
    cond = torch.randn(1, 192, generator=g).to(b.device)
    ref_mel = torch.randn(1, 300, 80, generator=g).to(b.device)
    noise = torch.randn(1, 2 * n_codes, 80, generator=g).to(b.device)

    with torch.no_grad():
        t_ref = b.time(
            lambda: ref(codes, cond, ref_mel), repeats=1, warmup=0 if a.t2w_seconds >= 2 else 1
        )
        t_rk4 = b.time(
            lambda: ours(codes, cond, ref_mel, noise=noise),
            repeats=1,
            warmup=0 if a.t2w_seconds >= 2 else 1,
        )
        t_eul = b.time(
            lambda: ours(codes, cond, ref_mel, solver="euler", noise=noise), repeats=1, warmup=0
        )
    b.add(
        config=name,
        metric=f"token2wav offline RK4 RTF ({secs:.1f} s audio)",
        unit="x",
        ours=t_rk4 / secs,
        ref=t_ref / secs,
        higher_is_better=False,
        note=f"{note} RTF = compute s / audio s",
    )
    b.add(
        config=name,
        metric="token2wav offline Euler RTF",
        unit="x",
        ours=t_eul / secs,
        ref=t_ref / secs,
        higher_is_better=False,
        note=f"{note} ref has RK4 only",
    )
    try:
        stream_rows(b, name, ours, codes, cond, ref_mel, secs, note)
    except Exception as e:  # noqa: BLE001 - the streaming path lands separately
        b.add(
            config=name,
            metric="token2wav streaming RTF",
            unit="x",
            higher_is_better=False,
            note=f"n/a: {type(e).__name__}: {str(e)[:90]}",
        )
    ref = ours = None
    gc.collect()


def stream_rows(
    b: Bench, name: str, t2w, codes: Tensor, cond: Tensor, ref_mel: Tensor, secs: float, note: str
) -> None:
    """Streaming code2wav (``engine.code2wav``): RTF and time to the first chunk, RK4 and Euler."""
    from omnistream.engine import code2wav

    for solver in ("rk4", "euler"):

        def run(solver: str = solver) -> tuple[float, float | None]:
            st = code2wav.Code2WavStream(t2w, cond, ref_mel, solver=solver)
            t0 = time.perf_counter()
            first = None
            for c in codes[0].tolist():
                out = st.push(c)
                if first is None and len(out):
                    b.sync()
                    first = time.perf_counter() - t0
            st.flush()
            b.sync()
            return time.perf_counter() - t0, first

        total, first = run()
        when = (
            "only at flush (utterance < 1 chunk)"
            if first is None
            else f"after {1e3 * first:.0f} ms"
        )
        b.add(
            config=name,
            metric=f"token2wav streaming {solver} RTF",
            unit="x",
            ours=total / secs,
            higher_is_better=False,
            note=f"{note} chunk 72 frames; first chunk {when} (all codes pushed at once)",
        )


# ---------------------------------------------------------------------------------------------
# Encoders


def bench_audio_encoder(b: Bench, name: str, audio: dict | None) -> None:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    from omnistream.config import OmniConfig
    from omnistream.nn.audio_encoder import AudioEncoder

    a = b.args
    cfg_dict = omni_dict(audio=audio)
    with default_dtype_device(b.dtype, b.device):
        ref = Qwen2_5OmniAudioEncoder(hf_omni_config(cfg_dict).thinker_config.audio_config).eval()
    ours = adopt(
        lambda: AudioEncoder(OmniConfig.from_dict(cfg_dict).thinker_config.audio_config),
        ref.state_dict(),
        b.device,
    )
    frames = int(a.audio_seconds * 100)
    feats = torch.randn(128, frames, generator=torch.Generator().manual_seed(0)).to(
        b.device, b.dtype
    )
    lens = torch.tensor([frames], device=b.device)
    with torch.no_grad():
        t_ours = b.time(lambda: ours(feats, lens))
        t_ref = b.time(lambda: ref(feats, lens))
    b.add(
        config=name,
        metric=f"audio encoder ({a.audio_seconds:g} s clip)",
        unit="audio s/s",
        ours=a.audio_seconds / t_ours,
        ref=a.audio_seconds / t_ref,
    )
    with torch.no_grad():

        def block():
            st = ours.stream()
            st.push(feats[:, :200])

        t_blk = b.time(block)
    b.add(
        config=name,
        metric="audio encoder: one 2 s streaming block",
        unit="ms",
        ours=1e3 * t_blk,
        higher_is_better=False,
        note="latency added per 2 s of live input (ref: no streaming)",
    )
    ref = ours = None
    gc.collect()


def bench_vision_encoder(b: Bench, name: str, vision: dict | None) -> None:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    from omnistream.config import OmniConfig
    from omnistream.nn.vision_encoder import VisionEncoder

    a = b.args
    cfg_dict = omni_dict(vision=vision)
    with default_dtype_device(b.dtype, b.device):
        ref = Qwen2_5OmniVisionEncoder(hf_omni_config(cfg_dict).thinker_config.vision_config).eval()
    ours = adopt(
        lambda: VisionEncoder(OmniConfig.from_dict(cfg_dict).thinker_config.vision_config),
        ref.state_dict(),
        b.device,
    )
    side = a.image_size // 28 * 2  # patches per side (multiple of the 2x2 merge)
    grid = torch.tensor([[1, side, side]], device=b.device)
    pixels = torch.randn(side * side, 1176, generator=torch.Generator().manual_seed(0)).to(
        b.device, b.dtype
    )
    with torch.no_grad():
        t_ours = b.time(lambda: ours(pixels, grid))
        t_ref = b.time(lambda: ref(pixels, grid))
    px = side * 14
    b.add(
        config=name,
        metric=f"vision encoder ({px}x{px} image, {side * side} patches)",
        unit="img/s",
        ours=1 / t_ours,
        ref=1 / t_ref,
    )
    ref = ours = None
    gc.collect()


# ---------------------------------------------------------------------------------------------
# End to end on the tiny checkpoint: first text / first audio, and loading memory


def bench_end_to_end(b: Bench, name: str, model_dir: Path) -> None:
    from transformers import Qwen2_5OmniForConditionalGeneration

    from omnistream.engine.events import AudioChunk, Done, TextDelta
    from omnistream.engine.sampling import SamplingParams
    from omnistream.engine.session import Engine

    a = b.args
    N, M = a.decode_tokens, a.talker_tokens
    eng = Engine.load(str(model_dir), dtype=b.dtype, device=str(b.device), quiet=True)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Say something about the sea."}]}]

    def ours_once() -> dict[str, float]:
        sess = eng.session(
            sampling=SamplingParams(),
            max_new_tokens=N,
            talker_max_new_tokens=M,
            ignore_eos=True,
            seed=0,
        )
        t0 = time.perf_counter()
        t_text = t_audio = None
        n_samples = 0
        for ev in sess.respond(msgs):
            if isinstance(ev, TextDelta) and t_text is None:
                t_text = time.perf_counter() - t0
            elif isinstance(ev, AudioChunk):
                n_samples += ev.pcm.shape[-1]
                if t_audio is None:
                    t_audio = time.perf_counter() - t0
            elif isinstance(ev, Done):
                break
        return {
            "text": t_text or 0.0,
            "audio": t_audio or 0.0,
            "total": time.perf_counter() - t0,
            "samples": n_samples,
            "ids": sess.last_prompt_ids,
        }

    ours_once()
    runs = [ours_once() for _ in range(a.repeats)]
    o = min(runs, key=lambda r: r["total"])
    ids = torch.tensor([o["ids"]], device=b.device)
    eng = None
    gc.collect()

    ref = (
        Qwen2_5OmniForConditionalGeneration.from_pretrained(str(model_dir), dtype=b.dtype)
        .to(b.device)
        .eval()
    )
    ref.load_speakers(str(model_dir / "spk_dict.pt"))

    @torch.no_grad()
    def ref_once() -> float:
        b.sync()
        t0 = time.perf_counter()
        ref.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            speaker="Chelsie",
            thinker_max_new_tokens=N,
            thinker_min_new_tokens=N,
            talker_max_new_tokens=M,
            thinker_do_sample=False,
            return_audio=True,
        )
        b.sync()
        return time.perf_counter() - t0

    try:
        ref_once()
        t_ref = min(ref_once() for _ in range(a.repeats))
        ref_note = "ref: whole reply (generate), then audio"
    except Exception as e:  # noqa: BLE001
        t_ref, ref_note = None, f"ref failed: {type(e).__name__}: {str(e)[:80]}"
    b.add(
        config=name,
        metric="e2e time to first text token",
        unit="ms",
        ours=1e3 * o["text"],
        ref=None if t_ref is None else 1e3 * t_ref,
        higher_is_better=False,
        note=ref_note,
    )
    b.add(
        config=name,
        metric="e2e time to first audio",
        unit="ms",
        ours=1e3 * o["audio"],
        ref=None if t_ref is None else 1e3 * t_ref,
        higher_is_better=False,
        note=f"ours streaming ({N} text tok, <= {M} codes, {o['samples'] / 24000:.2f} s audio)",
    )
    b.add(
        config=name,
        metric="e2e whole reply (text + audio)",
        unit="ms",
        ours=1e3 * o["total"],
        ref=None if t_ref is None else 1e3 * t_ref,
        higher_is_better=False,
    )
    ref = None
    gc.collect()


LOAD_PROBE = r"""
import gc, json, sys, torch
sys.path[:0] = {paths!r}
from omnistream.bench import rss_bytes
which, d, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
import transformers, omnistream.checkpoint  # imports before the baseline
from omnistream.checkpoint import load_component
gc.collect()
base = rss_bytes()[0]
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
except OSError:
    pass
mods = []
if which == "ours":
    for part in ("thinker", "talker", "token2wav"):
        mods.append(load_component(d, part, dtype=dtype, quiet=True))
else:
    from transformers import Qwen2_5OmniForConditionalGeneration
    mods.append(Qwen2_5OmniForConditionalGeneration.from_pretrained(d, dtype=dtype))
cur, peak = rss_bytes()
ts = [t for m in mods for t in list(m.parameters()) + list(m.buffers())]
nbytes = sum(t.numel() * t.element_size() for t in ts)
print(json.dumps({{"base": base, "after": cur, "peak": peak, "weights": nbytes}}))
"""


def bench_load_memory(b: Bench, name: str, model_dir: Path) -> None:
    """Peak RSS while loading (fresh subprocess each), relative to the weight bytes loaded."""
    dt = str(b.dtype).removeprefix("torch.")
    res = {}
    for which in ("ours", "ref"):
        code = LOAD_PROBE.format(paths=[p for p in sys.path if p])
        p = subprocess.run(
            [sys.executable, "-c", code, which, str(model_dir), dt],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if p.returncode != 0:
            res[which] = None
            print(f"[{name}] load probe {which} failed: {p.stderr[-400:]}", file=sys.stderr)
            continue
        res[which] = json.loads(p.stdout.strip().splitlines()[-1])
    o, r = res.get("ours"), res.get("ref")
    mib = 2**20
    w = (o or r or {}).get("weights", 0)
    b.add(
        config=name,
        metric="load: peak RSS - baseline",
        unit="MiB",
        ours=None if o is None else (o["peak"] - o["base"]) / mib,
        ref=None if r is None else (r["peak"] - r["base"]) / mib,
        higher_is_better=False,
        note=f"weights {w / mib:.1f} MiB ({dt}); baseline = RSS after imports",
    )
    b.add(
        config=name,
        metric="load: peak / weight bytes",
        unit="x",
        ours=None if o is None else (o["peak"] - o["base"]) / max(o["weights"], 1),
        ref=None if r is None else (r["peak"] - r["base"]) / max(r["weights"], 1),
        higher_is_better=False,
    )


# ---------------------------------------------------------------------------------------------
# Driver


def run_config(b: Bench, name: str) -> None:
    a = b.args
    if name == "tiny":
        from omnistream.tiny import TINY_CONFIG

        bench_thinker(b, name, TINY_CONFIG["thinker_config"]["text_config"], None)
        bench_talker(b, name, TINY_CONFIG["talker_config"], None)
        bench_token2wav(b, name, None, TINY_BIGVGAN)
        from omnistream.maketiny import make_tiny

        with tempfile.TemporaryDirectory() as d:
            make_tiny(d, seed=0, config=omni_dict(bigvgan=TINY_BIGVGAN))
            _guard(b, name, "end to end", lambda: bench_end_to_end(b, name, Path(d)))
            if a.memory:
                _guard(b, name, "load memory", lambda: bench_load_memory(b, name, Path(d)))
    elif name == "3b-text":
        bench_thinker(b, name, TEXT_3B, a.layers or (None if b.device.type == "cuda" else 8))
    elif name == "7b-text":
        bench_thinker(b, name, TEXT_7B, a.layers)
    elif name == "7b-talker":
        bench_talker(b, name, TALKER_7B, a.talker_layers)
    elif name == "token2wav":
        from omnistream.config import BigVGANConfig, DiTConfig

        dit = {k: v for k, v in DiTConfig().to_dict().items() if not k.startswith("rope")}
        bench_token2wav(b, name, dit, BigVGANConfig().to_dict())
    elif name == "audio-encoder":
        from omnistream.config import AudioEncoderConfig

        bench_audio_encoder(b, name, AudioEncoderConfig(output_dim=3584).to_dict())
    elif name == "vision-encoder":
        from omnistream.config import VisionEncoderConfig

        bench_vision_encoder(b, name, VisionEncoderConfig(out_hidden_size=3584).to_dict())
    else:
        raise ValueError(name)


def _guard(b: Bench, name: str, what: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one failing part must not lose the others' numbers
        import traceback

        traceback.print_exc()
        b.add(config=name, metric=what, unit="", note=f"failed: {type(e).__name__}: {str(e)[:100]}")


def format_table(b: Bench) -> str:
    hdr = [
        "config",
        "metric",
        "unit",
        "omnistream",
        "int8",
        "reference",
        "ours/ref",
        "% HW limit",
        "note",
    ]
    lines = [hdr]
    for r in b.rows:
        pct = "-" if r.limit_pct is None else f"{r.limit_pct:.0f}%"
        if r.limit_pct_int8 is not None:
            pct += f" (int8 {r.limit_pct_int8:.0f}%)"
        sp = r.speedup
        lines.append(
            [
                r.config,
                r.metric,
                r.unit,
                _fmt(r.ours),
                _fmt(r.ours_int8),
                _fmt(r.ref),
                "-" if sp is None else f"{sp:.2f}x",
                pct,
                r.note.strip("; "),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(hdr) - 1)]
    out = []
    for i, row in enumerate(lines):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        out.append("  ".join(cells) + "  " + row[-1])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    hw = b.hw
    head = (
        f"device {hw.get('gpu', hw.get('cpu'))} ({hw['device']}, {hw['threads']} threads, "
        f"{hw['dtype']}); "
        f"memory read {hw['read_GBps']:.1f} GB/s, copy {hw['copy_GBps']:.1f} GB/s; "
        f"load avg {hw.get('load_avg')}"
    )
    foot = (
        "ours/ref: speed ratio (>1 = omnistream faster). "
        "% HW limit: (bytes a decode step must read / "
        "measured read bandwidth) / measured step time."
    )
    return "\n".join([head, *out, foot])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="omnistream bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config",
        default="tiny",
        help=f"comma list of {', '.join(CONFIGS + EXTRA_CONFIGS)} or all (= {', '.join(CONFIGS)})",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="decoders / encoders (token2wav stays float32); default fp32 on CPU, bf16 on GPU",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)"
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--talker-tokens", type=int, default=32)
    ap.add_argument(
        "--layers", type=int, default=None, help="thinker text layers (3b-text default 8 on CPU)"
    )
    ap.add_argument(
        "--talker-layers", type=int, default=None, help="talker layers (default: all 24)"
    )
    ap.add_argument("--dit-layers", type=int, default=None, help="DiT layers (default: all 22)")
    ap.add_argument("--t2w-seconds", type=float, default=1.0, help="audio length for token2wav RTF")
    ap.add_argument("--audio-seconds", type=float, default=10.0)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
    ap.add_argument(
        "--bandwidth-mib", type=int, default=None, help="probe size (default 1024 CPU, 4096 GPU)"
    )
    ap.add_argument(
        "--no-int8", dest="int8", action="store_false", help="skip the int8 decode runs"
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(decode_step)")
    ap.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="loading peak RSS probes (tiny)",
    )
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite; prints the table, optionally writes JSON. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `omnistream bench -- --config ...`
        argv = argv[1:]
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    elif a.device == "cpu":
        torch.set_num_threads(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if a.bandwidth_mib is None:
        a.bandwidth_mib = 4096 if device.type == "cuda" else 1024
    names = list(CONFIGS) if a.config == "all" else [c.strip() for c in a.config.split(",")]
    for n in names:
        if n not in CONFIGS + EXTRA_CONFIGS:
            raise SystemExit(f"unknown config {n!r}; choose from {CONFIGS + EXTRA_CONFIGS} or all")
    b = Bench(a, device, dtype)
    hardware(b)
    t0 = time.perf_counter()
    for n in names:
        print(f"== {n}", file=sys.stderr, flush=True)
        _guard(b, n, "config", lambda n=n: run_config(b, n))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = format_table(b)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.json_out:
        Path(a.json_out).write_text(
            json.dumps(
                {
                    "hardware": b.hw,
                    "args": vars(a),
                    "rows": [dict(asdict(r), speedup=r.speedup) for r in b.rows],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
