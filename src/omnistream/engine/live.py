"""Live user input: a user turn turned into Thinker inputs while it is still being spoken.

A ``LiveTurn`` receives microphone audio and camera frames as they happen and hands back
ready-to-prefill ``Segment``s (token ids, input embeddings, TMRoPE ids), so the caller can run them
into the Thinker's KV cache during the turn. At the end of speech only the last partial 2 s block
and the closing tokens remain: the time to the first reply token does not grow with the turn.

Audio path, per piece: mono PCM at any rate -> ``StreamingResampler`` (the offline windowed-sinc
resampler, run incrementally) -> ``StreamingLogMel`` (raw log10 mel frames, final once their
400-sample window is complete) -> 2 s blocks of 200 frames -> ``AudioEncoder.stream()`` (attention
never leaves a block, so block-by-block == whole clip) -> 50 audio tokens per block.

Exactness vs. the offline path (``load_audio``/``resample`` + ``log_mel_spectrogram`` + encoder):

* resampling: the same kernel and zero padding at both ends, so the output equals ``resample`` of
  the whole concatenated piece list (to float32 summation order, ~1e-7). A sample-rate change
  mid-turn ends one resampler segment (its tail zero padded, as a clip end) and starts another:
  equal to offline resampling of each segment separately and concatenating them.
* features: raw frames are identical; the offline normalisation floors every value at
  ``clip_max - 8`` with the maximum of the *whole* clip. A block is encoded with the running
  maximum at the time it completes. That is exact unless the final maximum is higher and the block
  holds values below ``final_max - 8``. ``commit`` checks every block, re-encodes the stale ones
  with the final maximum and, if any was already handed out, reports a rollback (see below).
* gaps: ``timestamp_s`` on ``append_audio`` places a piece on the turn clock; a jump forward
  (dropped packets) is filled with zeros at the source rate, a jump back (overlap) drops the
  repeated samples. Audio token j therefore always sits at 40 ms * j of the turn clock, and the
  result equals offline on the gap-filled signal.

Video path (``video=True``): frames (RGB uint8, with timestamps on the same clock) are resized to
one size per stream (``smart_resize`` of the first frame within the video pixel budget), paired
into temporal patches of two consecutive *received* frames and encoded by the vision encoder as
each pair completes (attention never leaves a temporal patch, so this equals whole-video encoding).
A pair's TMRoPE t id is ``floor(25 * timestamp of its first frame)`` (offline: ``floor(25 * k *
second_per_grid)``, i.e. the same at a constant frame rate starting at 0), so missing frames and
frame-rate changes keep time alignment. The turn is laid out as offline audio-in-video:
``<|vision_bos|><|audio_bos|> V0 A0 V1 A1 ... <|audio_eos|><|vision_eos|>``, chunk k holding the
video pairs with t id in ``[50k, 50(k+1))`` and audio block k. A_k is handed out once audio
block k is encoded and no future frame can fall into chunk k; frames that arrive for a chunk
already closed are dropped (``dropped_frames``), and a camera lagging more than
``max_video_lag_s`` behind the audio has its chunk closed without it.

Protocol (the session's side)::

    turn = LiveTurn(thinker, prefix_ids=..., position_offset=session.next_pos, video=camera_on)
    turn_start = cache.length
    for every input:   seg = turn.append_audio(pcm, rate[, timestamp_s])  # or append_video_frame
                       if seg: feed(seg)
    c = turn.commit(suffix_ids)        # c.segment is never None after a non-empty turn
    feed(c.segment)                    # c.rollback_to is not None: the segment restarts there
    rope_deltas = c.next_position - cache.length

    def feed(seg):                                   # == prefill_segment(thinker, cache, seg,
        if cache.length > turn_start + seg.start:    #                    turn_start)
            cache.crop(turn_start + seg.start)       # a rollback: also drop the talker context
        thinker(seg.embeds[None], seg.position_ids[:, None], cache, last_only=True)

Rollbacks happen at ``commit`` by default (at most one per turn, only when the loudest moment
came after blocks were handed out). ``eager_rollback=True`` re-encodes as soon as the running
maximum rises, so a segment from ``append_*`` may also restart earlier (same ``feed``); the work
then happens while the user speaks and ``commit`` only rolls back for a rise in the last block.

Not thread-safe: one turn is driven from one thread (the model-owning loop).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from omnistream.media.audio import (
    DYNAMIC_RANGE,
    N_MELS,
    SAMPLE_RATE,
    StreamingLogMel,
    StreamingResampler,
    _from_array,
    normalize_log_mel,
)
from omnistream.media.image import FACTOR, normalize, patchify, smart_resize
from omnistream.media.video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, resize_frames

MAX_LIVE_SECONDS = 299.0  # offline features cover 300 s; stay clear of its end reflection
_T_EPS = 1e-6  # time ids: floor(25 t + eps) so that float noise in timestamps does not round down


# ---------------------------------------------------------------------------------------------
# Frames


def frame_size(
    height: int, width: int, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS
) -> tuple[int, int]:
    """Resized ``(height, width)`` of every frame of a stream whose first frame is ``height x
    width``: offline video's ``smart_resize`` with the per-frame cap. (Offline also lowers the cap
    to ``total_pixels / n_frames * 2`` for videos of more than ~300 sampled frames; a live stream
    does not know its length, so it keeps the cap.)"""
    return smart_resize(height, width, FACTOR, min_pixels, max_pixels)


def resize_frame(rgb: np.ndarray | Tensor, size: tuple[int, int]) -> Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, h, w]`` uint8 with offline video's resize (bicubic,
    antialiased, rounded back to uint8; a no-op at the target size)."""
    if isinstance(rgb, Tensor):
        x = rgb.to(torch.uint8)
    else:  # a copy: frames decoded by PIL / PyAV may be read-only views
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8))
    x = x.permute(2, 0, 1)  # [3, H, W]
    return resize_frames(x[None], *size)[0]


