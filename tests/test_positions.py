"""TMRoPE position ids against the transformers thinker's ``get_rope_index``."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_hf_config

from omnistream.config import OmniConfig
from omnistream.nn.positions import (
    PositionCursor,
    audio_token_count,
    chunk_labels,
    decode_position_ids,
    get_rope_index,
)
from omnistream.tiny import tiny_config

CFG = OmniConfig.from_dict(tiny_config()).thinker_config


@pytest.fixture(scope="module")
def ref():
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    # the 5.24 thinker config has no vision_start_token_id field (the release json does)
    hf = tiny_hf_config(**{"thinker_config.vision_start_token_id": CFG.vision_start_token_id})
    with torch.device("meta"):  # only the method is needed, not weights
        return Qwen2_5OmniThinkerForConditionalGeneration(hf.thinker_config)


def _layout(items):
    """Token ids of one prompt plus its media metadata. Items: ("t", n), ("a", mel_len),
    ("i", grid), ("v", grid, second_per_grid), ("av", grid, second_per_grid, mel_len)."""
    c, toks, meta = CFG, [], {"images": [], "videos": [], "spgs": [], "audios": []}
    for kind, *args in items:
        if kind == "t":
            toks += [1000 + (len(toks) + k) % 500 for k in range(args[0])]
        elif kind == "a":
            meta["audios"].append(args[0])
            n = audio_token_count(args[0])
            toks += [c.audio_start_token_id] + [c.audio_token_index] * n + [c.audio_end_token_id]
        elif kind == "i":
            meta["images"].append(args[0])
            n = args[0][0] * args[0][1] * args[0][2] // 4
            toks += [c.vision_start_token_id] + [c.image_token_index] * n + [c.vision_end_token_id]
        else:
            grid, spg = args[0], args[1]
            meta["videos"].append(grid)
            meta["spgs"].append(spg)
            n = grid[0] * grid[1] * grid[2] // 4
            if kind == "v":
                toks += [c.vision_start_token_id] + [c.video_token_index] * n
                toks += [c.vision_end_token_id]
            else:  # positions don't depend on how the body interleaves, only on its length
                meta["audios"].append(args[2])
                na = audio_token_count(args[2])
                toks += [c.vision_start_token_id, c.audio_start_token_id]
                toks += [c.video_token_index] * n + [c.audio_token_index] * na
                toks += [c.audio_end_token_id, c.vision_end_token_id]
    return toks, meta


def _check(ref, rows, use_audio_in_video=False, mask_none=False):
    built = [_layout(r) for r in rows]
    T = max(len(t) for t, _ in built)
    ids = torch.full((len(rows), T), CFG.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (toks, _) in enumerate(built):  # left padding
        ids[b, T - len(toks) :] = torch.tensor(toks)
        mask[b, T - len(toks) :] = 1

    def cat(key, dtype):
        vals = [v for _, m in built for v in m[key]]
        return torch.tensor(vals, dtype=dtype) if vals else None

    images, videos = cat("images", torch.long), cat("videos", torch.long)
    spgs, audios = cat("spgs", torch.float32), cat("audios", torch.long)
    want_pos, want_delta = ref.get_rope_index(
        ids, images, videos, mask, use_audio_in_video, audios, spgs
    )
    got_pos, got_delta = get_rope_index(
        ids, images, videos, None if mask_none else mask, use_audio_in_video, audios, spgs, CFG
    )
    assert got_pos.shape == (3, *ids.shape) and got_pos.dtype == want_pos.dtype
    torch.testing.assert_close(got_pos, want_pos, rtol=0, atol=0)
    torch.testing.assert_close(got_delta, want_delta.long().reshape(-1, 1), rtol=0, atol=0)
    return got_pos, got_delta


def test_text_only(ref):
    _check(ref, [[("t", 7)]], mask_none=True)
    _check(ref, [[("t", 9)], [("t", 4)]])  # left padding


def test_audio(ref):
    _check(ref, [[("t", 3), ("a", 137), ("t", 2), ("a", 100), ("t", 4)]])
    _check(ref, [[("a", 3000), ("t", 1)], [("t", 2), ("a", 77), ("t", 3)]])


@pytest.mark.parametrize("grid", [(1, 6, 10), (1, 4, 4), (1, 14, 2), (2, 6, 10)])
def test_image(ref, grid):
    _check(ref, [[("t", 3), ("i", grid), ("t", 5)]])


def test_images_and_audio(ref):
    _check(ref, [[("i", (1, 6, 10)), ("t", 2), ("a", 213), ("i", (1, 8, 4)), ("t", 3)]])


@pytest.mark.parametrize("spg", [1.0, 0.5, 2 / 3, 0.1, 3.0])
@pytest.mark.parametrize("grid", [(5, 6, 10), (12, 4, 4), (1, 2, 2)])
def test_video(ref, grid, spg):
    _check(ref, [[("t", 4), ("v", grid, spg), ("t", 3)]])


@pytest.mark.parametrize("spg", [1.0, 0.5, 2 / 3, 3.0])
@pytest.mark.parametrize(
    "grid, mel",
    [
        ((6, 6, 10), 537),  # audio (5.4 s) longer than video (6 s at 1.0 -> shorter below 1.0)
        ((16, 4, 4), 333),  # video longer than audio
        ((4, 4, 6), 1000),  # audio a multiple of 50 tokens (250)
        ((1, 40, 8), 12),  # 3 audio tokens, a tall frame: eos follows the last piece, not the max
        ((3, 2, 2), 9),
    ],
)
def test_audio_in_video(ref, grid, mel, spg):
    _check(ref, [[("t", 5), ("av", grid, spg, mel), ("t", 3)]], use_audio_in_video=True)


def test_mixed_prompt(ref):
    row = [
        ("t", 3), ("av", (8, 6, 10), 1.0, 1234), ("t", 2), ("a", 411), ("i", (1, 6, 10)),
        ("av", (5, 4, 4), 2 / 3, 350), ("t", 6),
    ]  # fmt: skip
    _check(ref, [row], use_audio_in_video=True)
    row = [("t", 2), ("v", (4, 6, 10), 0.5), ("a", 99), ("i", (1, 2, 2)), ("v", (3, 4, 4), 1.0)]
    _check(ref, [row + [("t", 1)]])


def test_batch_left_padding(ref):
    rows = [
        [("t", 4), ("i", (1, 6, 10)), ("t", 3), ("v", (3, 4, 4), 0.5), ("t", 2)],
        [("t", 2), ("a", 187), ("t", 1)],
        [("v", (7, 6, 6), 2 / 3), ("t", 2)],
    ]
    pos, _ = _check(ref, rows)
    assert (pos[:, 1, :5] == 1).all()  # padding gets 1
    rows = [
        [("t", 3), ("av", (6, 4, 6), 1.0, 600), ("t", 2)],
        [("t", 1), ("av", (2, 2, 2), 0.5, 220), ("t", 5)],
    ]
    _check(ref, rows, use_audio_in_video=True)


def test_chunk_labels_match_reference(ref):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        steps = torch.randint(0, 80, (40,), generator=g) * (torch.rand(40, generator=g) < 0.4)
        ids = torch.cat([torch.zeros(1, dtype=torch.long), steps.cumsum(0)])
        labels = chunk_labels(ids, 50)
        spans = ref.get_chunked_index(ids, 50, 0)
        want = torch.cat([torch.full((e - s,), k) for k, (s, e) in enumerate(spans)])
        assert torch.equal(labels, want)


def test_live_video_chunks_equal_offline():
    """Feeding an audio-in-video item 2 s at a time gives the offline ids."""
    grid, spg, n_audio = (9, 6, 10), 0.5, 333
    offline = PositionCursor.from_config(CFG, start=17)
    want = [offline.text(2), offline.audio_in_video(grid, spg, n_audio), offline.text(3)]
    want = torch.cat(want, 1)

    live = PositionCursor.from_config(CFG, start=17)
    got = [live.text(2), live.open_video(grid[1:], spg, with_audio=True)]
    per_frame, frames_per_chunk = 15, 4  # 2 s / (0.5 s per grid) -> 4 temporal grids a chunk
    frames_left, audio_left = grid[0], n_audio
    while frames_left or audio_left:
        nf, na = min(frames_per_chunk, frames_left), min(50, audio_left)
        got.append(live.video_chunk(nf * per_frame, na))
        frames_left, audio_left = frames_left - nf, audio_left - na
    got += [live.close_video(), live.text(3)]
    assert torch.equal(torch.cat(got, 1), want)
    assert live.next == offline.next


def test_decode_positions(ref):
    rows = [[("t", 4), ("i", (1, 6, 10)), ("t", 3)], [("t", 2), ("a", 187)]]
    pos, delta = _check(ref, rows)
    n_real = torch.tensor([len(_layout(r)[0]) for r in rows])
    nxt = decode_position_ids(n_real, delta, n=2)  # [3, B, 2]
    assert torch.equal(nxt[:, :, 0], pos.amax(-1) + 1)
    assert torch.equal(nxt[:, :, 1], pos.amax(-1) + 2)
