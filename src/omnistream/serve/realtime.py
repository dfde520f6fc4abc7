"""``WS /v1/realtime``: the Realtime event protocol over one engine session per socket.

Input audio (PCM16 24 kHz, base64) is run through the turn detector (``media.vad``: Silero, or
loudness without ``silero-vad``; ``ServeConfig.vad``) as it arrives; while the user
speaks it is handed to ``sess.append_audio`` at the rate it arrived (the engine's live turn
resamples exactly, as offline, and encodes block by block: a turn spoken here gets the prompt the
same audio sent as a message gets). The end of speech commits the turn and starts a reply; speech
that starts while a reply is playing cancels it (barge-in). Every engine call goes through one
ordered per-socket queue onto the scheduler thread, so audio that arrives during a reply waits
for the reply to end (or be cancelled) before it reaches the session; ``State`` is where that
queue has brought the session.

``response.done`` carries the live turn's input counters in ``usage.live_input`` (an extension):
camera frames dropped, audio gaps filled, audio blocks re-encoded.

Custom client event (not in OpenAI's protocol): ``input_video_frame.append`` with ``image`` (base64
JPEG/PNG or a data URL): a camera frame, sent to ``sess.append_video_frame`` during a user turn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import io
import json
import logging
import time
import uuid
from collections import deque
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from omnistream.engine.events import AudioChunk, Done, TextDelta, Usage
from omnistream.media.vad import TurnDetector, VADConfig, make_detector

from .audio import INPUT_RATE, float_to_pcm16, pcm16_to_float
from .bridge import new_session, respond_live
from .errors import APIError

log = logging.getLogger("omnistream.serve")
router = APIRouter()
HIST_S = 2.0  # input kept while idle (for the VAD's prefix padding)


class State(enum.Enum):
    """Where a socket's conversation is. The worker applies the queued engine operations one at
    a time, so the states follow one another (audio that arrives during a reply is queued behind
    it); only ``CLOSED`` is set from the receiving side, and nothing leaves it."""

    IDLE = "idle"  # nothing open: waiting for user input
    LISTENING = "listening"  # a live user turn is open: audio / frames appended, not committed
    COMMITTED = "committed"  # the live turn is closed and prefilled; the next response answers it
    RESPONDING = "responding"  # a reply is being generated (or about to be)
    CLOSED = "closed"  # the socket is gone


class _Ops:
    """The ordered engine operations of one socket: the receiver puts, the worker takes."""

    def __init__(self):
        self.items: deque[tuple] = deque()
        self._more = asyncio.Event()

    def put(self, *op) -> None:
        self.items.append(op)
        self._more.set()

    async def get(self) -> tuple:
        while not self.items:
            self._more.clear()
            await self._more.wait()
        return self.items.popleft()

    def has(self, kind: str) -> bool:
        return any(op[0] == kind for op in self.items)

    def drop(self, kind: str) -> None:
        """Remove queued operations of one kind (they have not reached the engine)."""
        self.items = deque(op for op in self.items if op[0] != kind)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _ws_key(ws: WebSocket) -> tuple[str | None, str | None]:
    """(api key, subprotocol to accept) from the header, the browser subprotocol or ?api_key=."""
    auth = ws.headers.get("authorization")
    key = auth[7:].strip() if auth and auth.lower().startswith("bearer ") else None
    protos = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")
              if p.strip()]
    for p in protos:
        if p.startswith("openai-insecure-api-key."):
            key = key or p[len("openai-insecure-api-key."):]
    key = key or ws.query_params.get("api_key")
    accept = "realtime" if "realtime" in protos else (protos[0] if protos else None)
    return key, accept


async def _deny(ws: WebSocket, err: APIError, subprotocol: str | None) -> None:
    from fastapi.responses import JSONResponse

    try:
        await ws.send_denial_response(JSONResponse(err.body(), status_code=err.status))
    except RuntimeError:  # the server lacks the denial extension: accept, report, close
        await ws.accept(subprotocol=subprotocol)
        await ws.send_json({"type": "error", "event_id": _id("event"), **err.body()})
        await ws.close(code=1008 if err.status == 401 else 1013)


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    st = ws.app.state.omni
    key, subprotocol = _ws_key(ws)
    if st.cfg.api_key is not None and (key is None or key != st.cfg.api_key):
        await _deny(ws, APIError(401, "Incorrect or missing API key", code="invalid_api_key"),
                    subprotocol)
        return
    if not st.slots.try_acquire():
        await _deny(ws, APIError(429, "the server is busy; retry later",
                                 code="too_many_sessions"), subprotocol)
        return
    try:
        await ws.accept(subprotocol=subprotocol)
        conn = RealtimeConnection(ws, st)
        await conn.run()
    finally:
        st.slots.release()


class RealtimeConnection:
    """One socket: protocol state, VAD, and the ordered queue of engine operations."""

    def __init__(self, ws: WebSocket, st):
        self.ws = ws
        self.st = st
        self.cfg = st.cfg
        self.send_lock = asyncio.Lock()
        self.session: dict[str, Any] = {
            "id": _id("sess"), "object": "realtime.session", "model": st.model_id,
            "modalities": ["text", "audio"], "instructions": "",
            "voice": (list(st.engine.speakers) or [None])[0],
            "input_audio_format": "pcm16", "output_audio_format": "pcm16",
            "input_audio_transcription": None,
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500, "create_response": True,
                               "interrupt_response": True},
            "tools": [], "tool_choice": "auto", "temperature": self.cfg.realtime_temperature,
            "max_response_output_tokens": "inf",
        }
        self.hist = np.zeros(0, dtype=np.float32)  # recent input at 24 kHz
        self.hist_start = 0  # absolute sample index of hist[0]
        self.fwd_pos = 0  # absolute sample index up to which input went to the engine
        self.vad: TurnDetector | None = None  # server VAD (None: the client commits turns)
        self._make_vad()
        self.turn_samples = 0  # input samples in the open (uncommitted) user turn
        self.turn_item: str | None = None
        self.last_item: str | None = None
        self.ops = _Ops()
        self.state = State.IDLE
        self.sess = None  # engine session (built on the model thread at first use)
        self.sess_turns = 0
        self.pending_text: list[str] = []  # text items for the next user turn
        self.job = None  # the reply being generated
        self.response_id: str | None = None
        self.cancel_reason: str | None = None

    # ------------------------------------------------------------------ plumbing
    def _to(self, state: State) -> None:
        if self.state is not State.CLOSED:
            self.state = state

    def _response_active(self) -> bool:
        """A reply is being generated or a ``respond`` is queued."""
        return self.state is State.RESPONDING or self.ops.has("respond")

    def _cancel_response(self, reason: str) -> bool:
        """Cancel the reply being generated (or about to start); False if there is none."""
        if self.state is not State.RESPONDING:
            return False
        self.cancel_reason = reason
        if self.job is not None:
            self.job.cancel()
        return True

    async def send(self, type_: str, **fields) -> None:
        if self.state is State.CLOSED:
            return
        ev = {"type": type_, "event_id": _id("event"), **fields}
        try:
            async with self.send_lock:
                await self.ws.send_text(json.dumps(ev, separators=(",", ":")))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._to(State.CLOSED)

    async def error(self, message: str, code: str | None = None, param: str | None = None,
                    event_id: str | None = None, type_: str = "invalid_request_error") -> None:
        await self.send("error", error={"type": type_, "code": code, "message": message,
                                        "param": param, "event_id": event_id})

    def _make_vad(self) -> None:
        """The VAD ``turn_detection`` asks for, on the input's clock (it may change mid-stream)."""
        td = self.session.get("turn_detection")
        if td and td.get("type", "server_vad") == "server_vad":
            self.vad = make_detector(VADConfig.from_turn_detection(td), self.cfg.vad,
                                     start=self.hist_start + len(self.hist))
        else:
            self.vad = None

    @property
    def speaking(self) -> bool:
        """The server VAD hears the user (always False when the client commits turns)."""
        return self.vad is not None and self.vad.speaking

    async def run(self) -> None:
        worker = asyncio.create_task(self._worker())
        await self.send("session.created", session=self.session)
        try:
            while self.state is not State.CLOSED:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                raw = msg.get("text")
                if raw is None and msg.get("bytes") is not None:
                    raw = msg["bytes"].decode("utf-8", "replace")
                try:
                    ev = json.loads(raw or "")
                except json.JSONDecodeError:
                    await self.error("the message is not valid JSON", "invalid_json")
                    continue
                if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
                    await self.error("events must be JSON objects with a 'type'", "invalid_event")
                    continue
                try:
                    await self.handle(ev)
                except APIError as e:
                    await self.error(e.message, e.code, e.param, ev.get("event_id"))
        except WebSocketDisconnect:
            pass
        finally:
            self._to(State.CLOSED)
            if self.job is not None:
                self.job.cancel()
            worker.cancel()
            try:
                await worker
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ client events
    async def handle(self, ev: dict) -> None:
        t = ev["type"]
        eid = ev.get("event_id")
        if t == "session.update":
            await self._session_update(ev.get("session"), eid)
        elif t == "input_audio_buffer.append":
            await self._append(ev.get("audio"), eid)
        elif t == "input_audio_buffer.commit":
            if self.turn_samples == 0 and self.state is not State.LISTENING:
                raise APIError(400, "the input audio buffer is empty",
                               code="input_audio_buffer_commit_empty")
            await self._commit()
        elif t == "input_audio_buffer.clear":
            await self._clear()
        elif t == "conversation.item.create":
            await self._item_create(ev.get("item"), eid)
        elif t == "response.create":
            if self._response_active():
                raise APIError(400, "the conversation already has an active response",
                               code="conversation_already_has_active_response")
            resp = ev.get("response") or {}
            self.ops.put("respond", resp if isinstance(resp, dict) else {})
        elif t == "response.cancel":
            if self.ops.has("respond"):  # queued, not started: drop it
                self.ops.drop("respond")
            elif not self._cancel_response("client_cancelled"):
                raise APIError(400, "there is no active response",
                               code="response_cancel_not_active")
        elif t == "input_video_frame.append":
            await self._video_frame(ev.get("image"), ev.get("timestamp"))
        else:
            raise APIError(400, f"unknown event type {t!r}", code="unknown_event", param="type")

    async def _session_update(self, s: Any, eid) -> None:
        if not isinstance(s, dict):
            raise APIError(400, "'session' must be an object", param="session")
        if "voice" in s:
            v = s["voice"]
            speakers = list(self.st.engine.speakers)
            match = {x.lower(): x for x in speakers}.get(str(v).lower())
            if match is None:
                raise APIError(400, f"unknown voice {v!r}; available voices: "
                               f"{', '.join(speakers)}", param="session.voice",
                               code="invalid_value")
            if self.sess is not None and self.sess_turns > 0 and match != self.session["voice"]:
                raise APIError(400, "the voice cannot change after the first reply",
                               param="session.voice", code="invalid_value")
            s = {**s, "voice": match}
        if s.get("input_audio_format", "pcm16") != "pcm16":
            raise APIError(400, "only pcm16 input audio is supported",
                           param="session.input_audio_format", code="invalid_value")
        if "modalities" in s and (not isinstance(s["modalities"], list) or
                                  not set(s["modalities"]) <= {"text", "audio"}):
            raise APIError(400, "modalities must be a list of 'text' and 'audio'",
                           param="session.modalities", code="invalid_value")
        temp = s.get("temperature", 0.0)
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0 <= temp <= 2:
            raise APIError(400, "temperature must be a number from 0 to 2",
                           param="session.temperature", code="invalid_value")
        td = s.get("turn_detection", self.session["turn_detection"])
        if td is not None and not isinstance(td, dict):
            raise APIError(400, "turn_detection must be an object or null",
                           param="session.turn_detection", code="invalid_type")
        _check_turn_detection(td)
        mrot = s.get("max_response_output_tokens")
        if mrot is not None and mrot != "inf" and (not isinstance(mrot, int) or mrot < 1):
            raise APIError(400, "max_response_output_tokens must be a positive integer or 'inf'",
                           param="session.max_response_output_tokens", code="invalid_value")
        known = set(self.session)
        for k, v in s.items():
            if k in known and k not in ("id", "object", "model"):
                if k == "turn_detection" and v is not None:
                    v = {**(self.session["turn_detection"] or {"type": "server_vad"}), **v}
                self.session[k] = v
        if "turn_detection" in s:
            self._make_vad()
        needs_new = any(k in s for k in ("voice", "instructions", "modalities", "temperature",
                                         "max_response_output_tokens"))
        if needs_new and self.sess_turns == 0:
            self.ops.put("reset_session")
        await self.send("session.updated", session=self.session)

    def _max_tokens(self, resp: dict | None = None) -> int:
        v = (resp or {}).get("max_response_output_tokens",
                             self.session.get("max_response_output_tokens"))
        n = self.cfg.default_max_tokens if v in (None, "inf") else int(v)
        return max(1, min(n, self.cfg.max_tokens))

    async def _append(self, audio: Any, eid) -> None:
        if not isinstance(audio, str):
            raise APIError(400, "'audio' must be a base64 string", param="audio",
                           code="invalid_type")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "'audio' is not valid base64", param="audio",
                           code="invalid_base64") from None
        pcm = pcm16_to_float(data)
        if self.turn_samples + len(pcm) > self.cfg.max_realtime_buffer_s * INPUT_RATE:
            raise APIError(400, "the user turn is longer than the server allows; commit or clear",
                           code="input_audio_buffer_too_long")
        end = self.hist_start + len(self.hist) + len(pcm)
        self.hist = np.concatenate([self.hist, pcm])
        if self.vad is None:
            self._forward_to(end)
        else:
            for ev in self.vad.push(pcm, INPUT_RATE):
                if ev.kind == "speech_started":
                    self.fwd_pos = max(ev.sample, self.hist_start)
                    self.turn_item = self.turn_item or _id("item")
                    await self.send("input_audio_buffer.speech_started",
                                    audio_start_ms=ev.ms(INPUT_RATE), item_id=self.turn_item)
                    td = self.session.get("turn_detection") or {}
                    if td.get("interrupt_response", True):
                        self._cancel_response("turn_detected")  # barge-in
                else:
                    self._forward_to(ev.sample)
                    await self.send("input_audio_buffer.speech_stopped",
                                    audio_end_ms=ev.ms(INPUT_RATE), item_id=self.turn_item)
                    await self._commit()
                    td = self.session.get("turn_detection") or {}
                    # a reply still running (not barged into) is answered first, then this
                    if td.get("create_response", True) and not self.ops.has("respond"):
                        self.ops.put("respond", {})
            if self.speaking:
                self._forward_to(end)
        keep_from = max(end - int(HIST_S * INPUT_RATE), self.hist_start)
        if keep_from > self.hist_start:
            self.hist = self.hist[keep_from - self.hist_start:]
            self.hist_start = keep_from
        if not self.speaking:
            self.fwd_pos = max(self.fwd_pos, self.hist_start)

    def _forward_to(self, pos: int) -> None:
        a = max(self.fwd_pos, self.hist_start) - self.hist_start
        b = pos - self.hist_start
        if b > a:
            pcm = self.hist[a:b]
            self.turn_samples += len(pcm)
            self.turn_item = self.turn_item or _id("item")
            self.ops.put("audio", pcm)
        self.fwd_pos = max(self.fwd_pos, pos)

    async def _commit(self) -> None:
        item = self.turn_item or _id("item")
        self.ops.put("commit")
        await self.send("input_audio_buffer.committed", previous_item_id=self.last_item,
                        item_id=item)
        await self.send("conversation.item.created", previous_item_id=self.last_item,
                        item={"id": item, "object": "realtime.item", "type": "message",
                              "role": "user", "status": "completed",
                              "content": [{"type": "input_audio", "transcript": None}]})
        self.last_item = item
        self.turn_item = None
        self.turn_samples = 0

    async def _clear(self) -> None:
        self.ops.drop("audio")
        self.ops.put("clear")
        self.turn_samples = 0
        self.turn_item = None
        await self.send("input_audio_buffer.cleared")

    async def _item_create(self, item: Any, eid) -> None:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise APIError(400, "only message items are supported", param="item",
                           code="invalid_value")
        role = item.get("role")
        content = item.get("content")
        if not isinstance(content, list):
            raise APIError(400, "item.content must be an array", param="item.content",
                           code="invalid_type")
        if role == "system":
            text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            self.session["instructions"] = text
            if self.sess_turns == 0:
                self.ops.put("reset_session")
        elif role == "user":
            for i, p in enumerate(content):
                if not isinstance(p, dict):
                    raise APIError(400, "content parts must be objects",
                                   param=f"item.content[{i}]", code="invalid_type")
                if p.get("type") in ("input_text", "text"):
                    if not isinstance(p.get("text"), str):
                        raise APIError(400, "text must be a string",
                                       param=f"item.content[{i}].text", code="invalid_type")
                    self.ops.put("text", p["text"])
                elif p.get("type") == "input_audio":
                    try:
                        pcm = pcm16_to_float(base64.b64decode(p.get("audio") or "",
                                                              validate=True))
                    except (binascii.Error, ValueError):
                        raise APIError(400, "audio is not valid base64",
                                       param=f"item.content[{i}].audio",
                                       code="invalid_base64") from None
                    self.ops.put("audio", pcm)
                    self.ops.put("commit")
                else:
                    raise APIError(400, f"unsupported content type {p.get('type')!r}",
                                   param=f"item.content[{i}].type", code="invalid_value")
        else:
            raise APIError(400, "only user and system items are supported", param="item.role",
                           code="invalid_value")
        iid = item.get("id") or _id("item")
        await self.send("conversation.item.created", previous_item_id=self.last_item,
                        item={**item, "id": iid, "object": "realtime.item",
                              "status": "completed"})
        self.last_item = iid

    async def _video_frame(self, image: Any, ts: Any) -> None:
        if not isinstance(image, str):
            raise APIError(400, "'image' must be base64 image data", param="image",
                           code="invalid_type")
        if self.vad is not None and not self.speaking:
            return  # frames belong to a user turn
        if image.startswith("data:"):
            image = image.split(",", 1)[-1]
        try:
            raw = base64.b64decode(image, validate=True)
            rgb = await asyncio.to_thread(_decode_rgb, raw)
        except (binascii.Error, ValueError, OSError) as e:
            raise APIError(400, f"could not decode the frame: {e}", param="image",
                           code="invalid_media") from None
        t = float(ts) if isinstance(ts, (int, float)) else time.monotonic()
        self.ops.put("frame", rgb, t)

    # ------------------------------------------------------------------ engine side
    async def _ensure_session(self):
        if self.sess is None:
            s = self.session
            audio_out = "audio" in s.get("modalities", ["audio"])
            self.sess = await self.st.scheduler.acall(
                new_session, self.st.engine, voice=s.get("voice"),
                system=s.get("instructions") or None, audio_output=audio_out,
                sampling={"temperature": s["temperature"]},  # checked by session.update
                max_new_tokens=self._max_tokens(), seed=None,
                max_speech_s=self.st.cfg.max_speech_s)
            self.sess_turns = 0
        return self.sess

    async def _worker(self) -> None:
        call = self.st.scheduler.acall
        while True:
            op = await self.ops.get()
            before = self.state
            if op[0] == "respond":  # at once: a response.cancel from now on finds it
                self._to(State.RESPONDING)
                self.cancel_reason = None
            try:
                kind = op[0]
                if kind == "reset_session":
                    if self.sess_turns == 0:
                        self.sess = None
                    continue
                sess = await self._ensure_session()
                if kind == "audio":
                    if len(op[1]):
                        await call(sess.append_audio, op[1], INPUT_RATE)
                        self._to(State.LISTENING)
                elif kind == "frame":
                    await call(sess.append_video_frame, op[1], op[2])
                    self._to(State.LISTENING)
                elif kind == "commit":
                    if self.state is State.LISTENING:
                        text = " ".join(self.pending_text) or None
                        self.pending_text = []
                        await call(sess.commit_user_turn, text)
                        self._to(State.COMMITTED)
                elif kind == "clear":
                    if self.state is State.LISTENING:
                        clear = getattr(sess, "clear_user_turn", None)
                        if clear is None:
                            await self.error("audio already sent to the model cannot be "
                                             "cleared", "clear_unsupported")
                        else:
                            await call(clear)
                            self._to(State.IDLE)
                elif kind == "text":
                    self.pending_text.append(op[1])
                elif kind == "respond":
                    if await self._respond(sess, op[1], live=before is State.COMMITTED):
                        self._to(State.IDLE)
                    else:
                        self._to(before)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported to the client
                log.exception("realtime engine operation failed")
                code = "invalid_request" if isinstance(e, ValueError) else "server_error"
                await self.error(str(e) or type(e).__name__, code,
                                 type_="invalid_request_error" if isinstance(e, ValueError)
                                 else "server_error")
                if op[0] == "respond":
                    self._to(before)

    async def _respond(self, sess, resp: dict, live: bool) -> bool:
        """Answer the committed live turn (``live``) or the pending text items; False (and an
        error event) when there is nothing new to answer."""
        if live:
            self.pending_text = []

            def make_gen():
                return respond_live(sess)
        elif self.pending_text:
            msgs = [{"role": "user", "content": [{"type": "text", "text": t}
                                                 for t in self.pending_text]}]
            self.pending_text = []

            def make_gen():
                return sess.respond(msgs)
        else:
            await self.error("there is no new user input to respond to", "no_input")
            return False
        self.job = self.st.scheduler.stream(make_gen, sess.cancel, name="realtime")
        if self.cancel_reason is not None:  # cancelled before it started
            self.job.cancel()
        rid = _id("resp")
        item_id = _id("item")
        audio_out = "audio" in (resp.get("modalities") or self.session.get("modalities",
                                                                            ["audio"]))
        audio_out = audio_out and getattr(sess, "audio_output", True)
        self.response_id = rid
        base = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        item = {"id": item_id, "object": "realtime.item", "type": "message",
                "role": "assistant", "status": "in_progress", "content": []}
        await self.send("response.created", response={"id": rid, "object": "realtime.response",
                                                      "status": "in_progress",
                                                      "status_details": None, "output": [],
                                                      "usage": None})
        await self.send("response.output_item.added", response_id=rid, output_index=0,
                        item=item)
        await self.send("conversation.item.created", previous_item_id=self.last_item, item=item)
        self.last_item = item_id
        part_type = "audio" if audio_out else "text"
        await self.send("response.content_part.added", **base,
                        part={"type": part_type, "transcript" if audio_out else "text": ""})
        text: list[str] = []
        done: Done | None = None
        failed: str | None = None
        try:
            async for ev in self.job:
                if isinstance(ev, TextDelta):
                    if ev.text:
                        text.append(ev.text)
                        if self.job.cancel_requested:
                            continue
                        await self.send("response.audio_transcript.delta" if audio_out
                                        else "response.text.delta", **base, delta=ev.text)
                elif isinstance(ev, AudioChunk):
                    if audio_out and not self.job.cancel_requested:
                        await self.send("response.audio.delta", **base,
                                        delta=base64.b64encode(float_to_pcm16(ev.pcm)).decode())
                elif isinstance(ev, Done):
                    done = ev
        except Exception as e:  # noqa: BLE001
            failed = f"{type(e).__name__}: {e}"
            log.warning("realtime reply failed: %s", failed)
        finally:
            job = self.job
            self.job = None
            if job is not None and not job.finished.is_set():
                job.cancel()
        self.sess_turns += 1
        transcript = done.text if done is not None and done.text else "".join(text)
        if audio_out:
            await self.send("response.audio.done", **base)
            await self.send("response.audio_transcript.done", **base, transcript=transcript)
        else:
            await self.send("response.text.done", **base, text=transcript)
        part = {"type": part_type, "transcript" if audio_out else "text": transcript}
        await self.send("response.content_part.done", **base, part=part)
        if failed is not None:
            status, details = "failed", {"type": "failed", "error": {"message": failed}}
        elif done is None or done.finish_reason == "cancelled" or self.cancel_reason:
            status = "cancelled"
            details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
        elif done.finish_reason == "length":
            status, details = "incomplete", {"type": "incomplete",
                                             "reason": "max_output_tokens"}
        else:
            status, details = "completed", None
        item = {**item, "status": "completed" if status == "completed" else "incomplete",
                "content": [part]}
        await self.send("response.output_item.done", response_id=rid, output_index=0, item=item)
        await self.send("response.done", response={
            "id": rid, "object": "realtime.response", "status": status,
            "status_details": details, "output": [item],
            "usage": _usage(done.usage) if done is not None else None,
            "metadata": {"timings": done.timings if done is not None else {}}})
        return True


