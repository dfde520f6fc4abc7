"""``omnistream bench``: end to end on the tiny checkpoint (first text / first audio) and the
loading memory probes."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from omnistream.bench.common import Bench
from omnistream.media.audio import OUTPUT_SAMPLE_RATE

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
            chunk_frames=a.chunk_frames,
            max_chunk_frames=a.max_chunk_frames,
        )
        t0 = time.perf_counter()
        t_text = t_audio = None
        n_samples = 0
        play_end = stall = 0.0  # a player starting at the first chunk: time it waits for audio
        for ev in sess.respond(msgs):
            if isinstance(ev, TextDelta) and t_text is None:
                t_text = time.perf_counter() - t0
            elif isinstance(ev, AudioChunk):
                now = time.perf_counter() - t0
                n_samples += ev.pcm.shape[-1]
                if t_audio is None:
                    t_audio = play_end = now
                stall += max(0.0, now - play_end)
                play_end = max(play_end, now) + ev.pcm.shape[-1] / OUTPUT_SAMPLE_RATE
            elif isinstance(ev, Done):
                break
        return {
            "text": t_text or 0.0,
            "audio": t_audio or 0.0,
            "total": time.perf_counter() - t0,
            "samples": n_samples,
            "stall": stall,
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
    # random talker weights sample codes past the codec embedding, which the reference's
    # token2wav indexes without a check (ours clamps): clamp them for it; timing is unchanged
    n_emb = next(m.num_embeddings for m in ref.token2wav.modules()
                 if isinstance(m, torch.nn.Embedding))

    def clamp_codes(_module, args, kwargs):
        if args:
            args = (args[0].clamp(0, n_emb - 1), *args[1:])
        elif "code" in kwargs:
            kwargs["code"] = kwargs["code"].clamp(0, n_emb - 1)
        return args, kwargs

    ref.token2wav.register_forward_pre_hook(clamp_codes, with_kwargs=True)

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
        note=f"ours streaming ({N} text tok, <= {M} codes, "
        f"{o['samples'] / OUTPUT_SAMPLE_RATE:.2f} s audio, "
        f"chunks {a.chunk_frames}..{a.max_chunk_frames} frames)",
    )
    b.add(
        config=name,
        metric="e2e playback stalls after first audio",
        unit="ms",
        ours=1e3 * o["stall"],
        ref=None,
        higher_is_better=False,
        note="a player starting at the first chunk waits this long in all for later chunks",
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
from omnistream.bench.common import rss_bytes
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