# ---------------------------------------------------------------------------------------------
# The turn


@dataclass
class Segment:
    """Consecutive tokens of the turn, ready for the Thinker: prefill ``embeds`` at
    ``position_ids`` into the cache at slot ``turn_start + start``."""

    start: int  # index of the first token within the turn (0 = first prefix token)
    ids: Tensor  # [n] int64 token ids (placeholders at media tokens)
    embeds: Tensor  # [n, D] input embeddings (encoder outputs at media tokens)
    position_ids: Tensor  # [3, n] absolute TMRoPE ids (rows t, h, w)

    @property
    def end(self) -> int:
        return self.start + len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Commit:
    """What ``LiveTurn.commit`` returns."""

    rollback_to: int | None  # None, or the turn index the cache must be cropped back to
    segment: Segment | None  # the rest of the turn (starting at rollback_to when set)
    next_position: int  # TMRoPE id after the turn: rope_deltas = next_position - cache.length
    n_tokens: int  # tokens in the whole turn


@dataclass
class _Piece:
    start: int
    ids: Tensor  # [n]
    embeds: Tensor  # [n, D]
    pos: Tensor  # [3, n]


@dataclass
class _Block:
    """One 2 s audio block: its raw log-mel frames and how it was encoded."""

    raw: Tensor  # [n_mels, t] raw log10 mel (t == 2 * n_window except the last block)
    min_raw: float
    max_used: float  # the clip maximum it was normalised with
    tokens: Tensor  # [k, D]
    piece: _Piece | None = None  # where it was handed out (None: not yet)


@dataclass
class _Pair:
    """An encoded temporal patch (two frames)."""

    t_id: int  # TMRoPE t id relative to the item base: floor(25 * first frame time)
    label: int  # 2 s chunk
    embeds: Tensor  # [gh/2 * gw/2, D]


@dataclass
class _Half:
    frame: Tensor  # [3, h, w] uint8
    t_id: int
    label: int