def _check_turn_detection(td: dict | None) -> None:
    """``server_vad`` with its numbers in range, or null (the client commits turns)."""
    if td is None:
        return
    p = "session.turn_detection"
    if td.get("type", "server_vad") != "server_vad":
        raise APIError(400, f"turn_detection type {td.get('type')!r} is not supported; use "
                       "'server_vad' or null", param=p + ".type", code="invalid_value")
    thr = td.get("threshold", 0.5)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
        raise APIError(400, "threshold must be a number from 0 to 1", param=p + ".threshold",
                       code="invalid_value")
    for k in ("prefix_padding_ms", "silence_duration_ms"):
        v = td.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10_000:
            raise APIError(400, f"{k} must be an integer from 0 to 10000", param=f"{p}.{k}",
                           code="invalid_value")


def _usage(u: Usage) -> dict:
    """``response.done``'s usage; ``live_input`` (an extension) counts what the live turn's input
    lost or redid."""
    return {"total_tokens": u.prompt_tokens + u.completion_tokens,
            "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "input_token_details": {"cached_tokens": u.cached_tokens},
            "output_token_details": {"text_tokens": u.completion_tokens,
                                     "audio_tokens": u.audio_codes},
            "live_input": {"dropped_frames": u.live_dropped_frames, "gaps": u.live_gaps,
                           "gap_s": round(u.live_gap_s, 3), "rollbacks": u.live_rollbacks}}


def _decode_rgb(raw: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
