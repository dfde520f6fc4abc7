"""``/v1/models`` and ``/v1/chat/completions`` (streaming and not), over the scheduler."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from omnistream.engine.events import AudioChunk, Done, TextDelta

from .audio import encode_audio, float_to_pcm16
from .bridge import new_session
from .errors import APIError, ErrorBody
from .inputs import ChatParams, ChatRequest, resolve_media, to_params

log = logging.getLogger("omnistream.serve")
router = APIRouter()
AUDIO_TTL_S = 3600


def engine_error(e: BaseException) -> APIError:
    """An exception from the engine -> the error the client sees."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # includes omnistream.media.MediaError
        code = "invalid_media" if type(e).__name__ == "MediaError" else "invalid_request"
        return APIError(400, str(e) or type(e).__name__, code=code)
    log.error("engine failure", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back possible partial matches."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        self.buf += text
        found = [(self.buf.find(s), s) for s in self.stops if s in self.buf]
        if found:
            idx = min(found)[0]
            out, self.buf, self.hit = self.buf[:idx], "", True
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return "" if self.hit else out


def _usage(done: Done) -> dict:
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"audio_tokens": u.audio_codes,
                                      "text_tokens": u.completion_tokens},
    }


@router.get("/v1/models")
async def list_models(request: Request):
    st = request.app.state.omni
    return {"object": "list", "data": [st.model_card()]}


@router.get("/v1/models/{model_id:path}", responses={404: {"model": ErrorBody}})
async def get_model(model_id: str, request: Request):
    st = request.app.state.omni
    if model_id != st.model_id:
        raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
    return st.model_card()


_ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 403, 413, 429, 500)}


@router.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(req: ChatRequest, request: Request):
    """Chat completions: text and audio in, text and (with ``modalities: ["text", "audio"]``)
    speech out, streamed as server-sent events with ``stream: true``."""
    st = request.app.state.omni
    cfg = st.cfg
    params, media = to_params(req, cfg, list(st.engine.speakers))
    for kind, src, mi, pi, param in media:
        params.messages[mi]["content"][pi][kind] = await resolve_media(kind, src, cfg, param)
    if not st.slots.try_acquire():
        raise APIError(429, f"the server is busy ({cfg.max_concurrent} concurrent sessions); "
                       "retry later", code="too_many_sessions")
    released = False

    def release():
        nonlocal released
        if not released:
            released = True
            st.slots.release()

    try:
        job = start_reply(st, params)
        try:
            first = await job.__anext__()
        except StopAsyncIteration:
            first = Done(text="", finish_reason="stop")
        except BaseException as e:
            raise engine_error(e) from None
    except BaseException:
        release()
        raise
    if params.stream:
        return StreamingResponse(_sse(job, first, params, st, release),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        return await _collect(job, first, params, st)
    finally:
        watcher.cancel()
        job.cancel() if not job.finished.is_set() else None
        release()


def start_reply(st, params: ChatParams):
    box: dict = {}

    def make_gen():
        sess = new_session(st.engine, voice=params.voice, system=params.system,
                           audio_output=params.audio_output, sampling=params.sampling,
                           max_new_tokens=params.max_new_tokens, seed=params.seed,
                           max_speech_s=st.cfg.max_speech_s)
        box["sess"] = sess
        return sess.respond(params.messages)

    def on_cancel():
        if "sess" in box:
            box["sess"].cancel()

    return st.scheduler.stream(make_gen, on_cancel, name="chat")


async def _cancel_on_disconnect(request: Request, job) -> None:
    while not job.finished.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.25)


async def _events(job, first):
    """The job's events starting with ``first``; always ends with a ``Done``."""
    ev = first
    while True:
        yield ev
        if isinstance(ev, Done):
            return
        try:
            ev = await job.__anext__()
        except StopAsyncIteration:
            ev = Done(text="", finish_reason="stop")


async def _collect(job, first, params: ChatParams, st) -> JSONResponse:
    stopper = StopMatcher(params.stop)
    texts: list[str] = []
    pcm: list[np.ndarray] = []
    done: Done | None = None
    try:
        async for ev in _events(job, first):
            if isinstance(ev, TextDelta):
                t = stopper.feed(ev.text)
                texts.append(t)
                if stopper.hit:
                    job.cancel()
            elif isinstance(ev, AudioChunk) and not stopper.hit:
                pcm.append(np.asarray(ev.pcm, dtype=np.float32))
            elif isinstance(ev, Done):
                done = ev
    except BaseException as e:
        raise engine_error(e) from None
    texts.append(stopper.flush())
    text = "".join(texts) if stopper.hit or params.stop else (done.text or "".join(texts))
    finish = "stop" if stopper.hit else done.finish_reason
    message: dict = {"role": "assistant", "content": text, "refusal": None}
    if params.audio_output:
        wav = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
        data = await asyncio.to_thread(encode_audio, wav, params.audio_format)
        message["content"] = None
        message["audio"] = {"id": f"audio_{uuid.uuid4().hex}",
                            "data": base64.b64encode(data).decode(),
                            "expires_at": int(time.time()) + AUDIO_TTL_S, "transcript": text}
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": st.model_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": None}],
        "usage": _usage(done),
        "system_fingerprint": None,
    })


async def _sse(job, first, params: ChatParams, st, release):
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    audio_id = f"audio_{uuid.uuid4().hex}"

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        d = {"id": cid, "object": "chat.completion.chunk", "created": created,
             "model": st.model_id, "system_fingerprint": None,
             "choices": [] if delta is None else
             [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None or params.include_usage:
            d["usage"] = usage
        return f"data: {json.dumps(d, separators=(',', ':'))}\n\n"

    def text_delta(t: str) -> dict:
        return {"audio": {"transcript": t}} if params.audio_output else {"content": t}

    stopper = StopMatcher(params.stop)
    sent_audio = False
    try:
        yield chunk({"role": "assistant", "content": "" if not params.audio_output else None})
        async for ev in _events(job, first):
            if isinstance(ev, TextDelta):
                t = stopper.feed(ev.text)
                if t:
                    yield chunk(text_delta(t))
                if stopper.hit:
                    job.cancel()
            elif isinstance(ev, AudioChunk):
                if stopper.hit or not params.audio_output:
                    continue
                data = base64.b64encode(float_to_pcm16(ev.pcm)).decode()
                yield chunk({"audio": {"id": audio_id, "data": data}})
                sent_audio = True
            elif isinstance(ev, Done):
                rest = stopper.flush()
                if rest:
                    yield chunk(text_delta(rest))
                if sent_audio:
                    yield chunk({"audio": {"id": audio_id, "data": "",
                                           "expires_at": int(time.time()) + AUDIO_TTL_S}})
                yield chunk({}, "stop" if stopper.hit else ev.finish_reason)
                if params.include_usage:
                    yield chunk(None, usage=_usage(ev))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        job.cancel()
        raise
    except Exception as e:  # noqa: BLE001 - reported in-band, headers are already sent
        err = engine_error(e)
        yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished.is_set():
            job.cancel()
        release()
