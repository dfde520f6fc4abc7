"""Image input: decoding, smart resize, normalisation and the vision encoder's patch layout.

An image becomes ``temporal_patch_size`` (2) identical frames cut into 14x14 patches; each patch is
``3 * 2 * 14 * 14 = 1176`` values ordered (channel, frame, row, col), and patches are ordered so
that every 2x2 merge group is contiguous (row-major over merged cells, then row-major inside the
cell). ``grid_thw = (frames / 2, H / 14, W / 14)``; the thinker sees ``t * h * w / 4`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omnistream.media._io import read_source
from omnistream.media.errors import MediaError

PATCH_SIZE = 14  # pixels
MERGE_SIZE = 2  # patches per merged token side
TEMPORAL_PATCH_SIZE = 2  # frames per patch
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
MIN_PIXELS = 4 * FACTOR * FACTOR  # 3136
MAX_PIXELS = 16384 * FACTOR * FACTOR  # 12845056
MAX_RATIO = 200  # longest / shortest side
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_DECODE_PIXELS = 20000 * 20000  # refuse larger source images (decompression bombs)


@dataclass
class VisualInput:
    """One image or video ready for the vision encoder."""

    # [t*h*w, 1176] float32, patches in merge-group order (uint8 pixels: ``normalized=False``)
    pixel_values: Tensor
    grid_thw: tuple[int, int, int]  # patch grid before the 2x2 merge
    second_per_grid: float = 1.0  # seconds per temporal grid step (video); 1.0 for images

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    source: Any = None,
) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area within ``[min, max]_pixels``,
    aspect ratio kept as closely as possible. Raises ``MediaError`` beyond ratio 200."""
    if height <= 0 or width <= 0:
        raise MediaError(source, f"empty image ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise MediaError(
            source,
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} "
            f"image exceeds the maximum {MAX_RATIO}",
        )
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels {max_pixels} < min_pixels {min_pixels}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(source: Any):
    """A PIL RGB image from a PIL image, path, ``file://`` / ``http(s)://`` / ``data:image/...``
    string, bytes, file object or ``[H, W, 3]`` uint8 array. Transparency is composited over
    white; every other mode is converted to RGB."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, dict):
        source = source.get("url", source)
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (np.ndarray, Tensor)):
        a = source.detach().cpu().numpy() if isinstance(source, Tensor) else source
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.dtype != np.uint8:
            raise MediaError(source, "image arrays must be uint8 [H, W, 1|3|4]")
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    else:
        src = read_source(source)
        try:
            img = Image.open(src)
            if img.width * img.height > MAX_DECODE_PIXELS:
                raise MediaError(source, f"image too large ({img.width}x{img.height})")
            img.load()
        except MediaError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(source, f"cannot decode image: corrupt or unsupported ({e})") from None
    if img.width == 0 or img.height == 0:
        raise MediaError(source, f"empty image ({img.width}x{img.height})")
    return to_rgb(img)


def to_rgb(img):
    """RGB, with any transparency composited over a white background."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def resize_image(
    img,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
    source: Any = None,
):
    """Bicubic resize (PIL) to the smart-resize target (or to explicit ``resized_*`` sizes,
    themselves rounded by smart resize with the default bounds)."""
    from PIL import Image

    if resized_height and resized_width:
        h, w = smart_resize(resized_height, resized_width, source=source)
    else:
        h, w = smart_resize(img.height, img.width, FACTOR, min_pixels, max_pixels, source=source)
    if (w, h) == img.size:
        return img
    return img.resize((w, h), resample=Image.BICUBIC)


def normalize(frames: Tensor) -> Tensor:
    """uint8 (or 0..255 float) ``[T, 3, H, W]`` -> CLIP-normalised float32."""
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    return (frames.to(torch.float32) / 255.0 - mean) / std


def patchify(frames: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """Normalised frames ``[T, 3, H, W]`` (T even, H and W multiples of 28) -> patches
    ``[T/2 * H/14 * W/14, 1176]`` with each 2x2 merge group contiguous, and the grid."""
    t, c, h, w = frames.shape
    p, m, tp = PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> [gt, gh/m, gw/m, m(row), m(col), c, tp, p, p]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw)


def process_image(
    source: Any,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
    normalized: bool = True,
) -> VisualInput:
    """Decode, resize, normalise and patchify one image (``None`` bounds: the defaults).
    ``normalized=False`` leaves the patches as uint8 pixels (``normalize`` of them gives the
    float32 patches bit for bit): a quarter of the memory, and no float work for a caller that
    stores them (training sets)."""
    img = load_image(source)
    img = resize_image(
        img,
        MIN_PIXELS if min_pixels is None else min_pixels,
        MAX_PIXELS if max_pixels is None else max_pixels,
        resized_height,
        resized_width,
        source=source,
    )
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
    x = (normalize(x) if normalized else x)[None].expand(TEMPORAL_PATCH_SIZE, -1, -1, -1)  # twice
    pixel_values, grid = patchify(x)
    return VisualInput(pixel_values, grid, 1.0)
