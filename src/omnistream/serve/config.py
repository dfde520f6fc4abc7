"""Server settings (limits, auth, media policy)."""

from __future__ import annotations

from dataclasses import dataclass

from omnistream.engine.batch import HOLD_TICKS


@dataclass
class ServeConfig:
    api_key: str | None = None  # bearer key for /v1/*; None: no auth
    max_concurrent: int = 16  # concurrent sessions (HTTP replies + sockets); past it: 429
    max_body_bytes: int = 32 * 1024 * 1024  # request body; past it: 413
    max_media_bytes: int = 24 * 1024 * 1024  # one decoded media item
    max_audio_s: float = 300.0  # one audio input
    max_video_s: float = 120.0  # one video input
    max_image_pixels: int = 4096 * 4096  # one image input
    max_tokens: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 512  # when the request does not say
    max_speech_s: float = 120.0  # one spoken reply (the Talker stops there)
    max_realtime_buffer_s: float = 120.0  # one live user turn
    allow_remote_media: bool = True  # fetch http(s) media URLs
    allowed_local_media_path: str | None = None  # serve local paths under this folder only
    remote_timeout_s: float = 20.0
    warmup: bool = True
    vad: str = "auto"  # Realtime turn detector: "silero", "energy", "auto" (Silero if installed)
    # a Realtime session's temperature until the client sets one. OpenAI's default is 0.8; ours
    # is greedy, as chat completions and the CLI answer when a request does not say: the same
    # question gets the same answer on every path (a small model sampled at 0.8 gets its
    # arithmetic wrong about half the time)
    realtime_temperature: float = 0.0
    # most model rounds a ready code2wav chunk waits for other replies' chunks to share its call
    # (engine/batch.py); 0: never
    code2wav_hold: int = HOLD_TICKS
    # code2wav on a thread of its own beside the Thinker and Talker steps (engine/batch.py):
    # the replies' text no longer waits for their audio; chunks then never wait for company
    code2wav_thread: bool = True

    def __post_init__(self):
        if not 0.0 <= self.realtime_temperature <= 2.0:
            raise ValueError(f"realtime_temperature must be from 0 to 2, not "
                             f"{self.realtime_temperature}")
        if self.code2wav_hold < 0:
            raise ValueError(f"code2wav_hold must be 0 or more, not {self.code2wav_hold}")
