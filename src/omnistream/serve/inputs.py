"""OpenAI chat request -> engine messages and options, with validation and media limits.

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
from typing import Any

from .config import ServeConfig
from .errors import APIError

ROLES = ("system", "developer", "user", "assistant", "tool")
AUDIO_IN_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac",
                    "ogg": "audio/ogg", "opus": "audio/ogg", "m4a": "audio/mp4",
                    "webm": "audio/webm", "pcm16": "audio/L16;rate=24000"}
_DATA_URL = re.compile(r"^data:([\w.+/-]*)((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,(.*)$", re.S)


@dataclass
class ChatParams:
    """A validated chat-completions request."""

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


def _num(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}", key,
                   "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {v}", key, "invalid_value")
    return v


def parse_chat_request(body: Any, cfg: ServeConfig, speakers: list[str]) -> tuple[ChatParams,
                                                                                 list[tuple]]:
    """Validate the JSON body; returns params and the media items still to resolve.

    Media items are ``(kind, source, msg_index, part_index)``; ``resolve_media`` checks them and
    ``ChatParams.messages`` gets the resolved value at that place.
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array", "messages", "invalid_type")
    if body.get("n") not in (None, 1):
        raise _bad("only n=1 is supported", "n", "invalid_value")

    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not all(m in ("text", "audio") for m in modalities):
        raise _bad("'modalities' must be a list of 'text' and 'audio'", "modalities",
                   "invalid_value")
    audio_output = "audio" in modalities
    audio = body.get("audio") or {}
    if not isinstance(audio, dict):
        raise _bad("'audio' must be an object", "audio", "invalid_type")
    voice = audio.get("voice")
    if voice is not None:
        if not isinstance(voice, str):
            raise _bad("'audio.voice' must be a string", "audio.voice", "invalid_type")
        match = {s.lower(): s for s in speakers}.get(voice.lower())
        if match is None:
            raise _bad(f"unknown voice {voice!r}; available voices: {', '.join(speakers)}",
                       "audio.voice", "invalid_value")
        voice = match
    from .audio import AUDIO_FORMATS

    fmt = audio.get("format", "wav")
    if fmt not in AUDIO_FORMATS:
        raise _bad(f"unsupported audio.format {fmt!r}; use one of {', '.join(AUDIO_FORMATS)}",
                   "audio.format", "invalid_value")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(so.get("include_usage", False))

    max_tokens = _num(body, "max_completion_tokens", 1, 10**9, True)
    if max_tokens is None:
        max_tokens = _num(body, "max_tokens", 1, 10**9, True)
    if max_tokens is not None and max_tokens > cfg.max_tokens:
        raise _bad(f"max_tokens is {max_tokens}, the server allows at most {cfg.max_tokens}",
                   "max_tokens", "invalid_value")
    sampling: dict[str, Any] = {}
    for key, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False),
                                 ("top_k", -1, 10**6, True),
                                 ("repetition_penalty", 0.01, 10, False)):
        v = _num(body, key, lo, hi, integer)
        if v is not None:
            sampling[key] = v
    for key in ("presence_penalty", "frequency_penalty"):
        _num(body, key, -2, 2)  # accepted and validated, not used
    seed = _num(body, "seed", -(2**63), 2**64 - 1, True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > 4:
        raise _bad("'stop' must be a string or up to 4 non-empty strings", "stop",
                   "invalid_type")

    out: list[dict] = []
    system_parts: list[str] = []
    media: list[tuple] = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{p}.role must be one of {', '.join(ROLES)}", f"{p}.role",
                       "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
            if isinstance(m.get("audio"), dict) and "transcript" in m["audio"]:
                content = str(m["audio"]["transcript"])
        if isinstance(content, str):
            parts_in: list = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts_in = content
        else:
            raise _bad(f"{p}.content must be a string or an array of parts", f"{p}.content",
                       "invalid_type")
        parts: list[dict] = []
        for j, part in enumerate(parts_in):
            pp = f"{p}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{pp} must be an object", pp, "invalid_type")
            t = part.get("type")
            if t in ("text", "input_text", "output_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"{pp}.text must be a string", f"{pp}.text", "invalid_type")
                parts.append({"type": "text", "text": text})
                continue
            if role in ("system", "developer", "assistant", "tool"):
                raise _bad(f"{pp}: {role} messages may only hold text", pp, "invalid_value")
            if t in ("image_url", "video_url", "audio_url"):
                v = part.get(t)
                url = v.get("url") if isinstance(v, dict) else v
                if not isinstance(url, str) or not url:
                    raise _bad(f"{pp}.{t}.url must be a string", f"{pp}.{t}.url",
                               "invalid_type")
                kind = {"image_url": "image", "video_url": "video", "audio_url": "audio"}[t]
                media.append((kind, url, len(out), len(parts), f"{pp}.{t}.url"))
                parts.append({"type": kind, kind: None})
            elif t == "input_audio":
                v = part.get("input_audio")
                if not isinstance(v, dict) or not isinstance(v.get("data"), str):
                    raise _bad(f"{pp}.input_audio.data must be a base64 string",
                               f"{pp}.input_audio.data", "invalid_type")
                afmt = v.get("format", "wav")
                if afmt not in AUDIO_IN_FORMATS:
                    raise _bad(f"unsupported input_audio.format {afmt!r}",
                               f"{pp}.input_audio.format", "invalid_value")
                url = f"data:{AUDIO_IN_FORMATS[afmt]};base64,{v['data']}"
                media.append(("audio", url, len(out), len(parts), f"{pp}.input_audio.data"))
                parts.append({"type": "audio", "audio": None})
            else:
                raise _bad(f"{pp}.type {t!r} is not supported", f"{pp}.type", "invalid_value")
        if role in ("system", "developer"):
            system_parts.append("".join(x["text"] for x in parts))
            continue
        out.append({"role": "assistant" if role == "assistant" else "user", "content": parts})
    if not out:
        raise _bad("'messages' must contain a user message", "messages", "invalid_value")

    params = ChatParams(
        messages=out, system="\n".join(system_parts) if system_parts else None,
        audio_output=audio_output, voice=voice, audio_format=fmt, stream=stream,
        include_usage=include_usage, max_new_tokens=max_tokens or cfg.default_max_tokens,
        sampling=sampling, seed=seed, stop=stop, model=model)
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
