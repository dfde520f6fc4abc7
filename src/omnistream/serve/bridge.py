"""The server's only contact with the engine: building sessions per the engine contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from omnistream.engine.sampling import SamplingParams

_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


def new_session(engine, *, voice: str | None, system: str | None, audio_output: bool,
                sampling: dict, max_new_tokens: int, seed: int | None,
                max_speech_s: float | None = None):
    """``engine.session(...)`` from request fields; runs on the model thread."""
    kw: dict[str, Any] = {k: v for k, v in sampling.items() if k in _FIELDS}
    extra: dict[str, Any] = {}
    if max_speech_s is not None:  # 50 codec tokens per second of speech
        extra["talker_max_new_tokens"] = max(1, int(50 * max_speech_s))
    return engine.session(voice=voice, system=system, audio_output=audio_output,
                          sampling=SamplingParams(**kw), max_new_tokens=max_new_tokens, seed=seed,
                          **extra)


def respond_live(sess) -> Iterator:
    """Answer the turn closed by ``commit_user_turn`` (respond with no new messages)."""
    return sess.respond([])
