"""Test media written on the fly (PyAV, PIL) and the reference processors.

The references: transformers' ``Qwen2_5OmniProcessor`` (tokenizer + WhisperFeatureExtractor +
the PIL Qwen2-VL image processor + the Qwen2-VL video processor) and qwen-omni-utils. Both need
torchvision for video; where it cannot be imported (this project's CPU venv has only a CUDA
wheel), two stand-ins are used and said so:

* the video processor: frames already resized by us are normalised and patchified with the
  reference *image* processor's own ``rescale``/``normalize``/``patchify`` (one call per frame,
  frame pairs combined on the temporal axis). The processor's token layout code is unchanged.
* qwen-omni-utils: imported with a stub ``torchvision`` (its resize: bicubic antialias rounded to
  uint8, as torchvision on uint8) and a stub ``decord`` reading frames with PyAV, so its own frame
  range / frame count / index / pixel-budget / smart-resize code runs.
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Media writers


def tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A few tones plus noise, ``[channels, n]`` float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    out = []
    for c in range(channels):
        x = 0.3 * np.sin(2 * np.pi * (440 + 110 * c) * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
        x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t)) + 0.02 * rng.standard_normal(t.size)
        out.append(x)
    return np.asarray(out, dtype=np.float32)


def write_audio(path: str | Path, x: np.ndarray, sr: int, codec: str | None = None) -> Path:
    """Encode ``x [channels, n]`` with PyAV; the codec follows the file extension."""
    path = Path(path)
    ext = path.suffix.lower()
    codec = (
        codec
        or {
            ".wav": "pcm_s16le",
            ".flac": "flac",
            ".mp3": "libmp3lame",
            ".ogg": "libopus",
            ".opus": "libopus",
            ".m4a": "aac",
            ".webm": "libopus",
        }[ext]
    )
    layout = "mono" if x.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=sr, layout=layout)
        fmt = s.codec_context.codec.audio_formats[0].name
        frame_size = s.codec_context.frame_size or 1024
        if fmt.startswith("s16"):
            pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            pcm = (np.clip(x, -1, 1) * 2147483647).astype(np.int32)
        else:
            pcm = x.astype(np.float32)
        for i in range(0, x.shape[1], frame_size):
            chunk = np.ascontiguousarray(pcm[:, i : i + frame_size])
            packed = not fmt.endswith("p")
            arr = chunk.T.reshape(1, -1) if packed else chunk
            f = av.AudioFrame.from_ndarray(arr, format=fmt, layout=layout)
            f.sample_rate = sr
            f.pts = i
            f.time_base = Fraction(1, sr)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def frame_image(i: int, h: int, w: int) -> np.ndarray:
    """A deterministic, distinct RGB frame ``[h, w, 3]`` uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 255 // max(w - 1, 1) + 17 * i) % 256
    g = (yy * 255 // max(h - 1, 1) + 31 * i) % 256
    b = ((xx + yy) * 3 + 53 * i) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def write_video(
    path: str | Path,
    n_frames: int,
    fps: int = 10,
    size: tuple[int, int] = (96, 128),
    audio: tuple[np.ndarray, int] | None = None,
    pts: list[int] | None = None,
) -> Path:
    """An mp4 (h264 / mpeg4) with ``n_frames`` frames of ``size`` (h, w), optional AAC audio.
    ``pts`` (in 1/fps/10 units) gives a variable frame rate."""
    path = Path(path)
    h, w = size
    with av.open(str(path), "w") as c:
        try:
            vs = c.add_stream("libx264", rate=fps)
            vs.options = {"preset": "ultrafast", "crf": "10", "bf": "0"}
        except Exception:  # noqa: BLE001
            vs = c.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.time_base = Fraction(1, fps * 10)
        a_stream = None
        if audio is not None:
            x, sr = audio
            a_stream = c.add_stream("aac", rate=sr, layout="mono" if x.shape[0] == 1 else "stereo")
        for i in range(n_frames):
            f = av.VideoFrame.from_ndarray(frame_image(i, h, w), format="rgb24")
            f.pts = pts[i] if pts is not None else i * 10
            f.time_base = Fraction(1, fps * 10)
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
        if a_stream is not None:
            x, sr = audio
            layout = "mono" if x.shape[0] == 1 else "stereo"
            n = a_stream.codec_context.frame_size or 1024
            for i in range(0, x.shape[1], n):
                f = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(x[:, i : i + n]), format="fltp", layout=layout
                )
                f.sample_rate, f.pts, f.time_base = sr, i, Fraction(1, sr)
                for p in a_stream.encode(f):
                    c.mux(p)
            for p in a_stream.encode(None):
                c.mux(p)
    return path


# ---------------------------------------------------------------------------------------------
# Reference processor


