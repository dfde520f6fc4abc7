"""The speech codec as a tool: speech -> 50 Hz codes (our encoder) -> speech (the checkpoint's
Token2Wav, streamed by ``engine/code2wav.py`` exactly as the engine speaks).

>>> codec = Codec.load("models/omni-mini")
>>> codes = codec.encode("question.wav")              # LongTensor [N], ids in [0, levels)
>>> pcm = codec.decode(codes)                         # float32 [N * 480] at 24 kHz
>>> for chunk in codec.decode_stream(codes): play(chunk)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omnistream.codec.encoder import SpeechEncoder, StreamingEncoder
from omnistream.config import Token2WavConfig
from omnistream.engine.options import SessionOptions
from omnistream.media.audio import OUTPUT_SAMPLE_RATE, decode_audio, resample
from omnistream.media.errors import MediaError
from omnistream.nn.token2wav import Token2Wav

MIN_SECONDS = 0.2  # shorter input is refused (under 10 codes)
SILENCE_RMS = 1e-3  # input whose RMS is below this (-60 dBFS) holds no speech


class Codec:
    """A checkpoint's codec: ``encoder`` (``codec_encoder.*``), ``token2wav`` and its voices."""

    def __init__(self, encoder: SpeechEncoder | None, token2wav: Token2Wav, speakers,
                 model_dir: Path, config: Token2WavConfig | None = None):
        self.encoder = encoder
        self.token2wav = token2wav
        self.speakers = speakers
        self.model_dir = model_dir
        self.config = config or Token2WavConfig()  # its decode defaults: ode_steps, solver, ...

    @classmethod
    def load(cls, model: str | Path, device: str = "cpu", quiet: bool = True) -> Codec:
        """Load the codec parts of a checkpoint (the encoder only when its config has one)."""
        from omnistream.checkpoint import (
            load_component,
            load_config,
            load_speakers,
            resolve_model_dir,
        )

        d = resolve_model_dir(model)
        cfg = load_config(d)
        enc = None
        if cfg.codec_encoder_config is not None:
            enc = load_component(d, "codec_encoder", device=device, config=cfg, quiet=quiet)
        t2w = load_component(d, "token2wav", device=device, config=cfg, quiet=quiet)
        return cls(enc, t2w, load_speakers(d), d, cfg.token2wav_config)

    @property
    def n_codes(self) -> int:
        """Codes the encoder makes (ids in ``[0, n_codes)``); the DiT's table without one."""
        if self.encoder is not None:
            return self.encoder.fsq.size
        return self.token2wav.code2wav_dit_model.cfg.num_embeds

    # -- encode ---------------------------------------------------------------------------------

    def _require_encoder(self) -> SpeechEncoder:
        if self.encoder is None:
            raise ValueError(f"{self.model_dir} has no speech encoder (no codec_encoder_config): "
                             "train one with a codec stage (configs/train/codec*.json)")
        return self.encoder

    @staticmethod
    def speech_pcm(source: Any, sample_rate: int | None = None) -> np.ndarray:
        """24 kHz mono float32 PCM of an audio file / bytes / array (+ ``sample_rate``), checked
        for what the codec can encode (at least 0.2 s, not silent)."""
        if isinstance(source, (np.ndarray, Tensor)):
            x = np.asarray(source, dtype=np.float32)
            if x.ndim != 1:
                raise MediaError(source, f"expected mono samples [n], got shape {x.shape}")
            if sample_rate is None:
                raise ValueError("a sample array needs its sample_rate")
            sr = int(sample_rate)
        else:
            x, sr = decode_audio(source)
        if not np.isfinite(x).all():
            raise MediaError(source, "audio contains NaN or infinite samples")
        if x.size < MIN_SECONDS * sr:
            raise MediaError(source, f"audio is {x.size / sr:.3f} s long; the codec needs at "
                             f"least {MIN_SECONDS} s")
        if float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) < SILENCE_RMS:
            raise MediaError(source, "audio is silent (RMS below -60 dBFS): nothing to encode")
        return resample(x, sr, OUTPUT_SAMPLE_RATE)

    def encode(self, source: Any, sample_rate: int | None = None) -> Tensor:
        """Speech (file, bytes or array + ``sample_rate``) -> codes [ceil(seconds * 50)]."""
        enc = self._require_encoder()
        return enc.encode(self.speech_pcm(source, sample_rate)).cpu()

    def encoder_stream(self) -> StreamingEncoder:
        """Codes for 24 kHz PCM arriving in pieces (``push`` / ``flush``); equals ``encode``."""
        return StreamingEncoder(self._require_encoder())

    # -- decode ---------------------------------------------------------------------------------

    def check_codes(self, codes: Any) -> Tensor:
        """Codes as a 1-D LongTensor inside the codec's range (else ValueError naming why)."""
        t = torch.as_tensor(codes)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(f"codes must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {t.dtype}")
        t = t.long()
        bad = (t < 0) | (t >= self.n_codes)
        if bool(bad.any()):
            raise ValueError(f"code {int(t[bad][0])} at position {int(bad.nonzero()[0])} is "
                             f"outside [0, {self.n_codes})")
        return t

    def voice(self, name: str | None = None):
        return self.speakers[name] if name else next(iter(self.speakers.values()))

    def decode_stream(self, codes: Any, voice: str | None = None, *,
                      chunk_frames: int = SessionOptions.chunk_frames,
                      max_chunk_frames: int = SessionOptions.max_chunk_frames,
                      first_chunk_lookahead: int = SessionOptions.first_chunk_lookahead,
                      steps: int | None = None,
                      solver: str | None = None, guidance_scale: float | None = None,
                      seed: int = 0) -> Iterator[np.ndarray]:
        """Codes -> 24 kHz float32 PCM chunks, as the engine streams speech (ODE options left
        None: the checkpoint's, ``token2wav_config``)."""
        from omnistream.engine.code2wav import Code2WavStream

        steps, solver, guidance_scale = self.config.decode_options(steps, solver, guidance_scale)
        codes = self.check_codes(codes)
        spk = self.voice(voice)
        stream = Code2WavStream(self.token2wav, spk.cond, spk.ref_mel, chunk_size=chunk_frames,
                                max_chunk_size=max_chunk_frames,
                                first_future=first_chunk_lookahead, steps=steps, solver=solver,
                                guidance_scale=guidance_scale, seed=seed)
        with torch.inference_mode():
            for c in codes.tolist():
                yield from (_np(x) for x in stream.push([c]))
            yield from (_np(x) for x in stream.flush())

    def decode(self, codes: Any, voice: str | None = None, **options) -> np.ndarray:
        """Codes -> 24 kHz float32 PCM [N * 480] (the streamed chunks joined)."""
        chunks = list(self.decode_stream(codes, voice, **options))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _np(x) -> np.ndarray:
    x = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return x.reshape(-1).astype(np.float32)


def write_codes(path: str | Path, codes: Tensor, model: str | Path) -> None:
    """Codes as JSON: ``{"codes": [...], "rate": 50, "model": DIR}``."""
    Path(path).write_text(json.dumps({"codes": [int(c) for c in codes], "rate": 50,
                                      "model": str(model)}) + "\n")


def read_codes(path: str | Path) -> list[int]:
    """The codes of a JSON file written by ``write_codes`` (or a bare JSON list)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read codes ({e})") from None
    codes = obj.get("codes") if isinstance(obj, dict) else obj
    if not isinstance(codes, list) or not all(isinstance(c, int) for c in codes):
        raise ValueError(f"{path}: expected {{\"codes\": [int, ...]}}")
    return codes

