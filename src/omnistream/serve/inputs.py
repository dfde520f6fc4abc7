"""The chat-completions request: pydantic models (the OpenAPI schema), then engine inputs.

FastAPI validates the body against ``ChatRequest`` (a bad request never reaches the route; the app
maps the error to OpenAI's shape, naming the field); ``to_params`` adds the checks that depend on
the running server (voices, the token limit) and turns the request into engine messages.

Media stays encoded: data URLs (and local paths, where allowed) are passed to the engine, which
decodes them through ``omnistream.media``. The server only checks what it must before spending
model time: base64 validity, size, and duration (a PyAV header probe), answering 400 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from .config import ServeConfig
from .errors import APIError

AUDIO_IN_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac",
                    "ogg": "audio/ogg", "opus": "audio/ogg", "m4a": "audio/mp4",
                    "webm": "audio/webm", "pcm16": "audio/L16;rate=24000"}
_DATA_URL = re.compile(r"^data:([\w.+/-]*)((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,(.*)$", re.S)

NonEmpty = Annotated[str, Field(min_length=1)]
# an integer; 2.0 counts (JSON Schema's integers include it), "2" and true do not
Int = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer()
                                     else v)]


class _Model(BaseModel):
    # strict: "5" is not a number and "yes" not a boolean (as OpenAI answers); unknown keys are
    # ignored, so clients that send newer fields still work
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Model):
    type: Literal["text", "input_text", "output_text"]
    text: str


class MediaURL(_Model):
    url: NonEmpty  # data URL, http(s) URL, or a local path where the server allows it


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: MediaURL | NonEmpty


class VideoPart(_Model):  # a common extension
    type: Literal["video_url"]
    video_url: MediaURL | NonEmpty


class AudioURLPart(_Model):  # a common extension
    type: Literal["audio_url"]
    audio_url: MediaURL | NonEmpty


class InputAudio(_Model):
    data: str  # base64 of the encoded file (pcm16: raw 24 kHz mono little-endian)
    format: Literal["wav", "mp3", "flac", "ogg", "opus", "m4a", "webm", "pcm16"] = "wav"


class InputAudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | VideoPart | AudioURLPart | InputAudioPart,
                        Field(discriminator="type")]


class AssistantAudio(_Model):
    id: str | None = None
    transcript: str | None = None  # stands for the content of an earlier spoken reply


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # None: the reply is given by ``audio``
    name: str | None = None
    audio: AssistantAudio | None = None


class ToolMessage(_Model):  # taken as a user turn's text
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                    Field(discriminator="role")]


class AudioOutput(_Model):
    voice: str | None = None  # one of the engine's voices (case-insensitive); None: default
    format: Literal["wav", "mp3", "flac", "opus", "pcm16"] = "wav"  # streaming sends pcm16


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    """``POST /v1/chat/completions``: OpenAI's fields that this server reads."""

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None  # "audio": a spoken reply
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: Int | None = Field(None, ge=-1, le=10**6)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, not used
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, not used
    seed: Int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[Message]) -> list[Message]:
        if all(isinstance(m, SystemMessage) for m in messages):
            raise ValueError("there must be a message other than system ones")
        return messages


@dataclass
class ChatParams:
    """A validated chat-completions request, in the engine's terms."""

    messages: list[dict]  # engine schema: [{"role", "content": [parts]}]
    system: str | None
    audio_output: bool
    voice: str | None
    audio_format: str
    stream: bool
    include_usage: bool
    max_new_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    model: str = ""


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def to_params(req: ChatRequest, cfg: ServeConfig, speakers: list[str]) -> tuple[ChatParams,
                                                                                list[tuple]]:
    """The checks that depend on this server, and the engine's messages.

    Returns params and the media items still to resolve, ``(kind, source, msg_index, part_index,
    param)``: ``resolve_media`` checks each and ``ChatParams.messages`` gets the resolved value at
    that place."""
    audio = req.audio or AudioOutput()
    voice = audio.voice
    if voice is not None:
        voice = {s.lower(): s for s in speakers}.get(voice.lower())
        if voice is None:
            raise _bad(f"unknown voice {audio.voice!r}; available voices: {', '.join(speakers)}",
                       "audio.voice", "invalid_value")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > cfg.max_tokens:
        raise _bad(f"max_tokens is {max_tokens}, the server allows at most {cfg.max_tokens}",
                   "max_tokens", "invalid_value")
    sampling = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k",
                                             "repetition_penalty") if getattr(req, k) is not None}
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    out: list[dict] = []
    system_parts: list[str] = []
    media: list[tuple] = []
    for i, m in enumerate(req.messages):
        content = m.content
        if content is None:  # an assistant turn given by its audio
            content = (m.audio.transcript or "") if m.audio is not None else ""
        parts_in = [TextPart(type="text", text=content)] if isinstance(content, str) else content
        parts: list[dict] = []
        for j, p in enumerate(parts_in):
            pp = f"messages[{i}].content[{j}]"
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
                continue
            if isinstance(p, InputAudioPart):
                kind, param = "audio", f"{pp}.input_audio.data"
                url = f"data:{AUDIO_IN_FORMATS[p.input_audio.format]};base64,{p.input_audio.data}"
            else:
                kind = p.type.removesuffix("_url")
                v = getattr(p, p.type)
                url = v.url if isinstance(v, MediaURL) else v
                param = f"{pp}.{p.type}.url"
            media.append((kind, url, len(out), len(parts), param))
            parts.append({"type": kind, kind: None})
        if isinstance(m, SystemMessage):
            system_parts.append("".join(x["text"] for x in parts))
            continue
        out.append({"role": "assistant" if m.role == "assistant" else "user", "content": parts})

    params = ChatParams(
        messages=out, system="\n".join(system_parts) if system_parts else None,
        audio_output="audio" in (req.modalities or ()), voice=voice, audio_format=audio.format,
        stream=req.stream, include_usage=bool(req.stream_options and
                                              req.stream_options.include_usage),
        max_new_tokens=max_tokens or cfg.default_max_tokens, sampling=sampling, seed=req.seed,
        stop=stop, model=req.model)
    return params, media


