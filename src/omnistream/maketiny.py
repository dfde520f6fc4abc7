"""``make_tiny``: a small random checkpoint in the released Qwen2.5-Omni directory layout.

Written from ``omnistream.tiny.TINY_CONFIG`` with our own modules (built with parameters on
``meta``, then given deterministic random values from the seed): ``config.json``,
``generation_config.json``, ``preprocessor_config.json``, ``chat_template.json``, the tokenizer
files, three safetensors shards with ``model.safetensors.index.json`` (thinker and talker bf16,
token2wav f32, as released) and ``spk_dict.pt`` (Chelsie, Ethan). transformers loads it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from omnistream.checkpoint import (
    INDEX_FILE,
    PARTS,
    SINGLE_FILE,
    SPEAKERS_FILE,
    build_component,
)
from omnistream.config import OmniConfig
from omnistream.media.audio import SAMPLE_RATE
from omnistream.tiny import TINY_CONFIG
from omnistream.tokenizer import CHAT_TEMPLATE, write_tokenizer_files

# Released dtypes on disk.
PART_DTYPES = {"thinker": torch.bfloat16, "talker": torch.bfloat16, "token2wav": torch.float32}

# Voices (name, talker bos token) as in the release's spk_dict.pt.
VOICES = (("Chelsie", 151872), ("Ethan", 151870))

INIT_STD = 0.02

# Non-persistent buffers that the released files nevertheless store.
STORED_BUFFERS = {"token2wav": ("code2wav_dit_model.rotary_embed.inv_freq",)}

PREPROCESSOR_CONFIG = {
    "chunk_length": 300,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "n_fft": 400,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor",
    "return_attention_mask": True,
    "sampling_rate": SAMPLE_RATE,
    "temporal_patch_size": 2,
}

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}


def _is_norm_weight(name: str, t: Tensor) -> bool:
    leaf = name.rsplit(".", 2)
    owner = leaf[-2].lower() if len(leaf) > 1 else ""
    return (
        t.ndim == 1
        and name.endswith("weight")
        and ("norm" in owner or owner.startswith("ln") or owner.endswith("_ln"))
    )


@torch.no_grad()
def random_state(
    module: nn.Module, seed: int, std: float = INIT_STD, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Deterministic random values for every entry of ``module.state_dict()``.

    Weights and biases ~ N(0, std); 1-D norm weights 1; BatchNorm running stats 0/1; other
    persistent buffers (computed at construction) keep their values. Values depend only on the
    seed and the tensor names/shapes."""
    out: dict[str, Tensor] = {}
    params = dict(module.named_parameters())
    for name, ref in sorted(module.state_dict().items()):
        g = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        if name in params and ref.is_floating_point():
            if _is_norm_weight(name, ref):
                t = torch.ones(ref.shape)
            else:
                t = torch.randn(ref.shape, generator=g) * std
            out[name] = t.to(dtype)
        elif name.endswith("running_var"):
            out[name] = torch.ones(ref.shape, dtype=dtype)
        elif name.endswith("running_mean"):
            out[name] = torch.zeros(ref.shape, dtype=dtype)
        elif ref.device.type == "meta":
            out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
        else:  # a computed persistent buffer (e.g. inv_freq)
            out[name] = ref.detach().to(dtype if ref.is_floating_point() else ref.dtype).clone()
    return out


def tied_names(module: nn.Module) -> set[str]:
    """Parameter names that alias another parameter (a tied output head): stored once, under
    the first name."""
    every = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in module.named_parameters()}


def _stable_hash(s: str) -> int:
    h = 1469598103934665603  # FNV-1a, stable across runs (``hash`` is salted)
    for c in s.encode():
        h = ((h ^ c) * 1099511628211) % (2**64)
    return h


def write_safetensors(
    out_dir: str | os.PathLike, shards: list[dict[str, Tensor]], metadata: dict | None = None
) -> None:
    """Write ``shards`` as ``model-0000i-of-0000n.safetensors`` + the index (or a single
    ``model.safetensors`` when there is one shard)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    n = len(shards)
    meta = {"format": "pt", **(metadata or {})}
    if n == 1:
        save_file({k: v.contiguous() for k, v in shards[0].items()}, out / SINGLE_FILE, meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, out / fname, meta)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def make_tiny(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    config: dict | None = None,
    factories: dict[str, Callable[[OmniConfig], nn.Module]] | None = None,
    n_speaker_frames: int = 40,
    dtypes: dict[str, torch.dtype] | None = None,
) -> Path:
    """Write a tiny random checkpoint (released layout) to ``out_dir`` and return its path.

    ``config``: the config.json dict (default ``TINY_CONFIG``). ``factories``: ``{part: cfg ->
    module}`` to build instead of our classes. ``dtypes``: ``{part: dtype}`` stored instead of
    the released ones (``PART_DTYPES``). Deterministic for a given seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = json.loads(json.dumps(config if config is not None else TINY_CONFIG))
    cfg_dict.setdefault("torch_dtype", "bfloat16")
    cfg = OmniConfig.from_dict(cfg_dict)

    part_dtypes = {**PART_DTYPES, **(dtypes or {})}
    states: dict[str, dict[str, Tensor]] = {}
    for i, part in enumerate(PARTS):
        module = build_component(part, cfg, (factories or {}).get(part))
        sd = random_state(module, seed * 31 + i, dtype=part_dtypes[part])
        for name in tied_names(module):
            del sd[name]
        buffers = dict(module.named_buffers())
        for name in STORED_BUFFERS.get(part, ()):
            if name in buffers and name not in sd:  # released files store it (bf16-rounded)
                sd[name] = buffers[name].to(torch.bfloat16).to(part_dtypes[part])
        states[part] = {f"{part}.{k}": v for k, v in sd.items()}
        del module

    # Three shards like the release: the thinker split in two, the second half shared with the
    # talker, token2wav on its own.
    thinker = list(states["thinker"].items())
    half = len(thinker) // 2
    shards = [
        dict(thinker[:half]),
        {**dict(thinker[half:]), **states["talker"]},
        states["token2wav"],
    ]
    write_safetensors(out, shards)

    _write_json(out / "config.json", cfg_dict)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_tokenizer_files(out)
    torch.save(make_speakers(seed, n_frames=n_speaker_frames), out / SPEAKERS_FILE)
    # tells `omnistream generate` / the server to say plainly that these weights are random
    marker = f"random weights from `omnistream make-tiny` (seed {seed})\n"
    (out / "RANDOM_WEIGHTS").write_text(marker)
    return out


def make_speakers(seed: int = 0, n_frames: int = 40) -> dict[str, dict]:
    """Random voices in the ``spk_dict.pt`` layout: cond [1, 192], ref_mel [1, T, 80]."""
    g = torch.Generator().manual_seed(seed + 7)
    voices = {}
    for name, bos in VOICES:
        voices[name] = {
            "bos_token": bos,
            "cond": torch.randn(1, 192, generator=g),
            "ref_mel": torch.randn(1, n_frames, 80, generator=g) * 0.5 - 5.0,
        }
    return voices
