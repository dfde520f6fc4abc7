"""Live user input (engine/live.py): streamed pieces == the whole turn processed offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize_

from omnistream.config import OmniConfig
from omnistream.engine.live import LiveTurn, StreamingResampler, prefill_segment
from omnistream.media.audio import log_mel_spectrogram, resample
from omnistream.media.image import normalize, patchify
from omnistream.nn.positions import chunk_labels
from omnistream.nn.thinker import Media, Thinker
from omnistream.tiny import tiny_config

PREFIX = [151644, 872, 198]  # <|im_start|>user\n
SUFFIX = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n
OFFSET = 7  # the turn continues a conversation: its first TMRoPE id


@pytest.fixture(scope="module")
def thinker() -> Thinker:
    torch.manual_seed(0)
    th = Thinker(OmniConfig.from_dict(tiny_config()).thinker_config).eval()
    return randomize_(th, seed=1, std=0.1)


def speechy(seconds: float, sr: int, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    """A few sines plus noise: every mel bin busy."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * f * t + g.uniform(0, 6)) for f in (220, 440, 1250, 3100))
    x = 0.2 * x + g.standard_normal(t.size)
    return (amp * x / np.abs(x).max()).astype(np.float32)


def pieces(x: np.ndarray, sr: int, seed: int, lo: float = 0.1, hi: float = 0.7):
    """(offset in samples, piece) with uneven sizes of lo..hi seconds."""
    g, i = np.random.default_rng(seed), 0
    while i < x.size:
        n = int(g.uniform(lo, hi) * sr)
        yield i, x[i : i + n]
        i += n


def offline_audio(th: Thinker, pcm16: np.ndarray) -> tuple[torch.Tensor, int]:
    feats, n_valid = log_mel_spectrogram(pcm16)
    tok, _ = th.audio_tower(feats, torch.tensor([n_valid]))
    return tok, n_valid


def offline_prefill(th: Thinker, ids: list[int], media: Media):
    """The offline reference: ids + media through Thinker.prefill (get_rope_index positions)."""
    ids_t = torch.tensor([ids])
    cache = th.model.new_cache(1, len(ids) + 8)
    with torch.no_grad():
        step = th.prefill(ids_t, cache, media=media, position_offset=OFFSET)
    return step


def run_live(th: Thinker, events, video: bool, **kw):
    """Drive a LiveTurn with events (kind, payload, time) and prefill every segment as it comes,
    as the session does (a segment restarting earlier rolls the cache back). Returns (ids, embeds,
    pos, logits, turn, cache length before commit, commit, segments handed out before commit)."""
    if video:  # small frames for the tiny model
        kw = {"video_min_pixels": 28 * 28 * 4, "video_max_pixels": 112 * 112, **kw}
    turn = LiveTurn(th, PREFIX, position_offset=OFFSET, video=video, **kw)
    cache = th.model.new_cache(1, 4096)
    segs = [turn.poll()]
    for kind, payload, t in events:
        if kind == "audio":
            segs.append(turn.append_audio(payload[0], payload[1], t))
        else:
            segs.append(turn.append_video_frame(payload, t))
    segs = [s for s in segs if s is not None]
    ids, emb, pos = [], [], []  # what the cache holds, token by token
    for s in segs:
        prefill_segment(th, cache, s)
        del ids[s.start :], emb[s.start :], pos[s.start :]
        ids += s.ids.tolist()
        emb += list(s.embeds)
        pos += list(s.position_ids.T)
    n_before = cache.length
    c = turn.commit(SUFFIX)
    logits, _ = prefill_segment(th, cache, c.segment)
    s = c.segment
    del ids[s.start :], emb[s.start :], pos[s.start :]
    ids, emb = torch.tensor(ids + s.ids.tolist()), torch.cat([torch.stack(emb), s.embeds])
    pos = torch.cat([torch.stack(pos, 1), s.position_ids], 1)
    assert c.n_tokens == len(ids) == cache.length
    assert c.next_position - cache.length == int(pos.max()) + 1 - len(ids)
    return ids, emb, pos, logits, turn, n_before, c, segs