# ---------------------------------------------------------------- media


def decode_data_url(url: str, param: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<data>`` -> (mime, bytes); strict base64."""
    m = _DATA_URL.match(url)
    if not m:
        raise _bad("malformed data URL", param, "invalid_media")
    mime, _, b64, payload = m.groups()
    if not b64:
        from urllib.parse import unquote_to_bytes

        return mime, unquote_to_bytes(payload)
    try:
        return mime, base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("media data is not valid base64", param, "invalid_base64") from None


def probe_media(kind: str, data: bytes | str, cfg: ServeConfig, param: str,
                mime: str = "") -> None:
    """Check that ``data`` (bytes or a local path) decodes as ``kind`` and fits the limits."""
    if kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            src = io.BytesIO(data) if isinstance(data, bytes) else data
            with Image.open(src) as im:
                w, h = im.size
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise _bad(f"could not decode the image: {e}", param, "invalid_media") from None
        if w * h > cfg.max_image_pixels:
            raise _bad(f"image is {w}x{h}, larger than the server allows", param,
                       "media_too_large")
        return
    if mime.startswith("audio/l16") or mime.startswith("audio/pcm"):
        dur = len(data) / 2 / 24_000
    else:
        import av

        try:
            src = io.BytesIO(data) if isinstance(data, bytes) else data
            with av.open(src, "r") as c:
                streams = c.streams.audio if kind == "audio" else c.streams.video
                if not streams:
                    raise ValueError(f"no {kind} stream")
                s = streams[0]
                dur = None
                if c.duration:
                    dur = c.duration / 1e6
                elif s.duration and s.time_base:
                    dur = float(s.duration * s.time_base)
                if dur is None:  # no header duration: decode to count (bounded by size limit)
                    dur = 0.0
                    for frame in c.decode(s):
                        if frame.time is not None:
                            dur = max(dur, float(frame.time))
                        if dur > (cfg.max_audio_s if kind == "audio" else cfg.max_video_s):
                            break
        except (av.error.FFmpegError, ValueError, OSError, IndexError) as e:
            raise _bad(f"could not decode the {kind}: {e}", param, "invalid_media") from None
    limit = cfg.max_audio_s if kind == "audio" else cfg.max_video_s
    if dur > limit:
        raise _bad(f"{kind} is {dur:.1f} s long; the server allows at most {limit:.0f} s", param,
                   "media_too_long")


async def resolve_media(kind: str, src: str, cfg: ServeConfig, param: str) -> str:
    """Validate one media source; returns what the engine gets (a data URL or a local path)."""
    import asyncio

    if src.startswith("data:"):
        mime, data = decode_data_url(src, param)
        if len(data) > cfg.max_media_bytes:
            raise APIError(413, f"{kind} is {len(data)} bytes, over the limit", param,
                           "media_too_large")
        await asyncio.to_thread(probe_media, kind, data, cfg, param, mime.lower())
        return src
    if src.startswith(("http://", "https://")):
        if not cfg.allow_remote_media:
            raise _bad("remote media URLs are disabled on this server", param, "remote_disabled")
        data, mime = await _fetch(src, cfg, param)
        await asyncio.to_thread(probe_media, kind, data, cfg, param, mime)
        return f"data:{mime or 'application/octet-stream'};base64," + \
            base64.b64encode(data).decode()
    # local path (bare or file://)
    if cfg.allowed_local_media_path is None:
        raise _bad("local media paths are not allowed on this server (use a data URL)", param,
                   "local_path_disabled")
    path = src[len("file://"):] if src.startswith("file://") else src
    root = Path(cfg.allowed_local_media_path).resolve()
    real = Path(os.path.realpath(path))
    if root != real and root not in real.parents:
        raise APIError(403, "media path is outside the allowed folder", param, "path_not_allowed")
    if not real.is_file():
        raise _bad("media file not found", param, "not_found")
    if real.stat().st_size > cfg.max_media_bytes:
        raise APIError(413, f"{kind} file is over the size limit", param, "media_too_large")
    await asyncio.to_thread(probe_media, kind, str(real), cfg, param)
    return str(real)


async def _fetch(url: str, cfg: ServeConfig, param: str) -> tuple[bytes, str]:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=cfg.remote_timeout_s, follow_redirects=True) as c:
            async with c.stream("GET", url) as r:
                if r.status_code != 200:
                    raise _bad(f"fetching the media URL failed with HTTP {r.status_code}", param,
                               "fetch_failed")
                buf = bytearray()
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    if len(buf) > cfg.max_media_bytes:
                        raise APIError(413, "remote media is over the size limit", param,
                                       "media_too_large")
                return bytes(buf), r.headers.get("content-type", "").split(";")[0].lower()
    except httpx.HTTPError as e:
        raise _bad(f"fetching the media URL failed: {e}", param, "fetch_failed") from None


def _field_names(model: type[BaseModel], seen: set) -> set[str]:
    import typing

    names = set()
    if model in seen:
        return names
    seen.add(model)
    for name, f in model.model_fields.items():
        names.add(name)
        stack = [f.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                names |= _field_names(t, seen)
            stack += list(typing.get_args(t))
    return names


FIELD_NAMES = frozenset(_field_names(ChatRequest, set()))  # for error locations (errors.py)
