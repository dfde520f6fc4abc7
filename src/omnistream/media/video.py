"""Video input: PyAV decoding, frame sampling as ``qwen-omni-utils`` does, resize and patches.

Sampling (defaults of qwen-omni-utils): ``n = clamp(frames / video_fps * fps, min_frames,
max_frames, frames)`` rounded down to an even count (or ``nframes`` rounded to even), frame
indices ``linspace(first, last, n).round()``; ``video_start`` / ``video_end`` select the frame range
``[ceil(start * fps_v), floor(end * fps_v)]`` first. For a variable frame rate stream (frame
timestamps not evenly spaced) the samples are taken at evenly spaced *times* instead: the frame
nearest each of ``linspace(t_first, t_last, n)``.

Per-frame pixel budget: ``max_pixels = max(min(768*28*28, total_pixels / n * 2),
1.05 * min_pixels)`` (``min_pixels`` 128*28*28; a per-item ``max_pixels`` can only lower it), then
smart resize and a bicubic antialiased resize rounded to uint8, as the reference's torchvision
resize.

``second_per_grid`` is ``temporal_patch_size / fps`` with the *requested* fps (2 -> 1.0 s), which
is what the reference processor reports; the measured ``sample_fps`` (frames sampled per second of
source) is kept beside it for callers that want true times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omnistream.media._io import open_container
from omnistream.media.audio import load_audio
from omnistream.media.errors import MediaError, describe
from omnistream.media.image import (
    FACTOR,
    MAX_PIXELS,
    TEMPORAL_PATCH_SIZE,
    VisualInput,
    load_image,
    normalize,
    patchify,
    resize_image,
    smart_resize,
)

FPS = 2.0  # frames sampled per second of video
FRAME_FACTOR = 2  # sampled frame counts are even
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * FACTOR * FACTOR  # per frame
VIDEO_MAX_PIXELS = 768 * FACTOR * FACTOR  # per frame
VIDEO_TOTAL_PIXELS = 128000 * FACTOR * FACTOR * 0.9  # whole video (qwen-omni-utils MODEL_SEQ_LEN)
DEFAULT_MAX_VIDEO_SECONDS = 3600.0


@dataclass
class VideoInput(VisualInput):
    """A processed video: patches and grid (``VisualInput``) plus its sampling."""

    sample_fps: float = FPS  # sampled frames per second of source video
    timestamps: list[float] = field(default_factory=list)  # seconds of each sampled frame
    frame_size: tuple[int, int] = (0, 0)  # resized (height, width)

    @property
    def n_frames(self) -> int:
        return self.grid_thw[0] * TEMPORAL_PATCH_SIZE


@dataclass
class DecodedVideo:
    frames: Tensor  # [T, 3, H, W] uint8, the sampled frames at source size
    timestamps: list[float]  # seconds, of each sampled frame
    indices: list[int]  # frame indices in the source
    total_frames: int  # frames in the selected range
    video_fps: float  # average frame rate of the source
    sample_fps: float  # n / total_frames * video_fps (as qwen-omni-utils)


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def smart_nframes(
    total_frames: int,
    video_fps: float,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    source: Any = None,
) -> int:
    """Number of frames to sample (even), as qwen-omni-utils."""
    if fps is not None and nframes is not None:
        raise ValueError("pass either fps or nframes, not both")
    if nframes is not None:
        n = _round_by(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        hi = max_frames if max_frames is not None else min(FPS_MAX_FRAMES, total_frames)
        hi = math.floor(hi / FRAME_FACTOR) * FRAME_FACTOR
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise MediaError(
            source, f"cannot sample {n} frames from {total_frames} (need at least {FRAME_FACTOR})"
        )
    return int(n)


def _frame_range(
    total: int, video_fps: float, start: float | None, end: float | None, source
) -> tuple[int, int]:
    if start is None and end is None:
        return 0, total - 1
    duration = total / video_fps
    s = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    e = total - 1
    if end is not None:
        e = min(math.floor(max(0.0, min(end, duration)) * video_fps), total - 1)
    if s >= e:
        raise MediaError(source, f"empty time range: start {start} s, end {end} s")
    return s, e


def _is_uniform(ts: np.ndarray) -> bool:
    if ts.size < 3:
        return True
    d = np.diff(ts)
    return float(np.abs(d - d.mean()).max()) <= 1e-3 * max(float(d.mean()), 1e-9) + 1e-6


def decode_video(
    source: Any,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    max_seconds: float | None = DEFAULT_MAX_VIDEO_SECONDS,
) -> DecodedVideo:
    """Decode the sampled frames of a video file/URL/bytes (PyAV). See the module docstring."""
    with open_container(source) as container:
        if not container.streams.video:
            raise MediaError(source, "no video stream")
        stream = container.streams.video[0]
        tb = float(stream.time_base) if stream.time_base else 1.0
        # pass 1: presentation timestamps of every frame, from the packets (no decoding)
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
        total = len(pts)
        if total == 0:
            raise MediaError(source, "video has no frames")
        ts_all = (np.asarray(pts, dtype=np.float64) - pts[0]) * tb
        duration = float(ts_all[-1]) if total > 1 else 0.0
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else (total - 1) / duration if duration > 0 else 1.0
        if max_seconds is not None and total / video_fps > max_seconds:
            raise MediaError(
                source,
                f"video is {total / video_fps:.1f} s long, longer than the maximum "
                f"{max_seconds:g} s",
            )
        s, e = _frame_range(total, video_fps, start, end, source)
        count = e - s + 1
        n = smart_nframes(
            count,
            video_fps,
            fps if nframes is None else None,
            nframes,
            min_frames,
            max_frames,
            source,
        )
        if _is_uniform(ts_all):
            idx = torch.linspace(s, e, n, dtype=torch.float64).round().long().tolist()
        else:  # variable frame rate: evenly spaced times, nearest frame
            want = np.linspace(ts_all[s], ts_all[e], n)
            j = np.clip(np.searchsorted(ts_all, want), 1, total - 1)
            near = np.where(want - ts_all[j - 1] <= ts_all[j] - want, j - 1, j)
            idx = near.tolist()
    # pass 2: decode, keep the sampled frames (a frame may be sampled twice)
    need = {pts[i] for i in idx}
    got: dict[int, np.ndarray] = {}
    with open_container(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if frame.pts in need and frame.pts not in got:
                    got[frame.pts] = frame.to_ndarray(format="rgb24")
                    if len(got) == len(need):
                        break
        except Exception as err:  # noqa: BLE001 - damaged data: keep what decoded
            if not got:
                raise MediaError(source, f"cannot decode video: corrupt data ({err})") from None
    if not got:
        raise MediaError(source, "video has no decodable frames")
    missing = [p for p in need if p not in got]
    if missing:  # damaged stream or pts mismatch: use the nearest decoded frame
        have = np.asarray(sorted(got))
        for p in missing:
            got[p] = got[int(have[np.abs(have - p).argmin()])]
    frames = torch.from_numpy(np.stack([got[pts[i]] for i in idx])).permute(0, 3, 1, 2)
    sample_fps = n / max(count, 1e-6) * video_fps
    return DecodedVideo(
        frames.contiguous(), [float(ts_all[i]) for i in idx], idx, count, video_fps, sample_fps
    )


def resize_frames(frames: Tensor, height: int, width: int) -> Tensor:
    """Bicubic antialiased resize of uint8 ``[T, 3, H, W]``, rounded back to uint8."""
    if frames.shape[-2:] == (height, width):
        return frames
    x = torch.nn.functional.interpolate(
        frames.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return x.clamp_(0, 255).round_().to(torch.uint8)


def frame_budget(
    n_frames: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> int:
    """Per-frame maximum pixel count for a video of ``n_frames`` sampled frames."""
    budget = max(
        min(VIDEO_MAX_PIXELS, total_pixels / n_frames * FRAME_FACTOR), int(min_pixels * 1.05)
    )
    return int(budget if max_pixels is None else min(max_pixels, budget))


def process_video(
    source: Any,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
    start: float | None = None,
    end: float | None = None,
    sample_fps: float | None = None,
    max_seconds: float | None = DEFAULT_MAX_VIDEO_SECONDS,
    normalized: bool = True,
) -> VideoInput:
    """Decode, sample, resize, normalise and patchify one video (``normalized=False``: uint8
    patches, as ``process_image``).

    ``source`` is a video file/URL/bytes, or a list of frames (images in any form ``load_image``
    takes) sampled at ``sample_fps`` (default 2)."""
    min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    if isinstance(source, (list, tuple)):
        frames, timestamps, s_fps = _frames_from_list(source, min_pixels, max_pixels, sample_fps)
    else:
        dec = decode_video(source, fps, nframes, min_frames, max_frames, start, end, max_seconds)
        frames, timestamps, s_fps = dec.frames, dec.timestamps, dec.sample_fps
    n = frames.shape[0]
    if resized_height and resized_width:
        h, w = smart_resize(resized_height, resized_width, source=describe(source))
    else:
        budget = frame_budget(
            n, min_pixels, max_pixels, VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
        )
        h, w = smart_resize(
            frames.shape[2], frames.shape[3], FACTOR, min_pixels, budget, source=describe(source)
        )
    frames = resize_frames(frames, h, w)
    pixel_values, grid = patchify(normalize(frames) if normalized else frames)
    spg = TEMPORAL_PATCH_SIZE / (FPS if fps is None else fps)
    return VideoInput(pixel_values, grid, spg, s_fps, timestamps, (h, w))


def _frames_from_list(
    items: list | tuple, min_pixels: int, max_pixels: int | None, sample_fps: float | None
) -> tuple[Tensor, list[float], float]:
    if not items:
        raise MediaError(items, "video has no frames (empty frame list)")
    imgs = [
        resize_image(load_image(x), min_pixels, MAX_PIXELS if max_pixels is None else max_pixels)
        for x in items
    ]
    if len({im.size for im in imgs}) != 1:
        raise MediaError(items, "frames of a video must all have one size")
    imgs += [imgs[-1]] * (-len(imgs) % FRAME_FACTOR)  # pad to an even count
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])  # [T, H, W, 3]
    fps = FPS if sample_fps is None else sample_fps
    return (
        torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(),
        [i / fps for i in range(len(imgs))],
        fps,
    )


def load_video_audio(
    source: Any,
    start: float | None = None,
    end: float | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """The audio track of a video as 16 kHz mono (for ``use_audio_in_video``)."""
    if isinstance(source, (list, tuple)):
        raise MediaError(source, "use_audio_in_video needs a video file, not a list of frames")
    with open_container(source) as container:
        if not container.streams.audio:
            raise MediaError(source, "video has no audio track (needed by use_audio_in_video)")
    return load_audio(source, start=start, end=end, max_seconds=max_seconds)
