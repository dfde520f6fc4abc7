"""Media rendering for the omni-mini tasks (``../shared/mini/TASKS.md``): images of shapes,
spoken questions, beeps, and mp4 videos (a moving shape; a color-changing shape with a spoken
number word on its audio track).

Every function draws all its randomness from the ``numpy.random.Generator`` it is given and
returns encoded bytes (PNG, 16-bit WAV, H.264/AAC mp4) plus the ground truth it rendered, so the
same generator state gives the same bytes. The ranges below are the spec's rendering
conventions; the names carry their units.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from omnistream.train.voices import Voice, speak

# -- the spec's rendering conventions --------------------------------------------------------

BASE_COLORS = {  # the pure colors; a rendering may differ by up to COLOR_TOLERANCE per channel
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 30),
}
COLOR_TOLERANCE = 25
SHAPE_KINDS = ("circle", "square", "triangle")  # triangles point up
IMAGE_PX = (160, 448)  # width and height, each
SHAPE_PX = (28, 80)  # across (circle diameter, square side, triangle base = height)
MAX_SHAPES = 6
BACKGROUND_MIN = 215  # light gray: each channel in [215, 255]
WHITE_BACKGROUND_P = 0.3
BACKGROUND_TINT = 8  # per channel, around the gray level
SHAPE_GAP_PX = 4  # free pixels between shapes' boxes (they never touch)

PIPER_LENGTH_SCALE = (0.8, 1.25)
ESPEAK_WPM = (140, 190)
SILENCE_S = (0.0, 0.5)  # before and after the speech, each
SNR_DB = (20.0, 40.0)  # white noise, relative to the power of the speech / tones
NOISE_P = 0.5

BEEP_HZ, BEEP_HZ_TOL = 1000.0, 100.0
BEEP_S = (0.1, 0.2)
BEEP_GAP_S = (0.2, 0.5)
BEEP_OFFSET_S = (0.0, 0.5)
BEEP_TOTAL_S = (1.5, 4.0)
BEEP_RATE = 16000
BEEP_RAMP_S = 0.005  # raised-cosine edges (no clicks)

VIDEO_PX = (160, 320)  # width and height, each (even: yuv420p)
VIDEO_S = (2.0, 8.0)
VIDEO_FPS = (2, 10)
MIN_TRAVEL = 0.4  # of the frame's width (left/right) or height (up/down)
SEGMENT_S = 2.0  # audio-in-video: the shape's color holds this long
N_SEGMENTS = (2, 4)
WORD_MARGIN_S = 0.15  # the number word keeps this far from a color change
VIDEO_AUDIO_RATE = 22050
VIDEO_CRF = "18"


# -- shapes and images -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One drawn shape: ``kind`` in SHAPE_KINDS, ``color`` name, its rendered ``rgb``, the top-left
    corner (``x``, ``y``) and ``size`` (px across) of its box."""

    kind: str
    color: str
    rgb: tuple[int, int, int]
    x: int
    y: int
    size: int

    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive."""
        return self.x, self.y, self.x + self.size - 1, self.y + self.size - 1


def jitter_color(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """``name``'s pure color with each channel moved by up to COLOR_TOLERANCE."""
    base = np.asarray(BASE_COLORS[name])
    rgb = np.clip(base + rng.integers(-COLOR_TOLERANCE, COLOR_TOLERANCE + 1, 3), 0, 255)
    return tuple(int(c) for c in rgb)


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    """White, or a light gray (a gray level, each channel moved by up to BACKGROUND_TINT) with
    each channel in [BACKGROUND_MIN, 255]."""
    if rng.random() < WHITE_BACKGROUND_P:
        return (255, 255, 255)
    g = int(rng.integers(BACKGROUND_MIN, 256))
    rgb = np.clip(g + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, 3), BACKGROUND_MIN, 255)
    return tuple(int(c) for c in rgb)


