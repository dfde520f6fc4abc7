"""Audio input: decoding to 16 kHz mono and Whisper-style log-mel features.

Decoding: any container/codec PyAV opens (wav, flac, mp3, ogg/opus, m4a/aac, webm, the audio
track of a video), raw sample arrays with their rate, base64 data URLs and http(s) URLs. Channels
are averaged to mono, an optional ``[start, end)`` window (seconds) is cut at the source rate, and
the result is resampled to 16 kHz with a windowed-sinc (Kaiser) polyphase filter.

Features equal the reference processor's (``WhisperFeatureExtractor`` with 128 mels, n_fft 400,
hop 160, every clip zero-padded to 300 s, then the per-clip maximum): the padded spectrogram is
not computed. Frames whose 400-sample window lies wholly in the zero padding are exactly
``log10(1e-10) = -10``, never above any other frame, so the clip maximum is the maximum over the
frames that see audio, including the few after the last valid frame whose window straddles the
end of the audio (they are part of the maximum, not of the valid-frame mask).

Streaming (``StreamingLogMel``): frames are final once their window is complete, so raw log10
frames can be emitted as audio arrives. Only the normalisation depends on the whole clip: the
offline features floor every value at ``clip_max - 8`` before ``(x + 4) / 4``. A streaming caller
gets raw frames plus ``running_max`` and chooses (see the class docstring).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omnistream.media._io import open_container
from omnistream.media.errors import MediaError

SAMPLE_RATE = 16000  # Hz, model input rate (the audio encoder's features)
OUTPUT_SAMPLE_RATE = 24000  # Hz, speech output rate (code2wav PCM)
N_FFT = 400  # samples (25 ms window)
HOP_LENGTH = 160  # samples (10 ms hop)
N_MELS = 128
PAD_SECONDS = 300  # the reference pads every clip to 300 s ...
N_SAMPLES = PAD_SECONDS * SAMPLE_RATE  # ... = 4_800_000 samples
N_FRAMES = N_SAMPLES // HOP_LENGTH  # ... = 30_000 mel frames (the last STFT frame is dropped)
LOG_FLOOR = -10.0  # log10(1e-10): the value of an all-zero frame
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip maximum
DEFAULT_MAX_SECONDS = float(PAD_SECONDS)  # longer audio is rejected (the reference truncates)

# Resampler: Kaiser-windowed sinc ("kaiser_best" settings), built once per rate pair.
_LOWPASS_WIDTH = 64  # zero crossings each side
_ROLLOFF = 0.9475937167399596  # cutoff as a fraction of the lower Nyquist rate
_KAISER_BETA = 14.769656459379492


# ---------------------------------------------------------------------------------------------
# Decoding


def load_audio(
    source: Any,
    sampling_rate: int | None = None,
    start: float | None = None,
    end: float | None = None,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """16 kHz mono float32 samples ``[n]`` from any audio source.

    Args:
        source: a path / ``file://`` / ``http(s)://`` / ``data:audio/...;base64,`` string, bytes,
            a file object, a sample array (numpy or torch, ``[n]``, or ``[channels, n]`` /
            ``[n, channels]`` with up to 8 channels), a ``(array, rate)`` tuple or a
            ``{"array", "sampling_rate"}`` dict.
        sampling_rate: rate of a bare sample array (default 16 kHz); ignored for files.
        start, end: keep ``[start, end)`` seconds (cut at the source rate, as librosa does).
        max_seconds: reject longer audio (after trimming); None disables the check.
    """
    if isinstance(source, dict) and "array" in source:
        source, sampling_rate = source["array"], source.get("sampling_rate", sampling_rate)
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
        source, sampling_rate = source
    if isinstance(source, (np.ndarray, Tensor, list)):
        x, sr = _from_array(source), int(sampling_rate or SAMPLE_RATE)
    else:
        x, sr = decode_audio(source)
    x = _trim(x, sr, start, end, source)
    if x.size == 0:
        raise MediaError(source, "zero-length audio" + (" after trimming" if start or end else ""))
    if max_seconds is not None and x.size / sr > max_seconds:
        raise MediaError(
            source, f"audio is {x.size / sr:.1f} s long, longer than the maximum {max_seconds:g} s"
        )
    if not np.isfinite(x).all():
        raise MediaError(source, "audio contains NaN or infinite samples")
    return resample(x, sr, SAMPLE_RATE)


def decode_audio(source: Any, stream_index: int = 0) -> tuple[np.ndarray, int]:
    """Decode the audio stream of a file/URL/bytes with PyAV: ``(mono float32 [n], rate)``.

    Channels are averaged (as librosa's ``to_mono``); raises ``MediaError`` when the container has
    no audio stream or cannot be decoded."""
    import av

    with open_container(source) as container:
        streams = container.streams.audio
        if len(streams) <= stream_index:
            raise MediaError(source, "no audio stream")
        stream = streams[stream_index]
        stream.thread_type = "AUTO"
        rate = stream.rate or stream.codec_context.sample_rate
        to_float = av.AudioResampler(format="fltp")  # planar float at the source rate and layout
        pieces: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for f in to_float.resample(frame):
                    pieces.append(f.to_ndarray())  # [channels, n]
            for f in to_float.resample(None):
                pieces.append(f.to_ndarray())
        except av.error.FFmpegError as e:
            if not pieces:
                raise MediaError(source, f"cannot decode audio: corrupt data ({e})") from None
            # a damaged tail: keep what decoded (as ffmpeg-based readers do)
    if not pieces:
        raise MediaError(source, "zero-length audio (no decodable samples)")
    x = np.concatenate(pieces, axis=1)  # [channels, n]
    return x.mean(axis=0, dtype=np.float32) if x.shape[0] > 1 else x[0].astype(np.float32), rate


def _from_array(a: Any) -> np.ndarray:
    x = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if x.dtype.kind in "iu":  # integer PCM -> [-1, 1)
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:  # channels first or last: the short axis is the channel axis
        x = x.mean(axis=0 if x.shape[0] <= x.shape[1] else 1)
    elif x.ndim != 1:
        raise MediaError(a, f"audio array must be [n] or [channels, n], got shape {x.shape}")
    return np.ascontiguousarray(x)


def _trim(x: np.ndarray, sr: int, start: float | None, end: float | None, source) -> np.ndarray:
    if not start and end is None:
        return x
    s = int(round(sr * (start or 0.0)))
    e = x.size if end is None else int(round(sr * end))
    if end is not None and start is not None and end <= start:
        raise MediaError(source, f"audio end {end} s is not after start {start} s")
    return x[s:e]


# ---------------------------------------------------------------------------------------------
# Resampling


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[Tensor, int]:
    """Polyphase kernel ``[new, 1, taps]`` and its half width, for reduced rates orig -> new."""
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_LOWPASS_WIDTH * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # [taps]
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx[None]  # [new, taps]
    t = (t * base).clamp(-_LOWPASS_WIDTH, _LOWPASS_WIDTH)
    window = torch.special.i0(_KAISER_BETA * torch.sqrt(1 - (t / _LOWPASS_WIDTH) ** 2))
    window = window / torch.special.i0(torch.tensor(_KAISER_BETA, dtype=torch.float64))
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1, t))
    kernel = sinc * window * (base / orig)
    return kernel.to(torch.float32)[:, None, :], width


def resample(x: np.ndarray, orig_sr: int, new_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of mono float32 samples (windowed sinc, ~-100 dB stopband).

    Output length ``ceil(n * new / orig)``, as librosa/soxr."""
    if orig_sr == new_sr:
        return np.ascontiguousarray(x, dtype=np.float32)
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new)
    n = x.shape[-1]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]  # [1, 1, n]
    xt = torch.nn.functional.pad(xt, (width, width + orig))
    y = torch.nn.functional.conv1d(xt, kernel, stride=orig)  # [1, new, n // orig + 1]
    y = y[0].t().reshape(-1)  # interleave the phases
    return y[: math.ceil(new * n / orig)].numpy()


