"""TMRoPE position ids for the thinker: three rows (t, h, w) per token.

Every prompt item advances one running index, the *cursor* (the next free id):

* text, and any bos/eos token: sequential ids, equal on all three rows;
* audio (bos, n tokens, eos): sequential ids too (25 tokens per second);
* image / video (bos, grid, eos): t row ``floor(k * second_per_grid * 25)`` for temporal grid k
  (images: second_per_grid 1), h/w rows the merged-grid coordinates, all offset by the cursor;
* audio in video (vision bos, audio bos, chunks, audio eos, vision eos): both bos share one id,
  video and audio ids (both starting at the same base) are cut into 2-second chunks of 50 ids and
  emitted V0 A0 V1 A1 ...; both eos share one id.

After an item the cursor is the max of the last emitted piece + 1 (for audio in video that is the
last chunk piece, as in the reference, not necessarily the item's max).

``PositionCursor`` produces the ids item by item, and a video item also chunk by chunk
(``open_video`` / ``video_chunk`` / ``close_video``) so a live stream can be positioned as it
arrives. ``get_rope_index`` parses a whole prompt with it. Decoding after a prompt uses
``rope_delta = max + 1 - n_tokens``: the k-th generated token (k from 0) sits at
``n_tokens + k + rope_delta`` on all rows (``decode_position_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest

import torch
from torch import Tensor

from omnistream.config import ThinkerConfig


def audio_token_count(feature_len: int | Tensor) -> int | Tensor:
    """Audio tokens produced from ``feature_len`` mel frames (conv stride 2, then pool 2)."""
    return ((feature_len - 1) // 2 + 1 - 2) // 2 + 1


def chunk_labels(ids: Tensor, c: int) -> Tensor:
    """Chunk index of each id of a non-decreasing sequence that starts at 0.

    Nominally ``ids // c``, but, as in the reference (model and processor), a label advances by
    at most one per token: ``label[i] = min(label[i-1] + 1, ids[i] // c)``. That differs only when
    one step crosses several chunk boundaries (second_per_grid > 2: a frame may then be split
    across chunks). Closed form of the recurrence: ``cummin(ids // c - i) + i``.
    """
    i = torch.arange(len(ids))
    return torch.cummin(ids // c - i, 0).values + i


def _seq(start: int, n: int) -> Tensor:
    return torch.arange(start, start + n).expand(3, n)  # [3, n]


@dataclass
class _OpenVideo:
    """A video item whose chunks are still arriving."""

    base: int  # id of grid position (t=0, h=0, w=0)
    grid_h: int  # merged grid
    grid_w: int
    second_per_grid: Tensor  # 0-d float32, as the reference computes the t row in float32
    with_audio: bool
    video_done: int = 0  # video tokens emitted so far
    audio_done: int = 0  # audio tokens emitted so far
    last_max: int = -1  # max id of the last emitted piece


@dataclass
class PositionCursor:
    """Running TMRoPE index of one sequence. Every method returns absolute ids ``[3, n]`` (rows
    t, h, w) for the tokens it covers, in token order, and advances the cursor."""

    next: int = 0  # first free id
    spatial_merge_size: int = 2
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    _video: _OpenVideo | None = None

    @classmethod
    def from_config(cls, cfg: ThinkerConfig, start: int = 0) -> PositionCursor:
        return cls(
            next=start,
            spatial_merge_size=cfg.vision_config.spatial_merge_size,
            position_id_per_seconds=cfg.position_id_per_seconds,
            seconds_per_chunk=cfg.seconds_per_chunk,
        )

    @property
    def ids_per_chunk(self) -> int:
        return int(self.position_id_per_seconds * self.seconds_per_chunk)

    # -- whole items --------------------------------------------------------------------------

    def text(self, n: int) -> Tensor:
        """``n`` sequential ids: text, special tokens, or a live run of audio tokens."""
        assert self._video is None, "a video item is open"
        ids = _seq(self.next, n)
        self.next += n
        return ids

    def audio(self, n_tokens: int) -> Tensor:
        """An audio item: bos, ``n_tokens`` audio tokens (see ``audio_token_count``), eos."""
        return self.text(n_tokens + 2)

    def image(self, grid_thw: Sequence[int] | Tensor) -> Tensor:
        """An image item: bos, the merged grid, eos."""
        return self.video(grid_thw, 1.0)

    def video(self, grid_thw: Sequence[int] | Tensor, second_per_grid: float | Tensor) -> Tensor:
        """A video item without audio: bos, the merged grid (frame by frame), eos."""
        t, h, w = (int(x) for x in grid_thw)
        bos = self.open_video((h, w), second_per_grid)
        body = self.video_chunk(t * self._video.grid_h * self._video.grid_w)
        return torch.cat([bos, body, self.close_video()], 1)

    def audio_in_video(
        self, grid_thw: Sequence[int] | Tensor, second_per_grid: float | Tensor, n_audio: int
    ) -> Tensor:
        """A video item with its audio track (``n_audio`` audio tokens): two bos, V0 A0 V1 A1 ...
        in 2-second chunks, two eos."""
        t, h, w = (int(x) for x in grid_thw)
        bos = self.open_video((h, w), second_per_grid, with_audio=True)
        v, c = self._video, self.ids_per_chunk
        frame_t = self._frame_t(torch.arange(t)).repeat_interleave(v.grid_h * v.grid_w)  # [t*h*w]
        n_video = torch.bincount(chunk_labels(frame_t, c)).tolist()  # video tokens per chunk
        n_aud = [min(c, n_audio - s) for s in range(0, n_audio, c)]  # audio tokens per chunk
        pairs = zip_longest(n_video, n_aud, fillvalue=0)
        body = [self.video_chunk(nv, na) for nv, na in pairs]
        return torch.cat([bos, *body, self.close_video()], 1)

    # -- a video item piece by piece (live streams) -------------------------------------------

    def open_video(
        self,
        grid_hw: Sequence[int] | Tensor,
        second_per_grid: float | Tensor,
        with_audio: bool = False,
    ) -> Tensor:
        """Start a video item; returns the bos id(s) (two sharing one id ``with_audio``).
        ``grid_hw`` is the patch grid (before the spatial merge) of every frame."""
        assert self._video is None, "a video item is already open"
        h, w = (int(x) // self.spatial_merge_size for x in grid_hw)
        n_bos = 2 if with_audio else 1
        bos = _seq(self.next, 1).expand(3, n_bos)
        spg = torch.as_tensor(second_per_grid, dtype=torch.float32).reshape(())
        self._video = _OpenVideo(self.next + 1, h, w, spg, with_audio)
        return bos

    def video_chunk(self, n_video: int, n_audio: int = 0) -> Tensor:
        """The next ``n_video`` video tokens (continuing frame by frame, row-major over the merged
        grid) followed by the next ``n_audio`` audio tokens of the open item.

        To match offline positioning, feed chunk k = the video tokens whose t id is in
        ``[50k, 50(k+1))`` and audio tokens ``[50k, 50(k+1))`` (both relative to the item)."""
        v = self._video
        assert v is not None, "no open video item"
        assert n_audio == 0 or v.with_audio, "audio tokens in a video item opened without audio"
        idx = torch.arange(v.video_done, v.video_done + n_video)
        frame, cell = idx // (v.grid_h * v.grid_w), idx % (v.grid_h * v.grid_w)
        video = torch.stack([self._frame_t(frame), cell // v.grid_w, cell % v.grid_w]) + v.base
        audio = _seq(v.base + v.audio_done, n_audio)
        v.video_done += n_video
        v.audio_done += n_audio
        for piece in (video, audio):
            if piece.numel():
                v.last_max = int(piece.max())
        return torch.cat([video, audio], 1)  # [3, n_video + n_audio]

    def close_video(self) -> Tensor:
        """End the open video item; returns the eos id(s) (one id after the last piece's max)."""
        v = self._video
        assert v is not None, "no open video item"
        eos = max(v.last_max + 1, v.base)
        self._video = None
        self.next = eos + 1
        return _seq(eos, 1).expand(3, 2 if v.with_audio else 1)

    def _frame_t(self, frame: Tensor) -> Tensor:
        # float32 in the reference's order: (k * second_per_grid) * 25, then truncate
        return (frame * self._video.second_per_grid * self.position_id_per_seconds).long()


def get_rope_index(
    input_ids: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    attention_mask: Tensor | None,
    use_audio_in_video: bool,
    audio_seqlens: Tensor | None,
    second_per_grids: Tensor | Sequence[float] | None,
    cfg: ThinkerConfig,
) -> tuple[Tensor, Tensor]:
    """TMRoPE ids of a batch of prompts.

    Args:
        input_ids: ``[B, T]`` token ids, laid out as the processor does (each item from its bos to
            its eos; audio in video as vision bos, audio bos, chunks, audio eos, vision eos).
        image_grid_thw / video_grid_thw: ``[N, 3]`` / ``[M, 3]`` patch grids (before the merge)
            of the images / videos, in prompt order across the batch.
        attention_mask: ``[B, T]``, 0 on (left) padding; None = no padding.
        use_audio_in_video: whether videos carry their audio track; the layout decides per item,
            this only rejects audio-in-video items when False.
        audio_seqlens: ``[K]`` mel *feature* lengths (frames, e.g. ``feature_attention_mask.sum
            (-1)``) of every audio item, audio-in-video tracks included, in prompt order; the
            token count is ``audio_token_count(len)``. Same argument as the reference.
        second_per_grids: ``[M]`` seconds per temporal grid of each video (temporal_patch / fps).
        cfg: the thinker config (token ids, merge size, 25 ids/s, 2 s chunks).

    Returns:
        position_ids ``[3, B, T]`` (dtype of input_ids; padding gets 1) and rope_deltas ``[B, 1]``
        (``max + 1 - number of real tokens``).
    """
    B, T = input_ids.shape
    mask = (
        torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() == 1
    )
    vs, a_bos = cfg.vision_start_token_id, cfg.audio_start_token_id
    bos_ids = torch.tensor([vs, a_bos])
    images = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    videos = iter(video_grid_thw.tolist() if video_grid_thw is not None else [])
    spgs = iter(torch.as_tensor(second_per_grids).tolist() if second_per_grids is not None else [])
    audios = iter(audio_seqlens.tolist() if audio_seqlens is not None else [])

    position_ids = torch.ones(3, B, T, dtype=input_ids.dtype)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    for b in range(B):
        row = input_ids[b].cpu()[mask[b]]
        toks = row.tolist()
        cur = PositionCursor.from_config(cfg)
        pieces, pos = [], 0
        for j in torch.nonzero(torch.isin(row, bos_ids)).flatten().tolist():
            if j < pos:  # the audio bos inside an audio-in-video item
                continue
            pieces.append(cur.text(j - pos))
            nxt = toks[j + 1] if j + 1 < len(toks) else None
            if toks[j] == a_bos:
                pieces.append(cur.audio(audio_token_count(next(audios))))
            elif nxt == cfg.image_token_index:
                pieces.append(cur.image(next(images)))
            elif nxt == cfg.video_token_index:
                pieces.append(cur.video(next(videos), next(spgs)))
            elif nxt == a_bos:
                if not use_audio_in_video:
                    raise ValueError("audio-in-video layout with use_audio_in_video=False")
                grid, spg, n_audio = next(videos), next(spgs), audio_token_count(next(audios))
                pieces.append(cur.audio_in_video(grid, spg, n_audio))
            else:
                raise ValueError(f"vision bos at {j} followed by token {nxt}")
            pos = j + pieces[-1].shape[1]
        pieces.append(cur.text(len(toks) - pos))
        ids = torch.cat(pieces, 1)  # [3, n]
        if ids.shape[1] != len(toks):
            raise ValueError(f"row {b}: items cover {ids.shape[1]} tokens, prompt has {len(toks)}")
        position_ids[:, b, mask[b]] = ids.to(position_ids.dtype)
        deltas[b] = (int(ids.max()) + 1 if len(toks) else 0) - len(toks)
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def decode_position_ids(n_seen: int | Tensor, rope_deltas: Tensor, n: int = 1) -> Tensor:
    """Ids ``[3, B, n]`` of the next ``n`` tokens once ``n_seen`` real tokens (int, or ``[B]``
    per row when padded) are in the cache: ``n_seen + k + rope_delta`` on all rows."""
    n_seen = torch.as_tensor(n_seen, device=rope_deltas.device).reshape(-1, 1)
    ids = n_seen + torch.arange(n, device=rope_deltas.device) + rope_deltas  # [B, n]
    return ids.unsqueeze(0).expand(3, -1, -1)
