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
* ``vision-encoder`` the release vision tower on one ``--image-size`` image;
* ``load``           loading peak memory on a 1.65 GB (fp32) checkpoint in the released layout
                     (bf16 thinker/talker on disk, 3B-wide thinker with 8 layers);
* ``answer``         whole-process time to answer: a fresh process each, load a 0.45B Thinker
                     (1.8 GB fp32) + ``--answer-tokens`` greedy tokens, wall time and peak RSS;
* ``features``       log-mel features of a ``--features-seconds`` clip; one image as a
                     training set stores it.

``omnistream bench serve ...`` is the server load test (its own options: ``--help``),
``omnistream bench vad`` the turn detectors on generated speech, beeps and music, and
``gpu_bench.sh`` beside this file runs the suite at 7B shapes on one CUDA device.

Beside every decode figure: the hardware limit. Memory bandwidth is measured (a large tensor sum
= read bandwidth), the bytes one decode step must read are counted (every decoder weight except the
embedding table, + the KV cache), and ``limit = bytes / bandwidth`` is the fastest a step can be;
``% of limit`` = limit / measured step time.

Prints a table; ``--json-out F`` writes every row (and the hardware) as JSON. The reference
needs the test extra (``pip install 'omnistream[test]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from omnistream.bench.common import (
    TALKER_7B,
    TEXT_3B,
    TEXT_7B,
    TINY_BIGVGAN,
    Bench,
    _fmt,
    hardware,
    omni_dict,
)
from omnistream.bench.decoders import bench_talker, bench_thinker
from omnistream.bench.e2e import bench_end_to_end, bench_load_memory
from omnistream.bench.encoders import bench_audio_encoder, bench_vision_encoder
from omnistream.bench.speech import bench_token2wav
from omnistream.checkpoint import DTYPES

CONFIGS = ("tiny", "3b-text", "7b-talker", "token2wav", "audio-encoder", "vision-encoder", "load",
           "answer", "features")
EXTRA_CONFIGS = ("7b-text",)  # GPU-sized; not part of "all" on CPU


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
    elif name == "load":
        from omnistream.maketiny import make_tiny
        from omnistream.tiny import TINY_CONFIG

        text = json.loads(json.dumps(TINY_CONFIG["thinker_config"]["text_config"]))
        text.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2)
        for k in ("rope_scaling", "rope_parameters"):
            if text.get(k):
                text[k]["mrope_section"] = [16, 24, 24]
        talker = dict(TINY_CONFIG["talker_config"], embedding_size=1024)
        cfg = omni_dict(text=text, talker=talker, bigvgan=TINY_BIGVGAN)
        with tempfile.TemporaryDirectory() as d:
            make_tiny(d, seed=0, config=cfg)
            bench_load_memory(b, name, Path(d))
    elif name == "answer":
        from omnistream.bench.answer import bench_answer

        bench_answer(b, name)
    elif name == "features":
        from omnistream.bench.features import bench_features, bench_stored_image

        bench_features(b, name)
        bench_stored_image(b, name)
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
    ap.add_argument("--chunk-frames", type=int, default=48, help="e2e: first code2wav chunk")
    ap.add_argument("--max-chunk-frames", type=int, default=144, help="e2e: chunk growth cap")
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
    ap.add_argument("--answer-tokens", type=int, default=160, help="answer: greedy tokens")
    ap.add_argument("--cache-dir", default=None,
                    help="answer: where its checkpoint is written once "
                         "(default ~/.cache/omnistream/bench)")
    ap.add_argument("--omp-wait-policy", default="passive",
                    choices=["passive", "active", "inherit"],
                    help="answer: OMP_WAIT_POLICY of both processes (inherit: this one's)")
    ap.add_argument("--features-seconds", type=float, default=60.0, help="features: clip length")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    return ap


def missing_reference() -> str | None:
    """Why the transformers reference cannot run here (a message naming the extra), or None."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return ("the benchmarks compare against the transformers reference, which is not "
                "installed: pip install 'omnistream[test]'")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark suite; prints the table, optionally writes JSON. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `omnistream bench -- --config ...`
        argv = argv[1:]
    if argv[:1] == ["serve"]:  # the server load test, with its own options
        from omnistream.bench.serve import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["vad"]:  # turn detection, with its own options
        from omnistream.bench.vad import main as vad_main

        return vad_main(argv[1:])
    a = build_parser().parse_args(argv)
    missing = missing_reference()
    if missing:
        print(f"omnistream bench: error: {missing}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    elif a.device == "cpu":
        torch.set_num_threads(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
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