def place_shapes(specs: list[tuple[str, str]], width: int, height: int,
                 rng: np.random.Generator, max_tries: int = 200,
                 shape_px: tuple[int, int] = SHAPE_PX) -> list[Shape]:
    """Non-overlapping shapes for ``specs`` [(kind, color)], each inside the canvas, with sizes
    uniform in ``shape_px`` (redrawn, then the whole layout restarted, when one does not fit)."""
    for _ in range(max_tries):
        out: list[Shape] = []
        for kind, color in specs:
            for _ in range(max_tries):
                s = int(rng.integers(shape_px[0], shape_px[1] + 1))
                x, y = int(rng.integers(0, width - s + 1)), int(rng.integers(0, height - s + 1))
                if all(x + s + SHAPE_GAP_PX <= o.x or o.x + o.size + SHAPE_GAP_PX <= x
                       or y + s + SHAPE_GAP_PX <= o.y or o.y + o.size + SHAPE_GAP_PX <= y
                       for o in out):
                    out.append(Shape(kind, color, jitter_color(color, rng), x, y, s))
                    break
            else:
                break
        if len(out) == len(specs):
            return out
    raise RuntimeError(f"cannot place {len(specs)} shapes on {width}x{height}")


def draw_shape(draw, shape: Shape, dx: int = 0, dy: int = 0) -> None:
    """Draw ``shape`` (solid, no outline) with PIL's ``ImageDraw``, shifted by (dx, dy)."""
    x0, y0, x1, y1 = shape.box()
    x0, y0, x1, y1 = x0 + dx, y0 + dy, x1 + dx, y1 + dy
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=shape.rgb)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=shape.rgb)
    elif shape.kind == "triangle":  # apex up, base at the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=shape.rgb)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}")


def canvas(width: int, height: int, bg: tuple[int, int, int], shapes: list[Shape]):
    """A PIL RGB image with ``shapes`` drawn on ``bg``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(d, s)
    return img


def render_image(specs: list[tuple[str, str]], rng: np.random.Generator,
                 shape_px: tuple[int, int] = SHAPE_PX, max_tries: int = 100) -> tuple[bytes, dict]:
    """A PNG of ``specs`` [(kind, color)] placed at random, sizes in ``shape_px``: (bytes,
    ground truth). A drawn image too small for the shapes (six large ones) is drawn again."""
    for k in range(max_tries):
        w, h = (int(v) for v in rng.integers(IMAGE_PX[0], IMAGE_PX[1] + 1, 2))
        bg = background(rng)
        order = [specs[i] for i in rng.permutation(len(specs))]
        try:
            shapes = place_shapes(order, w, h, rng, shape_px=shape_px)
            break
        except RuntimeError:
            if k == max_tries - 1:
                raise
    buf = io.BytesIO()
    canvas(w, h, bg, shapes).save(buf, format="PNG")
    return buf.getvalue(), {"size": [w, h], "background": list(bg),
                            "shapes": [s.__dict__ | {"rgb": list(s.rgb)} for s in shapes]}


# -- audio -----------------------------------------------------------------------------------


def wav_bytes(pcm: np.ndarray, sr: int) -> bytes:
    """16-bit mono WAV (as ``voices.write_wav``, in memory)."""
    x = np.clip(np.asarray(pcm, np.float32), -1.0, 1.0)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sr))
        w.writeframes((x * 32767.0).round().astype("<i2").tobytes())
    return buf.getvalue()


def white_noise(n: int, signal_power: float, snr_db: float,
                rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of white noise ``snr_db`` below ``signal_power``."""
    return (rng.standard_normal(n) * np.sqrt(signal_power / 10 ** (snr_db / 10))).astype(np.float32)


