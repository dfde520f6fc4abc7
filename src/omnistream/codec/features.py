"""The speech codec's mel: 24 kHz audio -> natural-log amplitude mel [80, T], 100 frames/s.

This is the DiT's output space and BigVGAN's input (``mel_to_input`` floors it at 1e-5), and the
codec encoder's input. Frame ``i`` is the Hann-windowed 1024-sample STFT centred on the middle of
output samples ``[240 i, 240 (i + 1))``: window ``[240 i - 392, 240 i + 632)``, zeros outside
the clip. A clip of ``n`` samples has ``2 * ceil(n / 480)`` frames (two per 50 Hz code), so the
streaming version (``StreamingSpeechMel``) gives exactly the offline frames.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from omnistream.media.audio import OUTPUT_SAMPLE_RATE, mel_filters
from omnistream.nn.bigvgan import HOP
from omnistream.nn.token2wav import SAMPLES_PER_CODE

N_FFT = 1024  # samples (42.7 ms window)
N_MELS = 80
FMAX = 12_000.0  # Hz (Nyquist of 24 kHz)
LEFT = N_FFT // 2 - HOP // 2  # 392: samples of frame 0's window before sample 0
MEL_FLOOR = 1e-5  # amplitude floor (BigVGAN's input floor, -100 dB)


@lru_cache(maxsize=2)
def _basis(device: torch.device) -> tuple[Tensor, Tensor]:
    fb = mel_filters(N_MELS, OUTPUT_SAMPLE_RATE, N_FFT, FMAX).t().contiguous()  # [80, 513]
    return fb.to(device), torch.hann_window(N_FFT, dtype=torch.float32, device=device)


def frames_for(n_samples: int) -> int:
    """Mel frames of a clip: two per code, ``ceil(n / 480)`` codes."""
    return 2 * -(-int(n_samples) // SAMPLES_PER_CODE)


def mel_of_windows(windows: Tensor) -> Tensor:
    """[..., F, 1024] sample windows -> natural-log amplitude mel [..., 80, F]."""
    fb, win = _basis(windows.device)
    mag = torch.fft.rfft(windows * win, dim=-1).abs()  # [..., F, 513]
    return torch.log(torch.clamp(mag @ fb.t(), min=MEL_FLOOR)).transpose(-1, -2)


def speech_mel(wav: np.ndarray | Tensor) -> Tensor:
    """24 kHz mono PCM [n] or [B, n] -> log mel [80, T] or [B, 80, T], T = ``frames_for(n)``."""
    x = torch.as_tensor(np.asarray(wav, np.float32) if not isinstance(wav, Tensor) else wav)
    x = x.float()
    n = x.shape[-1]
    T = frames_for(n)
    right = (T - 1) * HOP + N_FFT - LEFT - n  # zeros after the clip for the last window
    padded = torch.nn.functional.pad(x, (LEFT, max(right, 0)))
    return mel_of_windows(padded.unfold(-1, N_FFT, HOP)[..., :T, :])


class StreamingSpeechMel:
    """``speech_mel`` for audio arriving in pieces: ``push`` returns the frames whose windows are
    complete ([80, k]); ``flush`` ends the clip and returns the rest (zeros past the end)."""

    def __init__(self) -> None:
        self.buf = np.zeros(LEFT, np.float32)  # samples from frame ``self.next``'s window start
        self.next = 0  # index of the next frame to emit
        self.n = 0  # samples received

    def push(self, pcm: np.ndarray) -> Tensor:
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        self.n += pcm.size
        self.buf = np.concatenate([self.buf, pcm])
        k = max(0, (self.buf.size - N_FFT) // HOP + 1)
        return self._emit(k)

    def flush(self) -> Tensor:
        k = frames_for(self.n) - self.next
        need = (k - 1) * HOP + N_FFT
        if k > 0 and self.buf.size < need:
            self.buf = np.concatenate([self.buf, np.zeros(need - self.buf.size, np.float32)])
        return self._emit(max(k, 0))

    def _emit(self, k: int) -> Tensor:
        if k == 0:
            return torch.zeros(N_MELS, 0)
        x = torch.from_numpy(self.buf[: (k - 1) * HOP + N_FFT].copy())
        out = mel_of_windows(x.unfold(0, N_FFT, HOP))
        self.buf = self.buf[k * HOP:]
        self.next += k
        return out
