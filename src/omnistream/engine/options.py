"""``SessionOptions``: everything a conversation is configured with, in one frozen dataclass.

The CLI, the server (``serve/bridge.py``) and Python callers build one and pass it to
``engine.session(options)`` (or pass its fields as keywords: ``engine.session(voice="Ethan")``).
Change a copy with ``dataclasses.replace`` or ``options.replace(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from omnistream.engine.sampling import SamplingParams

CODES_PER_SECOND = 50  # Talker codec ids per second of speech (code2wav: 480 samples at 24 kHz)
SOLVERS = ("rk4", "euler")


@dataclass(frozen=True)
class SessionOptions:
    """A conversation's options; validated on construction (a bad value raises ValueError)."""

    # -- the conversation
    voice: str | None = None  # speaker name, case-insensitive; None: "Chelsie" when present
    system: str | None = None  # system prompt; None: the speech prompt with audio, else default
    audio_output: bool = True  # speak the reply (False: text only)
    use_audio_in_video: bool = False  # also take each video's audio track, interleaved
    max_context: int = 8192  # Thinker KV-cache slots: prompt + reply of all turns together
    # -- the text (Thinker)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # default: greedy
    max_new_tokens: int = 256  # reply tokens per turn
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)
    seed: int | None = None  # base of the per-stage generators; None: a fresh random seed
    # -- the speech (Talker)
    # None: the checkpoint's (generation_config.json's talker_* keys), else the release's
    # TALKER_SAMPLING: T 0.9, k 40, p 0.8, penalty 1.05
    talker_sampling: SamplingParams | None = None
    talker_max_new_tokens: int = 4096  # codec ids per reply (50 = 1 s of speech)
    max_codes_per_token: int = 50  # codec ids per reply token: stops a Talker that never ends
    # -- code2wav (speech synthesis, see engine/code2wav.py)
    # mel frames (10 ms) per first chunk: audio after (C + L) / 2 codes, L the look-ahead below.
    # One DiT block (24), the least. With L = 0, omni-mini's first audio after a typed question
    # came at a median 0.20-0.24 s against 0.32-0.33 with the official L = 24 and 0.33 with
    # C = 48, L = 24; the recognizer's WER alike (docs/MINI.md, twenty-second session)
    chunk_frames: int = 24
    max_chunk_frames: int = 144  # chunks double up to this size (less re-solved context)
    # mel frames of look-ahead the first chunk waits for, 0..24: 24 (one DiT block) is the
    # official path; at 0 its last block is solved without the block ahead, then solved again
    # with it before most of it is voiced (engine/code2wav.py)
    first_chunk_lookahead: int = 0
    # the flow-matching ODE per chunk; None: the checkpoint's (token2wav_config, the release's
    # RK4, 10 steps, guidance 0.5 when it says nothing)
    ode_steps: int | None = None  # steps per chunk
    solver: str | None = None  # "rk4" (the release's) or "euler" (about 3x faster)
    guidance_scale: float | None = None  # classifier-free guidance (0: none, half the work)

    def __post_init__(self):
        positive = ("max_context", "max_new_tokens", "talker_max_new_tokens",
                    "max_codes_per_token", "chunk_frames", "max_chunk_frames", "ode_steps")
        for name in positive:
            v = getattr(self, name)
            if v is None and name == "ode_steps":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, not {v!r}")
        v = self.first_chunk_lookahead
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 24:
            raise ValueError(f"first_chunk_lookahead must be an integer 0..24, not {v!r}")
        if self.max_chunk_frames < self.chunk_frames:
            raise ValueError(f"max_chunk_frames ({self.max_chunk_frames}) < chunk_frames "
                             f"({self.chunk_frames})")
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, not {self.solver!r}")
        g = self.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0):
            raise ValueError(f"guidance_scale must be a number >= 0, not {g!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError("sampling must be a SamplingParams")
        if not isinstance(self.talker_sampling, (SamplingParams, type(None))):
            raise ValueError("talker_sampling must be a SamplingParams or None")

    def replace(self, **changes) -> SessionOptions:
        """A copy with ``changes`` (field names; an unknown name raises TypeError)."""
        return replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The fields as keywords, not deep-copied (``engine.session(**o.as_kwargs())``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def speech_limit(seconds: float) -> int:
        """``talker_max_new_tokens`` for at most ``seconds`` of speech."""
        return max(1, int(CODES_PER_SECOND * seconds))
