"""Events a streaming reply yields: ``TextDelta``/``AudioChunk`` interleaved, then ``Done``.

The CLI, the Python API and the server all consume the same event stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 24_000  # output PCM rate (Hz)


@dataclass
class TextDelta:
    text: str  # newly completed UTF-8 text (may be "" for a token that ends mid-character)
    token_id: int


@dataclass
class AudioChunk:
    pcm: np.ndarray  # [n] float32 in [-1, 1] at 24 kHz
    index: int  # 0, 1, 2, ... within the reply


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # thinker reply tokens
    audio_codes: int = 0  # talker codec tokens
    cached_tokens: int = 0  # prompt tokens served from a KV cache (the session's, a system block's)
    # a live user turn's input (append_audio / append_video_frame); 0 for messages
    live_dropped_frames: int = 0  # camera frames dropped: their 2 s chunk was already closed
    live_gaps: int = 0  # forward jumps of the audio timestamps (lost packets), filled with silence
    live_gap_s: float = 0.0  # seconds of silence filled in for them
    live_rollbacks: int = 0  # re-encodings of handed-out audio blocks (a louder moment came later)


@dataclass
class Done:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: Usage = field(default_factory=Usage)
    # seconds / rates: ttft_s, ttfa_s, thinker_tok_s, talker_tok_s, code2wav_rtf, total_s, ...
    timings: dict[str, float] = field(default_factory=dict)
    text_ids: list[int] = field(default_factory=list)
    codec_ids: list[int] = field(default_factory=list)


Event = TextDelta | AudioChunk | Done
