"""The server's only contact with the engine: building sessions per the engine contract."""

from __future__ import annotations

from collections.abc import Iterator

from omnistream.engine.options import SessionOptions
from omnistream.engine.sampling import SamplingParams

_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


def session_options(*, voice: str | None, system: str | None, audio_output: bool,
                    sampling: dict, max_new_tokens: int, seed: int | None,
                    max_speech_s: float | None = None) -> SessionOptions:
    """``SessionOptions`` from request fields: ``sampling`` holds the request's sampling keys
    (others are ignored); ``max_speech_s`` caps the spoken reply."""
    opts = SessionOptions(
        voice=voice, system=system, audio_output=audio_output,
        sampling=SamplingParams(**{k: v for k, v in sampling.items() if k in _FIELDS}),
        max_new_tokens=max_new_tokens, seed=seed)
    if max_speech_s is not None:
        opts = opts.replace(talker_max_new_tokens=SessionOptions.speech_limit(max_speech_s))
    return opts


def reserve_slots(engine, max_concurrent: int, max_speech_s: float) -> None:
    """One cache slot per concurrent session (``Engine.reserve_slots``), so the scheduler decodes
    the sessions in batches; an engine without slots (a test double) is left as it is."""
    reserve = getattr(engine, "reserve_slots", None)
    if reserve is not None and getattr(engine, "slots", None) is None:
        reserve(max_concurrent, context=SessionOptions().max_context,
                speech_codes=SessionOptions.speech_limit(max_speech_s))


def new_session(engine, **request_fields):
    """``engine.session(...)`` from request fields (``session_options``'s); runs on the model
    thread. The options go as keywords, the form every engine (and test double) accepts."""
    return engine.session(**session_options(**request_fields).as_kwargs())


def respond_live(sess) -> Iterator:
    """Answer the turn closed by ``commit_user_turn`` (respond with no new messages)."""
    return sess.respond([])