class LiveTurn:
    """One user turn arriving live; see the module docstring for the protocol.

    Args:
        thinker: the ``Thinker`` (its encoders and token embeddings are used; nothing is run
            through the decoder here).
        prefix_ids: text tokens before the media (e.g. ``<|im_start|>user\\n``, plus the system
            turn or the previous ``<|im_end|>\\n``); handed out by the first call.
        position_offset: TMRoPE id of the first prefix token (the session's running position).
        video: the turn carries a camera stream: media are laid out as audio-in-video. Without
            it, audio is a plain ``<|audio_bos|> ... <|audio_eos|>`` item and frames are refused.
        start_s: the turn clock's origin on the caller's clock (timestamps are relative to it).
        video_min_pixels, video_max_pixels: per-frame budget of ``frame_size``.
        gap_tolerance_s: audio timestamp jitter ignored (the stream stays sample-contiguous).
        max_video_lag_s: how far the audio may run ahead of the camera before a 2 s chunk is
            closed without its late frames.
        eager_rollback: re-encode handed-out blocks as soon as the running maximum makes them
            stale (segments from ``append_*`` may then restart earlier), not only at commit.
    """

    def __init__(
        self,
        thinker,
        prefix_ids: list[int] | Tensor = (),
        position_offset: int = 0,
        video: bool = False,
        start_s: float = 0.0,
        video_min_pixels: int = VIDEO_MIN_PIXELS,
        video_max_pixels: int = VIDEO_MAX_PIXELS,
        gap_tolerance_s: float = 0.01,
        max_video_lag_s: float = 2.0,
        eager_rollback: bool = False,
    ):
        cfg = thinker.cfg
        self.th = thinker
        self.cfg = cfg
        self.video = video
        self.start_s = float(start_s)
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.gap_tolerance_s = gap_tolerance_s
        self.max_video_lag_s = max_video_lag_s
        self.eager_rollback = eager_rollback
        self.device = thinker.lm_head.weight.device
        self.dtype = thinker.model.embed_tokens.weight.dtype
        self.ids_per_second = int(cfg.position_id_per_seconds)
        self.ids_per_chunk = int(cfg.position_id_per_seconds * cfg.seconds_per_chunk)
        enc = thinker.audio_tower
        self.block_frames = enc.chunk  # mel frames per 2 s block
        self.block_tokens = int(enc.output_lengths(torch.tensor(self.block_frames)))
        if video and self.block_tokens != self.ids_per_chunk:
            raise ValueError("audio blocks must cover one interleave chunk (n_window = 100)")

        self._next = int(position_offset)  # next free TMRoPE id (outside an open video item)
        self._pieces: list[_Piece] = []
        self._n_tokens = 0  # tokens queued
        self._n_out = 0  # tokens handed out
        self._opened = False
        self._committed = False
        # audio
        self._rs: StreamingResampler | None = None
        self._seg_t0 = 0.0  # turn time of the current resampler segment's first sample
        self._mel = StreamingLogMel()
        self._raw = torch.zeros(N_MELS, 0)  # raw frames of the block being filled
        self._blocks: list[_Block] = []
        self._n16 = 0  # 16 kHz samples fed to the features
        self.gaps = 0  # forward timestamp jumps filled with zeros (dropped packets)
        self.gap_seconds = 0.0  # audio time filled with zeros
        self.rollbacks = 0  # times blocks were re-encoded for a higher clip maximum
        # video
        self._size: tuple[int, int] | None = None
        self._half: _Half | None = None
        self._last_t: float | None = None
        self._pairs: deque[_Pair] = deque()
        self._min_label = 0  # chunks below this are closed to video
        self._video_done = False
        self.dropped_frames = 0
        self._chunk = 0  # audio-in-video chunk being laid out
        self._base = 0  # TMRoPE id of grid position (0, 0, 0) of the open video item
        self._last_max = -1  # max id of the last media piece (for the eos id)

        ids = torch.as_tensor(list(prefix_ids) if not isinstance(prefix_ids, Tensor)
                              else prefix_ids, dtype=torch.long).reshape(-1)
        if ids.numel():
            self._put_text(ids)

    # -- public -------------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Tokens of the turn laid out so far (handed out or queued)."""
        return self._n_tokens

    @property
    def audio_seconds(self) -> float:
        """Turn time covered by audio (16 kHz samples fed to the features, gaps included)."""
        return self._n16 / SAMPLE_RATE

    def counters(self) -> dict[str, int | float]:
        """The input-quality counters of the turn so far, as ``Usage`` field values."""
        return {"live_dropped_frames": self.dropped_frames, "live_gaps": self.gaps,
                "live_gap_s": self.gap_seconds, "live_rollbacks": self.rollbacks}

    def poll(self) -> Segment | None:
        """Tokens laid out but not yet handed out (e.g. the prefix right after construction)."""
        return self._take()

    @torch.no_grad()
    def append_audio(
        self, pcm: np.ndarray, sample_rate: int, timestamp_s: float | None = None
    ) -> Segment | None:
        """Add mono PCM (float32 in [-1, 1]; integer PCM is scaled; ``[n, channels]`` averaged).

        ``timestamp_s``: the caller-clock time of the piece's first sample; None = right after
        the previous piece. Returns the tokens that became ready (None if none)."""
        assert not self._committed, "append after commit"
        x = _from_array(pcm)
        sr = int(sample_rate)
        if self._rs is None or self._rs.orig_sr != sr:
            if self._rs is not None:  # a rate change: close the old segment
                self._feed16(self._rs.flush())
            self._seg_t0 = self._n16 / SAMPLE_RATE
            self._rs = StreamingResampler(sr)
        if timestamp_s is not None:
            expected = self._seg_t0 + self._rs.n_in / sr
            gap = (float(timestamp_s) - self.start_s) - expected
            if gap > self.gap_tolerance_s:  # dropped packets: silence keeps the clock
                fill = int(round(gap * sr))
                x = np.concatenate([np.zeros(fill, dtype=np.float32), x])
                self.gaps += 1
                self.gap_seconds += fill / sr
            elif gap < -self.gap_tolerance_s:  # overlap: drop what we already have
                x = x[min(x.size, int(round(-gap * sr))) :]
        self._open()
        self._feed16(self._rs.push(x))
        if self.eager_rollback:
            self._rewind(self._restale(self._mel.running_max))
        self._pump()
        return self._take()

    @torch.no_grad()
    def append_video_frame(self, rgb: np.ndarray | Tensor, timestamp_s: float) -> Segment | None:
        """Add a camera frame (``[H, W, 3]`` uint8) taken at caller-clock ``timestamp_s``
        (non-decreasing). Returns the tokens that became ready (None if none)."""
        assert not self._committed, "append after commit"
        if not self.video:
            raise ValueError("this turn was opened without video (LiveTurn(video=True))")
        t = float(timestamp_s) - self.start_s
        if self._last_t is not None and t < self._last_t:
            raise ValueError(f"frame timestamp {timestamp_s} goes back in time")
        self._last_t = t
        if self._size is None:
            self._size = frame_size(
                rgb.shape[0], rgb.shape[1], self.video_min_pixels, self.video_max_pixels
            )
        self._open()
        frame = resize_frame(rgb, self._size)
        t_id = math.floor(t * self.ids_per_second + _T_EPS)
        label = t_id // self.ids_per_chunk
        if self._half is None:
            if t_id < 0 or label < max(self._chunk, self._min_label):  # its chunk is closed
                self.dropped_frames += 1
            else:
                self._half = _Half(frame, t_id, label)
        else:
            h, self._half = self._half, None
            self._encode_pair(h, frame)
        self._pump()
        return self._take()

    @torch.no_grad()
    def commit(self, suffix_ids: list[int] | Tensor = ()) -> Commit:
        """End the turn: flush the audio (last partial block, final clip maximum), close the
        video (a dangling frame is paired with itself, as the processor repeats the last frame),
        close the item (eos tokens) and append ``suffix_ids`` (text after the media, then e.g.
        ``<|im_end|>\\n<|im_start|>assistant\\n``).

        If the final clip maximum changed blocks already handed out, ``rollback_to`` is the turn
        index of the first one: crop the cache back to ``turn_start + rollback_to`` and prefill
        ``segment`` (which starts there); otherwise ``segment`` continues where the last one
        ended."""
        assert not self._committed, "commit twice"
        self._committed = True
        rollback = None
        if self._rs is not None:
            self._feed16(self._rs.flush())
            rollback = self._finish_audio()
        if self._half is not None:
            h, self._half = self._half, None
            self._encode_pair(h, h.frame)
        self._video_done = True
        if self._opened:
            self._pump()
            self._close()
        ids = torch.as_tensor(list(suffix_ids) if not isinstance(suffix_ids, Tensor)
                              else suffix_ids, dtype=torch.long).reshape(-1)
        if ids.numel():
            self._put_text(ids)
        self._rewind(rollback)
        return Commit(rollback, self._take(), self._next, self._n_tokens)

    # -- audio --------------------------------------------------------------------------------

    def _feed16(self, y: np.ndarray) -> None:
        """16 kHz samples -> raw mel frames -> 2 s blocks, encoded with the running maximum."""
        if y.size == 0:
            return
        self._n16 += y.size
        if self._n16 > MAX_LIVE_SECONDS * SAMPLE_RATE:
            raise ValueError(f"live audio longer than {MAX_LIVE_SECONDS:g} s")
        self._raw = torch.cat([self._raw, self._mel.push(y)], 1)
        n = self._raw.shape[1] // self.block_frames
        if n:
            full = self._raw[:, : n * self.block_frames]
            self._raw = self._raw[:, n * self.block_frames :]
            self._add_blocks(list(full.split(self.block_frames, 1)), self._mel.running_max)

    def _add_blocks(self, raws: list[Tensor], clip_max: float) -> None:
        for raw, tok in zip(raws, self._encode(raws, clip_max), strict=True):
            self._blocks.append(_Block(raw, float(raw.min()), clip_max, tok))

    def _encode(self, raws: list[Tensor], clip_max: float) -> list[Tensor]:
        """Tokens of consecutive blocks (all full but possibly the last), normalised with
        ``clip_max``: one batched ``AudioStream`` pass."""
        if not raws:
            return []
        mel = normalize_log_mel(torch.cat(raws, 1), clip_max)  # [n_mels, T]
        stream = self.th.audio_tower.stream()
        w = self.th.audio_tower.conv1.weight
        tok = torch.cat([stream.push(mel.to(w.device, w.dtype)), stream.flush()])
        sizes = [int(self.th.audio_tower.output_lengths(torch.tensor(r.shape[1]))) for r in raws]
        return list(tok.to(self.dtype).split(sizes))

    def _finish_audio(self) -> int | None:
        """Flush the features, encode the tail with the final maximum and re-encode stale
        blocks. Returns the turn index to roll back to, or None."""
        self._raw = torch.cat([self._raw, self._mel.flush()], 1)
        clip_max = self._mel.running_max  # == the offline clip maximum
        tail = list(self._raw.split(self.block_frames, 1)) if self._raw.shape[1] else []
        self._raw = self._raw[:, :0]
        self._add_blocks(tail, clip_max)
        return self._restale(clip_max)

    def _restale(self, clip_max: float) -> int | None:
        """Re-encode the blocks whose features change under ``clip_max``; returns the turn index
        of the first one already laid out (the rollback point), or None."""
        # floor(x, m - 8) == floor(x, M - 8) for m <= M  iff  no x below M - 8 (or m == M)
        stale = [b for b in self._blocks
                 if b.max_used < clip_max and b.min_raw < clip_max - DYNAMIC_RANGE]
        if not stale:
            return None
        for b, tok in zip(stale, self._encode([b.raw for b in stale], clip_max), strict=True):
            b.tokens, b.max_used = tok, clip_max
            if b.piece is not None:
                b.piece.embeds = tok
        self.rollbacks += 1
        out = [b.piece.start for b in stale if b.piece is not None and b.piece.start < self._n_out]
        return min(out) if out else None

    # -- video --------------------------------------------------------------------------------

    def _encode_pair(self, first: _Half, second: Tensor) -> None:
        frames = torch.stack([first.frame, second])  # [2, 3, h, w] uint8
        pv, grid = patchify(normalize(frames))
        vis = self.th.visual
        w = vis.patch_embed.proj.weight
        emb = vis(pv.to(w.device, w.dtype), torch.tensor([grid]))  # [h/2 * w/2, D]
        self._pairs.append(_Pair(first.t_id, first.label, emb.to(self.dtype)))
        self._grid = grid

    def _video_floor(self) -> float:
        """The lowest chunk any future video token can fall into."""
        if self._video_done:
            return math.inf
        if self._half is not None:
            f = self._half.label
        elif self._last_t is not None:
            f = math.floor(self._last_t * self.ids_per_second + _T_EPS) // self.ids_per_chunk
        else:
            f = 0
        return max(f, self._min_label)

    # -- layout -------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        c = self.cfg
        if self.video:
            ids = [c.vision_start_token_id, c.audio_start_token_id]
            self._put(torch.tensor(ids), None, torch.full((3, 2), self._next))
            self._base = self._next + 1
        else:
            self._put_text(torch.tensor([c.audio_start_token_id]))

    def _close(self) -> None:
        c = self.cfg
        if self.video:
            eos = max(self._last_max + 1, self._base)
            ids = [c.audio_end_token_id, c.vision_end_token_id]
            self._put(torch.tensor(ids), None, torch.full((3, 2), eos))
            self._next = eos + 1
        else:
            self._put_text(torch.tensor([c.audio_end_token_id]))

    def _pump(self) -> None:
        """Lay out everything whose place in the prompt is final."""
        if not self.video:
            for b in self._blocks:
                if b.piece is None:
                    n = len(b.tokens)
                    b.piece = self._put_media(self.cfg.audio_token_index, b.tokens,
                                              torch.arange(self._next, self._next + n).expand(3, n))
                    self._next += n
            return
        while True:
            k = self._chunk
            while self._pairs and self._pairs[0].label <= k:
                self._put_pair(self._pairs.popleft())
            blk = self._blocks[k] if k < len(self._blocks) else None
            closed = self._video_floor() > k
            if not closed and blk is not None and (
                self.audio_seconds >= (k + 1) * self.cfg.seconds_per_chunk + self.max_video_lag_s
            ):  # the camera lags too far: close chunk k without it
                self._min_label = k + 1
                if self._half is not None and self._half.label <= k:
                    self._half = None
                    self.dropped_frames += 1
                closed = True
            if not closed or (blk is None and not self._committed):
                return
            if blk is not None:
                n = len(blk.tokens)
                start = self._base + k * self.ids_per_chunk
                blk.piece = self._put_media(self.cfg.audio_token_index, blk.tokens,
                                            torch.arange(start, start + n).expand(3, n))
            self._chunk += 1
            if self._committed and not self._pairs and self._chunk >= len(self._blocks):
                return

    def _put_pair(self, p: _Pair) -> None:
        m = self.th.visual.cfg.spatial_merge_size
        gh, gw = self._grid[1] // m, self._grid[2] // m
        cell = torch.arange(gh * gw)
        pos = torch.stack([torch.full_like(cell, p.t_id), cell // gw, cell % gw]) + self._base
        self._put_media(self.cfg.video_token_index, p.embeds, pos)

    def _put_media(self, token: int, embeds: Tensor, pos: Tensor) -> _Piece:
        piece = self._put(torch.full((len(embeds),), token), embeds, pos)
        if len(embeds):
            self._last_max = int(pos.max())
        return piece

    def _put_text(self, ids: Tensor) -> None:
        n = ids.numel()
        self._put(ids, None, torch.arange(self._next, self._next + n).expand(3, n))
        self._next += n

    def _put(self, ids: Tensor, embeds: Tensor | None, pos: Tensor) -> _Piece:
        ids = ids.to(self.device, torch.long)
        if embeds is None:
            embeds = self.th.model.embed_tokens(ids)
        piece = _Piece(self._n_tokens, ids, embeds, pos.to(self.device, torch.long).contiguous())
        self._pieces.append(piece)
        self._n_tokens += len(ids)
        return piece

    def _rewind(self, to: int | None) -> None:
        if to is not None:
            self._n_out = min(self._n_out, to)

    def _take(self) -> Segment | None:
        """Everything from token ``_n_out`` on, as one segment."""
        if self._n_out >= self._n_tokens:
            return None
        i = next(j for j, p in enumerate(self._pieces) if p.start + len(p.ids) > self._n_out)
        ps = self._pieces[i:]
        assert ps[0].start == self._n_out, "segments start at piece boundaries"
        seg = Segment(
            self._n_out,
            torch.cat([p.ids for p in ps]),
            torch.cat([p.embeds for p in ps]),
            torch.cat([p.pos for p in ps], 1),
        )
        self._n_out = self._n_tokens
        return seg


@torch.no_grad()
def prefill_segment(thinker, cache, seg: Segment, turn_start: int = 0) -> tuple[Tensor, Tensor]:
    """Run ``seg`` into ``cache`` at slot ``turn_start + seg.start`` (cropping a rolled-back
    cache first). Returns (next-token logits [V] float32, final hidden states [n, D])."""
    at = turn_start + seg.start
    if cache.length > at:
        cache.crop(at)
    elif cache.length < at:
        raise ValueError(f"segment starts at {at}, but the cache holds {cache.length} tokens")
    logits, hidden = thinker(seg.embeds[None], seg.position_ids[:, None], cache, last_only=True)
    return logits[0, -1], hidden[0]
