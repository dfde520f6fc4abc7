"""The server's only contact with the engine: building sessions per the engine contract."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _FallbackSampling:  # used only while omnistream.engine.session is absent
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512


def _sampling_class(engine):
    """The sampling dataclass in the engine's module (SamplingOptions or SamplingParams)."""
    mod = sys.modules.get(type(engine).__module__)
    for name in ("SamplingOptions", "SamplingParams"):
        if hasattr(mod, name):
            return getattr(mod, name)
    return _FallbackSampling


def sampling_options(engine, **kw: Any):
    """The engine's sampling options with the given fields (fields it lacks are dropped)."""
    SamplingOptions = _sampling_class(engine)  # noqa: N806
    if dataclasses.is_dataclass(SamplingOptions):
        names = {f.name for f in dataclasses.fields(SamplingOptions)}
        kw = {k: v for k, v in kw.items() if k in names}
    return SamplingOptions(**kw)


def new_session(engine, *, voice: str | None, system: str | None, audio_output: bool,
                sampling: dict, max_new_tokens: int, seed: int | None):
    """``engine.session(...)``; runs on the model thread."""
    kw: dict[str, Any] = dict(sampling)
    extra: dict[str, Any] = {}
    try:  # the engine takes max_new_tokens either on session() or in the sampling options
        direct = "max_new_tokens" in inspect.signature(engine.session).parameters
    except (TypeError, ValueError):
        direct = False
    if direct:
        extra["max_new_tokens"] = max_new_tokens
    else:
        kw["max_new_tokens"] = max_new_tokens
    if voice is None and audio_output and engine.speakers:
        voice = engine.speakers[0]
    return engine.session(voice=voice, system=system, audio_output=audio_output,
                          sampling=sampling_options(engine, **kw), seed=seed, **extra)


def respond_live(sess) -> Iterator:
    """Answer the turn closed by ``commit_user_turn`` (respond with no new messages)."""
    return sess.respond([])