def processor_dir(d: Path) -> Path:
    """Tokenizer files + preprocessor + chat template (what the checkpoint ships for input
    processing). Uses ``omnistream.maketiny``'s configs."""
    from omnistream.maketiny import PREPROCESSOR_CONFIG
    from omnistream.tokenizer import CHAT_TEMPLATE, write_tokenizer_files

    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(d)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return d


def torchvision_usable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken wheel raises RuntimeError
        return False
    return not getattr(sys.modules.get("torchvision"), "_omnistream_stub", False)


class PatchifyVideoProcessor:
    """Stand-in for Qwen2VLVideoProcessor on frames that need no resize (see module doc)."""

    temporal_patch_size = 2
    merge_size = 2
    patch_size = 14
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor):
        self.ip = image_processor

    def __call__(self, videos, **kwargs):
        ip = self.ip
        pix, grids = [], []
        for v in videos:
            v = torch.as_tensor(v).float().numpy()  # [T, 3, H, W] 0..255
            per = []
            for f in v:
                x = ip.normalize(ip.rescale(f, 1 / 255), ip.image_mean, ip.image_std)
                p, gh, gw = ip.patchify(x, 14, 2, 2)  # [N, 3*2*14*14], frame repeated
                per.append(p.reshape(p.shape[0], 3, 2, 14, 14))
            for k in range(0, len(per), 2):
                pix.append(np.stack([per[k][:, :, 0], per[k + 1][:, :, 1]], 2).reshape(-1, 1176))
            grids.append([len(per) // 2, gh, gw])
        return {
            "pixel_values_videos": torch.from_numpy(np.concatenate(pix)).float(),
            "video_grid_thw": torch.tensor(grids),
        }


def reference_processor(d: Path):
    """``Qwen2_5OmniProcessor`` for the files in ``d`` (video stand-in without torchvision)."""
    from transformers import AutoTokenizer, Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    cfg = json.loads((d / "preprocessor_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(d))
    fe = WhisperFeatureExtractor(
        feature_size=cfg["feature_size"],
        chunk_length=cfg["chunk_length"],
        hop_length=cfg["hop_length"],
        n_fft=cfg["n_fft"],
        sampling_rate=cfg["sampling_rate"],
        return_attention_mask=True,
    )
    ip = Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    if torchvision_usable():
        from transformers import Qwen2VLVideoProcessor

        vp = Qwen2VLVideoProcessor(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    else:
        vp = PatchifyVideoProcessor(ip)

    class Ref(Qwen2_5OmniProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if isinstance(arg, PatchifyVideoProcessor):
                return type(arg)
            return super().check_argument_for_proper_class(name, arg)

    chat_template = json.loads((d / "chat_template.json").read_text())["chat_template"]
    return Ref(ip, vp, fe, tok, chat_template=chat_template)


# ---------------------------------------------------------------------------------------------
# qwen-omni-utils with stub torchvision / decord


class _FakeVideoReader:
    """decord.VideoReader on PyAV: every frame decoded up front (test videos are small)."""

    def __init__(self, path, *args, **kwargs):
        with av.open(path) as c:
            s = c.streams.video[0]
            self._fps = float(s.average_rate or s.guessed_rate)
            self._frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]

    def __len__(self):
        return len(self._frames)

    def get_avg_fps(self):
        return self._fps

    def get_batch(self, idx):
        arr = np.stack([self._frames[i] for i in idx])
        return types.SimpleNamespace(asnumpy=lambda: arr)


def _stub_resize(video, size, interpolation=None, antialias=True):
    x = torch.nn.functional.interpolate(
        video.float(), size=list(size), mode="bicubic", antialias=True, align_corners=False
    )
    return x.clamp(0, 255).round().to(video.dtype) if not video.is_floating_point() else x


def qwen_omni_utils():
    """``qwen_omni_utils.v2_5`` (real torchvision if usable, else the stubs above)."""
    if not torchvision_usable():
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            if not getattr(sys.modules[name], "_omnistream_stub", False):
                del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv.__version__ = "0.28.0"
        tv._omnistream_stub = True
        tv.io = types.ModuleType("torchvision.io")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.SimpleNamespace(resize=_stub_resize)
        tv.transforms.InterpolationMode = enum.Enum("InterpolationMode", "BICUBIC BILINEAR")
        sys.modules.update(
            {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}
        )
    sys.modules["decord"] = types.SimpleNamespace(VideoReader=_FakeVideoReader)
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    vp = importlib.import_module("qwen_omni_utils.v2_5.vision_process")
    vp.get_video_reader_backend.cache_clear()
    vp.FORCE_QWENVL_VIDEO_READER = "decord"
    return importlib.import_module("qwen_omni_utils.v2_5")