class StreamingResampler:
    """``resample`` run incrementally: ``push`` pieces, then ``flush`` once.

    The offline resampler is a polyphase conv1d (stride ``orig``) over the signal zero-padded by
    ``width`` on the left and ``width + orig`` on the right; output frame k (``new`` samples)
    needs padded samples ``[k*orig, k*orig + taps)``. ``push`` emits every frame whose input is
    complete, ``flush`` pads the end and trims to ``ceil(n * new / orig)`` samples in total."""

    def __init__(self, orig_sr: int, new_sr: int = SAMPLE_RATE):
        g = math.gcd(int(orig_sr), int(new_sr))
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self.orig, self.new = self.orig_sr // g, self.new_sr // g
        self.identity = self.orig_sr == self.new_sr
        self.n_in = 0  # source samples pushed
        self.n_out = 0  # output samples emitted
        if not self.identity:
            self.kernel, self.width = _sinc_kernel(self.orig, self.new)  # [new, 1, taps]
            self.taps = self.kernel.shape[-1]
            self._buf = torch.zeros(self.width)  # padded signal from padded index self._base on
            self._base = 0
            self._frames = 0  # output frames emitted

    def push(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        self.n_in += x.size
        if self.identity:
            self.n_out += x.size
            return x
        self._buf = torch.cat([self._buf, torch.from_numpy(x)])
        y = self._run()
        self.n_out += y.size
        return y

    def flush(self) -> np.ndarray:
        """The remaining output (the end zero padded as offline); the resampler is then spent."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        self._buf = torch.cat([self._buf, torch.zeros(self.width + self.orig)])
        total = -(-self.new * self.n_in // self.orig)  # ceil(n * new / orig)
        y = self._run()[: max(0, total - self.n_out)]
        self.n_out += y.size
        return y

    def _run(self) -> np.ndarray:
        avail = (self._base + self._buf.numel() - self.taps) // self.orig + 1  # complete frames
        k = avail - self._frames
        if k <= 0:
            return np.zeros(0, dtype=np.float32)
        off = self._frames * self.orig - self._base
        seg = self._buf[off : off + (k - 1) * self.orig + self.taps]
        y = torch.nn.functional.conv1d(seg[None, None], self.kernel,
                                       stride=self.orig)  # [1, new, k]
        self._frames = avail
        drop = self._frames * self.orig - self._base  # samples no later frame needs
        self._buf = self._buf[drop:]
        self._base += drop
        return y[0].t().reshape(-1).numpy()  # interleave the phases


# ---------------------------------------------------------------------------------------------
# Log-mel features


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # Slaney: linear below 1 kHz, log above
    f = np.asarray(f, dtype=np.float64)
    lin = f * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), m * 200.0 / 3.0)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                fmax: float = 8000.0) -> Tensor:
    """Slaney-normalised triangular mel filters over 0-``fmax`` Hz, ``[n_fft//2+1, n_mels]``
    float32 (defaults: the Thinker's 16 kHz input features)."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    diff = np.diff(edges)  # [n_mels + 1]
    slopes = edges[None, :] - fft_freqs[:, None]  # [bins, n_mels + 2]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))  # [bins, n_mels]
    fb *= 2.0 / (edges[2 : n_mels + 2] - edges[:n_mels])
    return torch.from_numpy(fb).to(torch.float32)


@lru_cache(maxsize=1)
def _window() -> Tensor:
    return torch.hann_window(N_FFT, dtype=torch.float32)  # periodic


def _log_mel_frames(frames: Tensor) -> Tensor:
    """Raw log10 mel of windows ``[F, 400]`` -> ``[128, F]`` (clamped at 1e-10)."""
    f = frames.shape[0]
    spec = torch.fft.rfft(frames * _window(), dim=-1)  # [F, 201] complex
    ri = torch.view_as_real(spec).reshape(f, 2 * (N_FFT // 2 + 1))  # [F, 402]: re, im, re, ...
    # [128, F]: re^2 + im^2 summed inside the matmul (transposed operand: no copy)
    mel = _mel_filters_ri().t() @ ri.square_().t()
    return mel.clamp_(min=1e-10).log10_()


@lru_cache(maxsize=1)
def _mel_filters_ri() -> Tensor:
    return mel_filters().repeat_interleave(2, dim=0).contiguous()  # [402, 128]


def n_valid_frames(n_samples: int) -> int:
    """Mel frames the reference marks valid for ``n_samples`` (16 kHz): ``ceil(n / 160)``."""
    return -(-min(n_samples, N_SAMPLES) // HOP_LENGTH)


def normalize_log_mel(raw: Tensor, clip_max: float | Tensor) -> Tensor:
    """Whisper normalisation of raw log10 mel: floor at ``clip_max - 8``, then ``(x + 4) / 4``."""
    return (torch.maximum(raw, torch.as_tensor(clip_max) - DYNAMIC_RANGE) + 4.0) / 4.0


def raw_log_mel(audio: np.ndarray | Tensor) -> tuple[Tensor, int]:
    """Raw log10 mel frames of a 16 kHz clip as the reference sees it (zero-padded to 300 s),
    up to the last frame that touches audio: ``([128, F], n_valid)``. Frames ``>= F`` of the
    reference are exactly ``LOG_FLOOR``; frames ``>= n_valid`` are outside the valid mask."""
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(-1)
    n = min(x.numel(), N_SAMPLES)
    half = N_FFT // 2
    n_touch = -(-(n + half) // HOP_LENGTH)  # frames whose window overlaps [0, n)
    if n_touch < N_FRAMES:
        # the zero-padded clip up to the last touching frame; the end reflection is never reached
        y_len = max((n_touch - 1) * HOP_LENGTH + half, half + 1)
        head = x[: half + 1] if n > half else torch.cat([x[:n], torch.zeros(half + 1 - n)])
        tail = torch.zeros(y_len - max(n, half + 1) + half)
        padded = torch.cat([head[1:].flip(0), head, x[half + 1 : n], tail])
        n_frames = n_touch
    else:  # within 200 samples of 300 s: the reference's end reflection matters; do it exactly
        y = torch.zeros(N_SAMPLES)
        y[:n] = x[:n]
        padded = torch.nn.functional.pad(y[None, None], (half, half), mode="reflect")[0, 0]
        n_frames = N_FRAMES
    frames = padded.unfold(0, N_FFT, HOP_LENGTH)[:n_frames]  # [F, 400]
    return _log_mel_frames(frames), n_valid_frames(n)


def log_mel_spectrogram(
    audio: np.ndarray | Tensor, pad_to: int | None = None
) -> tuple[Tensor, int]:
    """Normalised log-mel features of one 16 kHz clip: ``(features [128, T], n_valid)``.

    Equal to the reference feature extractor's output (``[:, :T]``), which pads to 300 s and
    normalises with the per-clip maximum. ``T = n_valid`` by default, or ``pad_to`` (e.g. 30000
    for the reference's exact shape): padded frames carry the reference's values."""
    raw, n_valid = raw_log_mel(audio)
    clip_max = float(raw.max())
    t = n_valid if pad_to is None else pad_to
    if t < n_valid:
        raise ValueError(f"pad_to={pad_to} is shorter than the {n_valid} valid frames")
    if t <= raw.shape[1]:
        out = raw[:, :t].contiguous()
    else:
        out = torch.full((N_MELS, t), LOG_FLOOR)
        out[:, : raw.shape[1]] = raw
    # normalize_log_mel, in place
    return out.clamp_(min=clip_max - DYNAMIC_RANGE).add_(4.0).mul_(0.25), n_valid


def audio_token_count(n_frames: int) -> int:
    """Thinker tokens for ``n_frames`` valid mel frames (conv stride 2, then pool 2)."""
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


class StreamingLogMel:
    """Log-mel frames for audio arriving in pieces (16 kHz mono).

    ``push(samples)`` returns the raw log10 mel frames ``[128, k]`` completed by the new samples
    (frame f needs samples up to ``160 f + 199``, so frames lag the input by 200 samples);
    ``flush()`` ends the clip and returns the remaining valid frames, padding with zeros exactly as
    the offline reference does. The frames equal ``raw_log_mel(all_samples)`` frame for frame.

    What differs from the offline features is only the normalisation: offline uses
    ``normalize_log_mel(raw, clip_max)`` with the maximum over the *whole* clip (plus the tail
    frames after the last valid one, which ``flush`` also computes: see ``running_max``). A
    streaming caller does not know ``clip_max`` yet. Choices:

    * ``normalize_log_mel(frames, running_max)`` at emission (what a live engine does): equal to
      offline for every value that is at or above ``clip_max - 8``; values below it stay higher
      than offline (offline floors them) only while ``running_max < clip_max``. Once the loudest
      part of the clip has arrived, later frames are exact.
    * hold raw frames and normalise after ``flush`` with ``running_max`` (then == offline).
    """

    def __init__(self) -> None:
        self._buf = torch.zeros(0)  # padded-signal samples from padded index self._base on
        self._base = 0  # padded index of self._buf[0]
        self._head: list[Tensor] = []  # samples before the left reflection can be built
        self._n_in = 0  # samples received
        self._n_out = 0  # frames emitted
        self._started = False  # left reflection built
        self.running_max = LOG_FLOOR  # max raw value over all computed frames
        self.finished = False

    @property
    def n_samples(self) -> int:
        return self._n_in

    @property
    def n_frames(self) -> int:
        """Frames emitted so far."""
        return self._n_out

    def push(self, samples: np.ndarray | Tensor) -> Tensor:
        assert not self.finished, "push after flush"
        x = torch.as_tensor(np.asarray(samples, dtype=np.float32)).reshape(-1)
        self._n_in += x.numel()
        if not self._started:
            self._head.append(x)
            head = torch.cat(self._head)
            if head.numel() <= N_FFT // 2:
                return torch.zeros(N_MELS, 0)
            self._head = []
            self._start(head)
        else:
            self._buf = torch.cat([self._buf, x])
        return self._emit(limit=None)

    def flush(self) -> Tensor:
        """Remaining valid frames; afterwards ``running_max`` is the offline clip maximum."""
        assert not self.finished, "flush twice"
        self.finished = True
        half = N_FFT // 2
        if not self._started:
            head = torch.cat(self._head) if self._head else torch.zeros(0)
            if head.numel() == 0:
                return torch.zeros(N_MELS, 0)
            self._start(torch.cat([head, torch.zeros(half + 1 - head.numel())]))
        n = self._n_in
        n_touch = -(-(n + half) // HOP_LENGTH)
        need = (n_touch - 1) * HOP_LENGTH + N_FFT - self._base  # padded samples for all frames
        if need > self._buf.numel():
            self._buf = torch.cat([self._buf, torch.zeros(need - self._buf.numel())])
        valid = n_valid_frames(n)
        out = self._emit(limit=n_touch)
        return out[:, : max(0, valid - (self._n_out - out.shape[1]))]

    def _start(self, head: Tensor) -> None:
        half = N_FFT // 2
        self._buf = torch.cat([head[1 : half + 1].flip(0), head])
        self._started = True

    def _emit(self, limit: int | None) -> Tensor:
        avail = (self._base + self._buf.numel() - N_FFT) // HOP_LENGTH + 1  # complete frames
        if limit is not None:
            avail = min(avail, limit)
        k = avail - self._n_out
        if k <= 0:
            return torch.zeros(N_MELS, 0)
        off = self._n_out * HOP_LENGTH - self._base
        frames = self._buf[off:].unfold(0, N_FFT, HOP_LENGTH)[:k]
        raw = _log_mel_frames(frames)
        self.running_max = max(self.running_max, float(raw.max()))
        self._n_out += k
        drop = self._n_out * HOP_LENGTH - self._base  # samples no future frame needs
        self._buf = self._buf[drop:]
        self._base += drop
        return raw
