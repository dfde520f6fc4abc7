"""``omnistream bench``: the audio and vision encoders, ours vs transformers."""

from __future__ import annotations

import gc

import torch

from omnistream.bench.common import (
    Bench,
    adopt,
    default_dtype_device,
    hf_omni_config,
    omni_dict,
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