def assert_same(live, step, ids):
    l_ids, l_emb, l_pos, l_logits = live[:4]
    assert l_ids.tolist() == ids
    assert torch.equal(l_pos, step.position_ids[:, 0])
    torch.testing.assert_close(l_emb, step.embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_logits, step.logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sr", [44100, 8000])
def test_streaming_resampler_equals_offline(sr):
    x = speechy(1.3, sr, seed=3)
    rs = StreamingResampler(sr)
    y = np.concatenate([rs.push(p) for _, p in pieces(x, sr, seed=4, lo=0.003, hi=0.2)]
                       + [rs.flush()])
    ref = resample(x, sr)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_audio_pieces_equal_offline(thinker):
    sr = 24000
    x = speechy(5.3, sr)
    events = [("audio", (p, sr), None) for _, p in pieces(x, sr, seed=1)]
    live = run_live(thinker, events, video=False)
    turn, n_before, c = live[4:7]
    assert c.rollback_to is None
    assert n_before >= len(PREFIX) + 1 + 2 * 50  # two full blocks were prefilled during speech

    tok, n_valid = offline_audio(thinker, resample(x, sr))
    c_ = thinker.cfg
    ids = PREFIX + [c_.audio_start_token_id] + [c_.audio_token_index] * len(tok) + [
        c_.audio_end_token_id] + SUFFIX
    step = offline_prefill(thinker, ids, Media(audio_embeds=tok,
                                               audio_seqlens=torch.tensor([n_valid])))
    assert_same(live, step, ids)


FRAME_HW = (56, 84)  # already a smart_resize size: both sides use the frames as they are


def av_media(n_frames: int, seconds: float, seed: int = 0):
    g = np.random.default_rng(seed)
    frames = [g.integers(0, 256, (*FRAME_HW, 3), dtype=np.uint8) for _ in range(n_frames)]
    return frames, speechy(seconds, 16000, seed=seed)


def av_events(frames, times, audio, sr=16000, seed=2, drop_audio: int | None = None):
    """Frames at their timestamps and audio pieces (with timestamps) merged in time order."""
    ev = [(t, 0, ("video", f, t)) for f, t in zip(frames, times, strict=True)]
    for i, (off, p) in enumerate(pieces(audio, sr, seed)):
        if i != drop_audio:
            t0 = off / sr
            ev.append((t0 + p.size / sr, 1, ("audio", (p, sr), t0)))  # available at its end
    return [e for *_, e in sorted(ev, key=lambda e: e[:2])]


def offline_av(th: Thinker, frames, audio16: np.ndarray, second_per_grid: float = 1.0):
    c = th.cfg
    x = normalize(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
    pv, grid = patchify(x)
    vid = th.visual(pv, torch.tensor([grid]))
    aud, n_valid = offline_audio(th, audio16)
    # the interleaved layout: the processor's rule (prompt.py) when present, else get_rope_index's
    try:
        from omnistream.prompt import interleave_chunks

        chunks = interleave_chunks(grid, second_per_grid, len(aud))
    except ImportError:
        per_frame = grid[1] * grid[2] // 4
        frame_t = (torch.arange(grid[0]) * torch.tensor(second_per_grid) * 25).long()
        n_vid = torch.bincount(chunk_labels(frame_t.repeat_interleave(per_frame), 50)).tolist()
        n_aud = [min(50, len(aud) - s) for s in range(0, len(aud), 50)]
        n = max(len(n_vid), len(n_aud))
        chunks = zip(n_vid + [0] * (n - len(n_vid)), n_aud + [0] * (n - len(n_aud)), strict=True)
    body = sum(([c.video_token_index] * v + [c.audio_token_index] * a
                for v, a in chunks), [])
    ids = PREFIX + [c.vision_start_token_id, c.audio_start_token_id] + body + [
        c.audio_end_token_id, c.vision_end_token_id] + SUFFIX
    media = Media(audio_embeds=aud, audio_seqlens=torch.tensor([n_valid]), video_embeds=vid,
                  video_grid_thw=torch.tensor([grid]),
                  video_second_per_grid=torch.tensor([second_per_grid]), use_audio_in_video=True)
    return ids, offline_prefill(th, ids, media)


def test_audio_video_pieces_equal_offline(thinker):
    frames, audio = av_media(11, 5.3)  # 2 fps; an odd frame count: the last one is repeated
    times = [0.5 * i for i in range(len(frames))]
    live = run_live(thinker, av_events(frames, times, audio), video=True)
    turn, n_before, c = live[4:7]
    assert c.rollback_to is None and turn.dropped_frames == 0
    # V0 A0 V1 A1 were prefilled before the end of the turn
    assert n_before >= len(PREFIX) + 2 + 2 * (2 * 6 + 50)
    ids, step = offline_av(thinker, frames + frames[-1:], audio)
    assert_same(live, step, ids)


def media_positions(ids, pos, token):
    return pos[:, ids == token]


def test_gaps_keep_time_alignment(thinker):
    c = thinker.cfg
    frames, audio = av_media(10, 5.0, seed=5)
    times = [0.5 * i for i in range(len(frames))]
    full = run_live(thinker, av_events(frames, times, audio), video=True)
    base = OFFSET + len(PREFIX) + 1  # grid origin: after the shared bos id

    # a dropped audio packet: positions unchanged, result == offline with that piece silent
    drop = 3
    gapped = run_live(thinker, av_events(frames, times, audio, drop_audio=drop), video=True)
    assert gapped[4].gap_seconds > 0
    assert torch.equal(gapped[0], full[0]) and torch.equal(gapped[2], full[2])
    off, p = list(pieces(audio, 16000, seed=2))[drop]
    silent = audio.copy()
    silent[off : off + p.size] = 0
    ids, step = offline_av(thinker, frames, silent)
    assert_same(gapped, step, ids)

    # a missing frame and a frame-rate change: each pair's t id follows its first frame's time
    t2 = [0.0, 0.5, 1.0, 1.5, 2.5, 3.0, 3.25, 3.5, 3.75, 4.0, 4.5]  # 2.0 missing; 4 fps at 3 s
    f2 = frames + frames[:1]
    live = run_live(thinker, av_events(f2, t2, audio), video=True)
    ids, pos = live[0], live[2]
    vpos = media_positions(ids, pos, c.video_token_index)
    t_rows = vpos[0].view(-1, 6)[:, 0] - base  # 6 tokens per pair
    assert t_rows.tolist() == [int(t * 25) for t in t2[0::2]]  # 0 25 62 81 93 112
    assert torch.equal(media_positions(ids, pos, c.audio_token_index),
                       media_positions(full[0], full[2], c.audio_token_index))
    # chunk order: a video token never follows an audio token of a later 2 s chunk
    is_v = ids == c.video_token_index
    media = is_v | (ids == c.audio_token_index)
    chunk = (pos[0] - base) // 50
    order = chunk[media] * 2 + (~is_v[media]).long()  # V_k = 2k, A_k = 2k + 1
    assert bool((order[1:] >= order[:-1]).all())


def test_louder_end_rolls_back_to_offline(thinker):
    sr = 16000
    x = speechy(5.0, sr, seed=7, amp=1e-4)  # quiet...
    x[int(4.6 * sr) :] = speechy(0.4, sr, seed=8, amp=0.9)  # ... then a loud sound
    events = [("audio", (p, sr), None) for _, p in pieces(x, sr, seed=9)]
    live = run_live(thinker, events, video=False)
    turn, n_before, c = live[4:7]
    first_audio = len(PREFIX) + 1
    assert n_before >= first_audio + 100  # blocks 0 and 1 were prefilled with the quiet max
    assert c.rollback_to == first_audio  # block 0 must be re-encoded
    assert c.segment.start == first_audio

    tok, n_valid = offline_audio(thinker, x)
    cfg = thinker.cfg
    ids = PREFIX + [cfg.audio_start_token_id] + [cfg.audio_token_index] * len(tok) + [
        cfg.audio_end_token_id] + SUFFIX
    step = offline_prefill(thinker, ids, Media(audio_embeds=tok,
                                               audio_seqlens=torch.tensor([n_valid])))
    assert_same(live, step, ids)


def test_eager_rollback_during_speech(thinker):
    sr = 16000
    x = speechy(5.0, sr, seed=7, amp=1e-4)
    x[int(3.0 * sr) : int(3.4 * sr)] = speechy(0.4, sr, seed=8, amp=0.9)  # loud in block 1
    events = [("audio", (p, sr), None) for _, p in pieces(x, sr, seed=9)]
    live = run_live(thinker, events, video=False, eager_rollback=True)
    turn, c, segs = live[4], live[6], live[7]
    first_audio = len(PREFIX) + 1
    starts = [s.start for s in segs]
    assert first_audio in starts[2:]  # block 0 re-sent before the end of speech
    assert c.rollback_to is None and turn.rollbacks >= 1  # nothing left to redo at commit
    tok, n_valid = offline_audio(thinker, x)
    cfg = thinker.cfg
    ids = PREFIX + [cfg.audio_start_token_id] + [cfg.audio_token_index] * len(tok) + [
        cfg.audio_end_token_id] + SUFFIX
    step = offline_prefill(thinker, ids, Media(audio_embeds=tok,
                                               audio_seqlens=torch.tensor([n_valid])))
    assert_same(live, step, ids)


def test_lagging_camera_and_frame_size(thinker):
    g = np.random.default_rng(0)
    turn = LiveTurn(thinker, video=True, video_min_pixels=3136, video_max_pixels=112 * 112,
                    max_video_lag_s=1.0)
    turn.append_video_frame(g.integers(0, 256, (100, 150, 3), dtype=np.uint8), 0.0)
    assert turn._size == (84, 112)  # smart_resize of the first frame within the budget
    turn.append_video_frame(g.integers(0, 256, (50, 60, 3), dtype=np.uint8), 0.5)  # other size
    got = []
    for i in range(6):  # the camera stops; audio goes on
        seg = turn.append_audio(speechy(0.5, 16000, seed=i), 16000)
        got.append(0 if seg is None else int((seg.ids == thinker.cfg.audio_token_index).sum()))
    # chunk 0's audio waits for the camera until the audio is 1 s past the chunk end
    assert got[:5] == [0, 0, 0, 0, 0] and got[5] == 50
    turn.append_video_frame(g.integers(0, 256, (100, 150, 3), dtype=np.uint8), 1.0)  # too late
    assert turn.dropped_frames == 1
    c = turn.commit()
    assert c.rollback_to is None and c.segment is not None
