"""Turn detection: one streaming voice activity detector for every live input path.

The Realtime socket (and so the web page), and ``omnistream chat --mic`` push microphone PCM into
a ``TurnDetector`` and get ``speech_started`` / ``speech_stopped`` events with sample offsets in
the pushed stream. Two scorers share one turn logic (``TurnDetector.push``):

* ``SileroDetector`` (default): Silero VAD v6 (the ``silero-vad`` package, MIT, which ships the
  weights) re-implemented here as a small module with declared state. It scores 32 ms windows
  (512 samples at 16 kHz, each with the 64 samples before it as context) with a speech
  probability; input at any rate goes through ``media.audio.StreamingResampler`` first.
* ``EnergyDetector`` (fallback when ``silero-vad`` is not installed): the RMS of 20 ms frames
  against a level; it takes beeps and music for speech.

The settings are OpenAI's ``server_vad`` ones (``VADConfig``). A turn starts once speech has lasted
``min_speech_ms`` (the event's ``speech`` is where it began, ``sample`` that less the prefix
padding) and stops once ``silence_duration_ms`` of non-speech follows the last speech (``speech``
is where the speech ended, ``sample`` that plus the silence). Silero's hysteresis is kept: inside
a turn only a probability below ``threshold - 0.15`` counts as silence.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from omnistream.media.audio import SAMPLE_RATE, StreamingResampler

log = logging.getLogger("omnistream.vad")

SILERO_RATE = SAMPLE_RATE  # 16 kHz: Silero's rate
SILERO_WINDOW = 512  # samples (32 ms) scored at a time
SILERO_CONTEXT = 64  # samples of the previous window prepended to each
SILERO_NEG_OFFSET = 0.15  # in a turn, silence is a probability below threshold - 0.15
SILERO_HIDDEN = 128  # LSTM width
ENERGY_FRAME_MS = 20
DETECTORS = ("auto", "silero", "energy")  # ``make_detector``'s kinds


@dataclass(frozen=True)
class VADConfig:
    """Turn detection settings, in the Realtime protocol's units (``turn_detection``)."""

    threshold: float = 0.5  # silero: speech probability; energy: 0 -> -60 dBFS ... 1 -> -10 dBFS
    prefix_padding_ms: int = 300  # audio kept from before the detected start
    silence_duration_ms: int = 500  # non-speech that ends a turn
    min_speech_ms: int = 60  # speech needed to declare a start

    @classmethod
    def from_turn_detection(cls, td: dict) -> VADConfig:
        """From a Realtime ``turn_detection`` object (missing fields keep their defaults)."""
        d = cls()
        return cls(threshold=float(td.get("threshold", d.threshold)),
                   prefix_padding_ms=int(td.get("prefix_padding_ms", d.prefix_padding_ms)),
                   silence_duration_ms=int(td.get("silence_duration_ms", d.silence_duration_ms)))

    @property
    def rms_threshold(self) -> float:
        """The energy detector's RMS level: 0 -> -60 dBFS, 0.5 -> -35 dBFS, 1 -> -10 dBFS."""
        db = -60.0 + 50.0 * float(np.clip(self.threshold, 0.0, 1.0))
        return float(10 ** (db / 20))


@dataclass(frozen=True)
class VADEvent:
    """A turn boundary, as sample offsets in the pushed stream (counted from the detector's
    ``start``)."""

    kind: str  # "speech_started" | "speech_stopped"
    sample: int  # started: the turn's audio begins (speech less prefix padding, never before the
    #              previous stop); stopped: it ends (speech end plus the silence that ended it)
    speech: int  # started: where speech began; stopped: where it ended

    def ms(self, rate: int) -> int:
        """``sample`` in milliseconds at ``rate``."""
        return self.sample * 1000 // rate


@dataclass
class _Turn:
    """The turn logic's state."""

    speaking: bool = False
    run_start: int | None = None  # start of the current run of speech frames (not speaking)
    last_speech: int = 0  # end of the last speech frame (speaking)
    floor: int = 0  # a turn's audio starts no earlier (the previous stop)


