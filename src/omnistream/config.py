"""Configuration dataclasses for a Qwen2.5-Omni checkpoint's ``config.json``.

Field names are the json keys, so ``Cfg.from_dict(json)`` is the whole parser: unknown keys
(including the DiT's legacy ``dim``/``depth``/``heads`` keys) are ignored and missing keys take the
release (7B) values. Both rope spellings are read: ``rope_theta`` + ``rope_scaling`` (released
files) and ``rope_parameters`` (files written by transformers 5).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="_Config")


@dataclass
class _Config:
    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any] | None) -> C:
        d = dict(d or {})
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            v = d[f.name]
            sub = _SUBCONFIGS.get((cls.__name__, f.name))
            kw[f.name] = sub.from_dict(v) if sub is not None else v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, _Config) else v) for k, v in self.__dict__.items()}


def _rope(theta: float | None, scaling: dict | None, params: dict | None, default_theta: float):
    """Resolve (theta, mrope_section) from either rope spelling."""
    p = dict(params or {})
    s = dict(scaling or {})
    t = p.get("rope_theta", theta if theta is not None else default_theta)
    sec = p.get("mrope_section", s.get("mrope_section"))
    return float(t), (list(sec) if sec is not None else None)


class _MRope:
    """The multimodal rotary settings of the Thinker's and the Talker's decoders."""

    rope_theta: float | None
    rope_scaling: dict | None
    rope_parameters: dict | None

    @property
    def theta(self) -> float:
        return _rope(self.rope_theta, self.rope_scaling, self.rope_parameters, 1e6)[0]

    @property
    def mrope_section(self) -> list[int]:
        sec = _rope(self.rope_theta, self.rope_scaling, self.rope_parameters, 1e6)[1]
        return sec if sec is not None else [16, 24, 24]


@dataclass
class TextConfig(_MRope, _Config):
    """Thinker text decoder (Qwen2.5)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class AudioEncoderConfig(_Config):
    """Whisper-style block-wise audio encoder."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    scale_embedding: bool = False
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584


@dataclass
class VisionEncoderConfig(_Config):
    """ViT with 2-D rotary, window attention and a 2x2 patch merger."""

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ThinkerConfig(_Config):
    audio_config: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    vision_config: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    user_token_id: int = 872
    pad_token_id: int = 151643
    bos_token_id: int = 151644
    eos_token_id: int = 151645


@dataclass
class TalkerConfig(_MRope, _Config):
    """The Talker: a Qwen2 decoder over codec tokens, input in thinker-hidden space."""

    vocab_size: int = 8448
    embedding_size: int = 3584
    hidden_size: int = 896
    intermediate_size: int = 18944
    num_hidden_layers: int = 24
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    audio_token_index: int = 151646
    image_token_index: int = 151655
    video_token_index: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2


@dataclass
class DiTConfig(_Config):
    """Flow-matching DiT (and its ECAPA-TDNN speaker encoder). Legacy keys are ignored."""

    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    ff_mult: int = 2
    emb_dim: int = 512
    head_dim: int = 64
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int = 32768
    block_size: int = 24
    look_ahead_layers: list[int] = field(default_factory=lambda: [10])
    look_backward_layers: list[int] = field(default_factory=lambda: [0, 20])
    repeats: int = 2
    num_embeds: int = 8193
    mel_dim: int = 80
    enc_emb_dim: int = 192
    enc_dim: int = 128
    enc_channels: list[int] = field(default_factory=lambda: [256, 256, 256, 256, 768])
    enc_kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    enc_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64

    @property
    def theta(self) -> float:
        return _rope(self.rope_theta, None, self.rope_parameters, 10000.0)[0]


@dataclass
class BigVGANConfig(_Config):
    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    upsample_rates: list[int] = field(default_factory=lambda: [5, 3, 2, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 7, 4, 4, 4, 4])


@dataclass
class Token2WavConfig(_Config):
    dit_config: DiTConfig = field(default_factory=DiTConfig)
    bigvgan_config: BigVGANConfig = field(default_factory=BigVGANConfig)
    # omnistream keys, absent from the release: the checkpoint's decode defaults (a session's
    # ode_steps / solver / guidance_scale left None). The release's values when absent; a small
    # DiT trained here decodes well with fewer, cheaper steps.
    ode_steps: int = 10
    solver: str = "rk4"
    guidance_scale: float = 0.5

    def decode_options(self, steps: int | None = None, solver: str | None = None,
                       guidance_scale: float | None = None) -> tuple[int, str, float]:
        """(steps, solver, guidance_scale), each None filled from this checkpoint's defaults."""
        return (self.ode_steps if steps is None else steps,
                self.solver if solver is None else solver,
                float(self.guidance_scale if guidance_scale is None else guidance_scale))


@dataclass
class CodecEncoderConfig(_Config):
    """omnistream's speech tokenizer (``codec/encoder.py``): not in the release; a checkpoint
    carries it when ``config.json`` has ``codec_encoder_config`` (weights ``codec_encoder.*``)."""

    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 6
    kernel_size: int = 7  # depthwise conv taps at 50 Hz (causal)
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ: 1000 codes


@dataclass
class OmniConfig(_Config):
    """Top-level ``config.json`` (model_type ``qwen2_5_omni``)."""

    thinker_config: ThinkerConfig = field(default_factory=ThinkerConfig)
    talker_config: TalkerConfig = field(default_factory=TalkerConfig)
    token2wav_config: Token2WavConfig = field(default_factory=Token2WavConfig)
    enable_audio_output: bool = True
    codec_encoder_config: CodecEncoderConfig | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> OmniConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


_SUBCONFIGS: dict[tuple[str, str], type[_Config]] = {
    ("ThinkerConfig", "audio_config"): AudioEncoderConfig,
    ("ThinkerConfig", "vision_config"): VisionEncoderConfig,
    ("ThinkerConfig", "text_config"): TextConfig,
    ("Token2WavConfig", "dit_config"): DiTConfig,
    ("Token2WavConfig", "bigvgan_config"): BigVGANConfig,
    ("OmniConfig", "thinker_config"): ThinkerConfig,
    ("OmniConfig", "talker_config"): TalkerConfig,
    ("OmniConfig", "token2wav_config"): Token2WavConfig,
    ("OmniConfig", "codec_encoder_config"): CodecEncoderConfig,
}