def speech_bounds(pcm: np.ndarray, sr: int, rel_db: float = -35.0) -> tuple[int, int]:
    """[start, end) samples of the speech: 10 ms frames within ``rel_db`` of the loudest one."""
    hop = max(1, sr // 100)
    n = len(pcm) // hop
    if n == 0:
        return 0, len(pcm)
    rms = np.sqrt(np.mean(pcm[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1))
    on = np.flatnonzero(rms > rms.max() * 10 ** (rel_db / 20))
    return int(on[0] * hop), int(min(len(pcm), (on[-1] + 1) * hop))


def random_voice(rng: np.random.Generator) -> Voice:
    """The Piper voice at length_scale in PIPER_LENGTH_SCALE, or espeak-ng at ESPEAK_WPM."""
    if rng.random() < 0.5:
        return Voice("piper", round(float(rng.uniform(*PIPER_LENGTH_SCALE)), 3))
    return Voice("espeak", int(rng.integers(ESPEAK_WPM[0], ESPEAK_WPM[1] + 1)))


def spoken_words(text: str, rng: np.random.Generator) -> tuple[np.ndarray, int, dict]:
    """``text`` spoken by a random voice, trimmed to the speech: (pcm, rate, meta)."""
    voice = random_voice(rng)
    pcm, sr = speak(text, voice)
    a, b = speech_bounds(pcm, sr)
    return pcm[a:b], sr, {"engine": voice.engine, "speed": voice.speed}


def spoken_question(text: str, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A WAV of ``text``: a random voice, up to SILENCE_S of silence before and after, and
    white noise (SNR_DB, relative to the speech) with probability NOISE_P."""
    speech, sr, meta = spoken_words(text, rng)
    pre, post = (int(round(float(rng.uniform(*SILENCE_S)) * sr)) for _ in range(2))
    pcm = np.concatenate([np.zeros(pre, np.float32), speech, np.zeros(post, np.float32)])
    snr = None
    if rng.random() < NOISE_P:
        snr = float(rng.uniform(*SNR_DB))
        pcm = pcm + white_noise(len(pcm), float(np.mean(speech.astype(np.float64) ** 2)), snr, rng)
    meta |= {"rate": sr, "speech_s": [pre / sr, (pre + len(speech)) / sr], "snr_db": snr}
    return wav_bytes(pcm, sr), meta


# Training only (``tasks.make_dataset(levels=True)``): microphones differ in level by tens of dB
# and browsers level them again (automatic gain, noise suppression). omni-mini trained on the
# voices' own level heard 90% of eval spoken sums, 25% at a quarter of it, 10% at three times it
# (clipped) and 75% through a crude gain control (docs/MINI.md, twenty-first session).
LEVEL_DB = (-20.0, 12.0)  # gain on the clip, clipped at full scale afterwards
AGC_P = 0.5  # then, this often, a gain control that levels each 20 ms frame toward AGC_RMS
AGC_RMS = (0.05, 0.3)
AGC_GAIN = (0.25, 8.0)  # its gain's bounds
AGC_GATE_DB = -35.0  # frames this far below the loudest are gated (noise suppression) ...
AGC_GATE_GAIN = 0.05  # ... to this gain


def vary_level(pcm: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """``pcm`` at a random level (LEVEL_DB, clipped at full scale) and, with probability AGC_P,
    through a gain control with a noise gate (smoothed over 100 ms): (pcm, meta)."""
    db = float(rng.uniform(*LEVEL_DB))
    x = np.asarray(pcm, np.float32) * np.float32(10 ** (db / 20))
    meta: dict = {"gain_db": db, "agc_rms": None}
    if rng.random() < AGC_P:
        hop = sr // 50
        n = -(-len(x) // hop)
        frames = np.pad(x, (0, n * hop - len(x))).reshape(n, hop)
        rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) + 1e-9  # [n]
        target = float(rng.uniform(*AGC_RMS))
        g = np.clip(target / rms, *AGC_GAIN)
        g[rms < rms.max() * 10 ** (AGC_GATE_DB / 20)] = AGC_GATE_GAIN
        g = np.convolve(np.pad(g, 2, mode="edge"), np.ones(5) / 5, mode="valid")
        x = (frames * g[:, None].astype(np.float32)).reshape(-1)[: len(x)]
        meta["agc_rms"] = target
    return np.clip(x, -1.0, 1.0), meta


def beeps(n: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A WAV of ``n`` tones (BEEP_HZ ± BEEP_HZ_TOL, lengths BEEP_S, gaps BEEP_GAP_S, first one
    BEEP_OFFSET_S in) in BEEP_TOTAL_S of audio, with optional noise: (bytes, meta)."""
    sr = BEEP_RATE
    freq = float(rng.uniform(BEEP_HZ - BEEP_HZ_TOL, BEEP_HZ + BEEP_HZ_TOL))
    amp = float(rng.uniform(0.2, 0.8))
    durs = rng.uniform(*BEEP_S, n)
    gaps = rng.uniform(*BEEP_GAP_S, max(n - 1, 0))
    t0 = float(rng.uniform(*BEEP_OFFSET_S))
    need = t0 + durs.sum() + gaps.sum()
    total = float(rng.uniform(max(BEEP_TOTAL_S[0], need + 0.05), BEEP_TOTAL_S[1]))
    pcm = np.zeros(int(round(total * sr)), np.float32)
    ramp = int(BEEP_RAMP_S * sr)
    spans, t = [], t0
    for i in range(n):
        a, m = int(round(t * sr)), int(round(durs[i] * sr))
        env = np.ones(m)
        env[:ramp] = env[-ramp:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        pcm[a : a + m] = amp * env * np.sin(2 * np.pi * freq * np.arange(m) / sr)
        spans.append([a / sr, (a + m) / sr])
        t += durs[i] + (gaps[i] if i < n - 1 else 0.0)
    snr = None
    if rng.random() < NOISE_P:
        snr = float(rng.uniform(*SNR_DB))
        pcm = pcm + white_noise(len(pcm), amp**2 / 2, snr, rng)
    return wav_bytes(pcm, sr), {"rate": sr, "freq": freq, "beeps_s": spans, "total_s": total,
                                "snr_db": snr}


# -- video -----------------------------------------------------------------------------------


def encode_mp4(frames: list[np.ndarray], fps: int,
               audio: tuple[np.ndarray, int] | None = None) -> bytes:
    """H.264 (yuv420p, one encoder thread: reproducible bytes) mp4 of ``frames`` [H, W, 3] uint8
    at ``fps``, with ``audio`` (mono pcm, rate) as an AAC track when given."""
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": VIDEO_CRF, "threads": "1"}
        vs.codec_context.time_base = Fraction(1, fps)
        as_ = c.add_stream("aac", rate=audio[1], layout="mono") if audio is not None else None
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            c.mux(vs.encode(vf))
        c.mux(vs.encode(None))
        if as_ is not None:
            pcm, sr = audio
            n = as_.codec_context.frame_size or 1024
            x = np.clip(np.asarray(pcm, np.float32), -1, 1)[None]
            for i in range(0, x.shape[1], n):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i : i + n]),
                                                format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = sr, i, Fraction(1, sr)
                c.mux(as_.encode(af))
            c.mux(as_.encode(None))
    return buf.getvalue()


def _video_geometry(rng: np.random.Generator, seconds: tuple[float, float] = VIDEO_S):
    w, h = (2 * int(v) for v in rng.integers(VIDEO_PX[0] // 2, VIDEO_PX[1] // 2 + 1, 2))
    fps = int(rng.integers(VIDEO_FPS[0], VIDEO_FPS[1] + 1))
    lo, hi = int(np.ceil(seconds[0] * fps)), int(np.floor(seconds[1] * fps))
    n = int(np.clip(round(float(rng.uniform(*seconds)) * fps), lo, hi))
    return w, h, fps, n


def _frame(w: int, h: int, bg, shape: Shape, dx: int = 0, dy: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), bg)
    draw_shape(ImageDraw.Draw(img), shape, dx, dy)
    return np.asarray(img)


DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def motion_video(kind: str, color: str, direction: str,
                 rng: np.random.Generator) -> tuple[bytes, dict]:
    """An mp4 of one shape moving in a straight line (``direction`` in DIRECTIONS) at constant
    speed across MIN_TRAVEL or more of the frame, first frame to last: (bytes, meta)."""
    w, h, fps, n = _video_geometry(rng)
    bg = background(rng)
    size = int(rng.integers(SHAPE_PX[0], SHAPE_PX[1] + 1))
    ux, uy = DIRECTIONS[direction]
    span = w if ux else h  # the frame along the motion
    travel = int(rng.integers(int(np.ceil(MIN_TRAVEL * span)), span - size + 1))
    start_along = int(rng.integers(0, span - size - travel + 1))
    if ux < 0 or uy < 0:
        start_along += travel
    across = int(rng.integers(0, (h if ux else w) - size + 1))
    x0, y0 = (start_along, across) if ux else (across, start_along)
    shape = Shape(kind, color, jitter_color(color, rng), x0, y0, size)
    frames = []
    for i in range(n):
        d = int(round(travel * i / (n - 1)))
        frames.append(_frame(w, h, bg, shape, ux * d, uy * d))
    meta = {"size": [w, h], "fps": fps, "frames": n, "seconds": n / fps, "background": list(bg),
            "start": [x0, y0], "travel_px": travel, "shape_size": size, "rgb": list(shape.rgb)}
    return encode_mp4(frames, fps), meta


def color_change_video(word: str, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """An mp4 of one still shape whose color changes every SEGMENT_S (N_SEGMENTS colors,
    consecutive ones differ) with an AAC track on which a voice says ``word`` once, fully inside
    one color segment (WORD_MARGIN_S from its ends): (bytes, that segment's color, meta)."""
    from omnistream.train.sentences import COLORS

    k = int(rng.integers(N_SEGMENTS[0], N_SEGMENTS[1] + 1))
    seconds = (max(VIDEO_S[0], SEGMENT_S * (k - 1) + 1.0), min(VIDEO_S[1], SEGMENT_S * k))
    w, h, fps, n = _video_geometry(rng, seconds)
    colors = [str(rng.choice(COLORS))]
    while len(colors) < k:
        colors.append(str(rng.choice([c for c in COLORS if c != colors[-1]])))
    bg = background(rng)
    kind = str(rng.choice(SHAPE_KINDS))
    size = int(rng.integers(SHAPE_PX[0], SHAPE_PX[1] + 1))
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    shapes = [Shape(kind, c, jitter_color(c, rng), x, y, size) for c in colors]
    per_seg = int(SEGMENT_S * fps)
    frames = [_frame(w, h, bg, shapes[i // per_seg]) for i in range(n)]
    seconds_total = n / fps

    speech, sr, voice = spoken_words(word, rng)
    sr_out = VIDEO_AUDIO_RATE
    if sr != sr_out:
        from omnistream.media.audio import resample

        speech = resample(speech, sr, sr_out).astype(np.float32)
    length = len(speech) / sr_out
    seg_ends = [min(SEGMENT_S * (j + 1), seconds_total) for j in range(k)]
    fits = [j for j in range(k) if seg_ends[j] - SEGMENT_S * j >= length + 2 * WORD_MARGIN_S]
    if not fits:
        raise RuntimeError(f"the word {word!r} ({length:.2f} s) fits in no color segment")
    seg = int(rng.choice(fits))
    lo, hi = SEGMENT_S * seg + WORD_MARGIN_S, seg_ends[seg] - WORD_MARGIN_S - length
    start = float(rng.uniform(lo, hi))
    pcm = np.zeros(int(round(seconds_total * sr_out)), np.float32)
    a = int(round(start * sr_out))
    pcm[a : a + len(speech)] = speech[: len(pcm) - a]
    snr = None
    if rng.random() < NOISE_P:
        snr = float(rng.uniform(*SNR_DB))
        pcm = pcm + white_noise(len(pcm), float(np.mean(speech.astype(np.float64) ** 2)), snr, rng)
    meta = {"size": [w, h], "fps": fps, "frames": n, "seconds": seconds_total,
            "background": list(bg), "colors": colors, "rgbs": [list(s.rgb) for s in shapes],
            "shape": kind, "box": list(shapes[0].box()), "word": word,
            "word_s": [a / sr_out, a / sr_out + length], "segment": seg, "snr_db": snr} | voice
    return encode_mp4(frames, fps, (pcm, sr_out)), colors[seg], meta
