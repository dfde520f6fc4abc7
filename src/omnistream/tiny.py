"""The tiny random configuration behind ``omnistream make-tiny`` and the tests.

Shapes are small but every structural feature of the release is kept: GQA, M-RoPE sections,
audio chunking, vision windows with full-attention blocks, the real vocabulary ids (the text
vocabulary is the 3B one, 151936, so every special token exists), the real codec vocabulary, the
DiT block masks, and BigVGAN's 240-sample hop.
"""

from __future__ import annotations

import copy
from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "model_type": "qwen2_5_omni",
    "architectures": ["Qwen2_5OmniModel"],
    "enable_audio_output": True,
    "thinker_config": {
        "model_type": "qwen2_5_omni_thinker",
        "audio_token_index": 151646,
        "image_token_index": 151655,
        "video_token_index": 151656,
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "audio_start_token_id": 151647,
        "audio_end_token_id": 151648,
        "user_token_id": 872,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "text_config": {
            "model_type": "qwen2_5_omni_text",
            "vocab_size": 151936,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "tie_word_embeddings": False,
        },
        "audio_config": {
            "model_type": "qwen2_5_omni_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "max_source_positions": 1500,
            "n_window": 100,
            "output_dim": 64,
        },
        "vision_config": {
            "model_type": "qwen2_5_omni_vision_encoder",
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1, 3],
        },
    },
    "talker_config": {
        "model_type": "qwen2_5_omni_talker",
        "vocab_size": 8448,
        "embedding_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        "max_position_embeddings": 32768,
    },
    "token2wav_config": {
        "model_type": "qwen2_5_omni_token2wav",
        "dit_config": {
            "model_type": "qwen2_5_omni_dit",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "head_dim": 32,
            "ff_mult": 2,
            "emb_dim": 32,
            "block_size": 24,
            "look_ahead_layers": [2],
            "look_backward_layers": [0, 3],
            "repeats": 2,
            "num_embeds": 8193,
            "mel_dim": 80,
            "enc_emb_dim": 192,
            "enc_dim": 16,
            "enc_channels": [32, 32, 32, 32, 96],
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 8,
            "enc_res2net_scale": 2,
            "enc_se_channels": 8,
        },
        "bigvgan_config": {
            "model_type": "qwen2_5_omni_bigvgan",
            "mel_dim": 80,
            "upsample_initial_channel": 64,
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "upsample_rates": [5, 3, 2, 2, 2, 2],
            "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
        },
    },
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A deep copy of the tiny config; ``overrides`` are dotted paths, e.g.
    ``tiny_config(**{"thinker_config.audio_config.n_window": 50})``."""
    cfg = copy.deepcopy(TINY_CONFIG)
    for path, value in overrides.items():
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
