"""Audio / vision encoder parity against transformers (fp32) and streaming == offline audio."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_, tiny_hf_config

from omnistream.config import OmniConfig
from omnistream.nn.audio_encoder import AudioEncoder
from omnistream.nn.vision_encoder import VisionEncoder
from omnistream.tiny import tiny_config

ATOL = 1e-4


def _pair(kind: str, **overrides):
    """(reference, ours) for ``kind`` in {"audio", "vision"} with identical random weights."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as ref_mod

    key = f"thinker_config.{kind}_config"
    overrides = {f"{key}.{k}": v for k, v in overrides.items()}
    hf_cfg = getattr(tiny_hf_config(**overrides).thinker_config, f"{kind}_config")
    hf_cfg._attn_implementation = "sdpa"
    ours_thinker = OmniConfig.from_dict(tiny_config(**overrides)).thinker_config
    ours_cfg = getattr(ours_thinker, f"{kind}_config")
    if kind == "audio":
        ref, ours = ref_mod.Qwen2_5OmniAudioEncoder(hf_cfg), AudioEncoder(ours_cfg)
    else:
        ref, ours = ref_mod.Qwen2_5OmniVisionEncoder(hf_cfg), VisionEncoder(ours_cfg)
    randomize_(ref, seed=1, std=0.2).eval()
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in ref_sd.items()} == {k: v.shape for k, v in ours_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    return ref, ours.eval()


# -- audio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_window, lens",
    [
        (100, [200, 537, 1, 401, 199]),  # whole chunk, tails, single frame, odd lengths
        (50, [333, 100, 7, 250]),
        (25, [151, 75, 99]),  # odd encoder frames per chunk: pooling pairs cross chunks
    ],
)
@torch.no_grad()
def test_audio_parity(n_window, lens):
    ref, ours = _pair("audio", n_window=n_window)
    feature_lens = torch.tensor(lens)
    feats = torch.randn(128, sum(lens), generator=torch.Generator().manual_seed(0))
    want = ref(feats, feature_lens).last_hidden_state
    got, tok_lens = ours(feats, feature_lens)
    assert tok_lens.tolist() == ref._get_feat_extract_output_lengths(feature_lens)[1].tolist()
    assert got.shape == want.shape == (sum(tok_lens.tolist()), 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_window, n", [(100, 537), (100, 400), (25, 151), (50, 99)])
@torch.no_grad()
def test_audio_streaming_matches_offline(n_window, n):
    _, enc = _pair("audio", n_window=n_window)
    mel = torch.randn(128, n, generator=torch.Generator().manual_seed(1))
    whole, _ = enc(mel, torch.tensor([n]))
    stream, outs, i = enc.stream(), [], 0
    for step in [1, 37, 0, 150, 263, 3, 500]:  # uneven pieces, then whatever is left
        outs.append(stream.push(mel[:, i : i + step]))
        i += step
    outs.append(stream.push(mel[:, i:]))
    outs.append(stream.flush())
    got = torch.cat(outs)
    assert got.shape == whole.shape and stream.tokens_out == whole.shape[0]
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=0)


# -- vision ---------------------------------------------------------------------------------------


def _patches(grid: list[tuple[int, int, int]]) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grid)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "window_size, merge, grid",
    [
        (112, 2, [(1, 10, 14)]),  # partial windows on both edges
        (112, 2, [(1, 6, 22), (3, 8, 12), (1, 16, 16)]),  # several items, a 3-frame video
        (56, 2, [(1, 10, 14), (2, 6, 22)]),
        (56, 1, [(1, 5, 7), (2, 9, 4)]),  # no merging, odd grids
    ],
)
@torch.no_grad()
def test_vision_parity(window_size, merge, grid):
    ref, ours = _pair("vision", window_size=window_size, spatial_merge_size=merge)
    pixels, grid_thw = _patches(grid), torch.tensor(grid)
    want = ref(pixels, grid_thw).pooler_output
    got = ours(pixels, grid_thw)
    assert got.shape == want.shape == (pixels.shape[0] // merge**2, 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
