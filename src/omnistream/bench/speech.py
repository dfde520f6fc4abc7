"""``omnistream bench``: token2wav (DiT + BigVGAN) RTF, offline and streaming."""

from __future__ import annotations

import gc
import sys
import time

import torch
from torch import Tensor

from omnistream.bench.common import (
    Bench,
    adopt,
    default_dtype_device,
    hf_omni_config,
    omni_dict,
)

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