class TurnDetector:
    """Streaming turn detector: ``push(pcm, rate)`` -> events. Subclasses score frames; the rate
    is fixed by the first push. ``start`` is the stream offset of the first sample pushed."""

    name = "base"
    neg_offset = 0.0  # in a turn, silence is a score below threshold - neg_offset

    def __init__(self, cfg: VADConfig | None = None, start: int = 0):
        self.cfg = cfg or VADConfig()
        self.start = int(start)
        self.rate: int | None = None
        self.samples_seen = 0  # samples pushed
        self._turn = _Turn(floor=self.start)

    @property
    def speaking(self) -> bool:
        return self._turn.speaking

    @property
    def position(self) -> int:
        """Stream offset just past the last sample pushed."""
        return self.start + self.samples_seen

    def push(self, pcm: np.ndarray, rate: int) -> list[VADEvent]:
        """Feed mono float PCM at ``rate``; the turn boundaries it completes, in order."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if self.rate is None:
            self.rate = int(rate)
        elif int(rate) != self.rate:
            raise ValueError(f"this detector's stream is at {self.rate} Hz, not {rate}")
        self.samples_seen += pcm.size
        events: list[VADEvent] = []
        for a, b, score in self._score(pcm):
            ev = self._step(self.start + a, self.start + b, score)
            if ev is not None:
                events.append(ev)
        return events

    def _score(self, pcm: np.ndarray) -> list[tuple[int, int, float]]:
        """(first sample, end sample, score) of each frame the new samples complete, offsets in
        the pushed stream from 0."""
        raise NotImplementedError

    def _step(self, a: int, b: int, score: float) -> VADEvent | None:
        c, t = self.cfg, self._turn
        speech = score >= c.threshold
        if not t.speaking:
            if not speech:
                t.run_start = None
                return None
            t.run_start = a if t.run_start is None else t.run_start
            if (b - t.run_start) * 1000 < c.min_speech_ms * self.rate:
                return None
            t.speaking, t.last_speech = True, b
            pad = c.prefix_padding_ms * self.rate // 1000
            return VADEvent("speech_started", max(t.run_start - pad, t.floor), t.run_start)
        if score >= c.threshold - self.neg_offset:
            t.last_speech = b
            return None
        if (b - t.last_speech) * 1000 < c.silence_duration_ms * self.rate:
            return None
        t.speaking, t.run_start, t.floor = False, None, b
        return VADEvent("speech_stopped", b, t.last_speech)


class EnergyDetector(TurnDetector):
    """Speech = a 20 ms frame louder than ``cfg.rms_threshold`` (any input rate)."""

    name = "energy"

    def __init__(self, cfg: VADConfig | None = None, start: int = 0):
        super().__init__(cfg, start)
        self._rest = np.zeros(0, dtype=np.float32)
        self._done = 0  # samples consumed into whole frames

    def _score(self, pcm):
        frame = self.rate * ENERGY_FRAME_MS // 1000
        x = np.concatenate([self._rest, pcm])
        n = len(x) // frame
        self._rest = x[n * frame:]
        thr = self.cfg.rms_threshold
        out = []
        for i in range(n):
            f = x[i * frame:(i + 1) * frame]
            loud = float(np.sqrt(np.mean(f * f))) > thr
            out.append((self._done, self._done + frame, 1.0 if loud else 0.0))
            self._done += frame
        return out


# ---------------------------------------------------------------------------------------------
# Silero VAD


class _Stft(nn.Module):
    """A fixed conv basis: 129 real and 129 imaginary rows (n_fft 256, hop 128)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("forward_basis_buffer", torch.zeros(258, 1, 256))

    def forward(self, x: Tensor) -> Tensor:  # [N, 576] -> magnitudes [N, 129, 4]
        x = nn.functional.pad(x, (0, SILERO_CONTEXT), mode="reflect")[:, None]  # [N, 1, 640]
        y = nn.functional.conv1d(x, self.forward_basis_buffer, stride=128)  # [N, 258, 4]
        return torch.sqrt(y[:, :129] ** 2 + y[:, 129:] ** 2)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.reparam_conv = nn.Conv1d(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.reparam_conv(x))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTMCell(SILERO_HIDDEN, SILERO_HIDDEN)
        # (dropout, relu, conv, sigmoid): only the conv has weights
        self.decoder = nn.Sequential(nn.Dropout(0.1), nn.ReLU(), nn.Conv1d(SILERO_HIDDEN, 1, 1),
                                     nn.Sigmoid())


@dataclass
class SileroState:
    """One stream's recurrent state: the LSTM's (h, c) and the last 64 samples."""

    h: Tensor = field(default_factory=lambda: torch.zeros(1, SILERO_HIDDEN))
    c: Tensor = field(default_factory=lambda: torch.zeros(1, SILERO_HIDDEN))
    context: Tensor = field(default_factory=lambda: torch.zeros(SILERO_CONTEXT))


