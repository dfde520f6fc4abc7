"""Shared pieces of ``omnistream bench``: rows and timing, the hardware probe, real shapes, and
the reference module's tensors adopted by ours."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