class SileroVAD(nn.Module):
    """Silero VAD v6 at 16 kHz. Attribute names equal the shipped TorchScript model's
    parameter names (under ``_model.``), so its state dict loads with ``strict=True``."""

    def __init__(self):
        super().__init__()
        self.stft = _Stft()
        self.encoder = nn.Sequential(_Block(129, 128, 1), _Block(128, 64, 2), _Block(64, 64, 2),
                                     _Block(64, 128, 1))
        self.decoder = _Decoder()

    @torch.inference_mode()
    def forward(self, windows: Tensor, state: SileroState) -> Tensor:
        """Speech probabilities ``[T]`` of ``T`` consecutive windows ``[T, 512]`` of one stream;
        ``state`` is updated in place."""
        x = torch.cat([state.context, windows.reshape(-1)])  # [64 + 512 T]
        idx = torch.arange(windows.shape[0])[:, None] * SILERO_WINDOW + torch.arange(
            SILERO_CONTEXT + SILERO_WINDOW)[None]
        feats = self.encoder(self.stft(x[idx]))[..., 0]  # [T, 576] -> [T, 128]
        h, c = state.h, state.c
        hs = []
        for t in range(feats.shape[0]):  # the recurrence: one window after another
            h, c = self.decoder.rnn(feats[t:t + 1], (h, c))
            hs.append(h)
        state.h, state.c, state.context = h, c, x[-SILERO_CONTEXT:].clone()
        probs = self.decoder.decoder(torch.cat(hs)[..., None])  # [T, 128, 1] -> [T, 1, 1]
        return probs[:, 0, 0]


def silero_available() -> bool:
    """The ``silero-vad`` package is installed (looked up without importing it: its import
    sets torch's thread count to 1 for the whole process)."""
    return importlib.util.find_spec("silero_vad") is not None


@functools.cache
def load_silero() -> SileroVAD:
    """The model, from the weights shipped in the ``silero-vad`` package (shared by every
    stream: the state lives in each ``SileroState``)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise ImportError("Silero VAD needs the silero-vad package: pip install 'omnistream[vad]'",
                          name="silero_vad")
    path = Path(spec.origin).parent / "data" / "silero_vad.jit"
    with warnings.catch_warnings():  # torch.jit.load is deprecated; only its tensors are used
        warnings.simplefilter("ignore", DeprecationWarning)
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    model = SileroVAD()
    model.load_state_dict({k[len("_model."):]: v for k, v in sd.items()
                           if k.startswith("_model.")}, strict=True)
    return model.eval()


class SileroDetector(TurnDetector):
    """Speech = Silero's probability of a 32 ms window (input resampled to 16 kHz)."""

    name = "silero"
    neg_offset = SILERO_NEG_OFFSET

    def __init__(self, cfg: VADConfig | None = None, start: int = 0):
        super().__init__(cfg, start)
        self.model = load_silero()
        self.state = SileroState()
        self._rs: StreamingResampler | None = None
        self._buf = np.zeros(0, dtype=np.float32)  # 16 kHz samples not yet scored
        self._n16 = 0  # 16 kHz samples scored

    def _score(self, pcm):
        if self._rs is None:
            self._rs = StreamingResampler(self.rate, SILERO_RATE)
        self._buf = np.concatenate([self._buf, self._rs.push(pcm)])
        n = len(self._buf) // SILERO_WINDOW
        if n == 0:
            return []
        win = torch.from_numpy(self._buf[:n * SILERO_WINDOW].reshape(n, SILERO_WINDOW))
        self._buf = self._buf[n * SILERO_WINDOW:]
        probs = self.model(win, self.state).tolist()
        out = []
        for p in probs:  # window bounds on the input's clock
            a = self._n16 * self.rate // SILERO_RATE
            self._n16 += SILERO_WINDOW
            out.append((a, self._n16 * self.rate // SILERO_RATE, p))
        return out


def make_detector(cfg: VADConfig | None = None, kind: str = "auto",
                  start: int = 0) -> TurnDetector:
    """A fresh detector: ``kind`` "silero", "energy", or "auto" (Silero when ``silero-vad`` is
    installed and loads, else energy, with a warning once)."""
    if kind not in DETECTORS:
        raise ValueError(f"unknown turn detector {kind!r} ({' | '.join(DETECTORS)})")
    if kind == "energy":
        return EnergyDetector(cfg, start)
    if kind == "silero":
        return SileroDetector(cfg, start)
    if not silero_available():
        _warn_fallback("silero-vad is not installed")
        return EnergyDetector(cfg, start)
    try:
        return SileroDetector(cfg, start)
    except (ImportError, OSError, RuntimeError) as e:  # a package whose model we cannot read
        _warn_fallback(f"Silero VAD did not load ({type(e).__name__}: {e})")
        return EnergyDetector(cfg, start)


@functools.cache
def _warn_fallback(why: str) -> None:
    log.warning("%s: turns are detected by loudness (beeps and music count as speech); "
                "pip install 'omnistream[vad]'", why)
