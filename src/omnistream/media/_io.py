"""Opening media sources: paths, file:// and http(s) URLs, base64 data URLs, bytes, file objects."""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
from pathlib import Path
from typing import Any

from omnistream.media.errors import MediaError

URL_TIMEOUT_S = 30.0


def read_source(source: Any) -> str | io.IOBase:
    """What PyAV / PIL can open: a local path (str) or an in-memory/file object.

    Raises ``MediaError`` naming the source for missing/empty files, bad data URLs and failed
    downloads."""
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(source, "empty data (0 bytes)")
        return io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        if getattr(source, "seekable", lambda: False)():
            source.seek(0)
        return source
    if not isinstance(source, str):
        raise MediaError(source, f"unsupported media source type {type(source).__name__}")
    if source.startswith("data:"):
        head, sep, data = source.partition(",")
        if not sep or ";base64" not in head:
            raise MediaError(source, "data URL must be base64 ('data:<mime>;base64,<data>')")
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise MediaError(source, f"invalid base64 data ({e})") from None
        if not raw:
            raise MediaError(source, "empty data URL")
        return io.BytesIO(raw)
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as r:
                raw = r.read()
        except Exception as e:  # noqa: BLE001 - any network failure becomes a MediaError
            raise MediaError(source, f"download failed ({e})") from None
        if not raw:
            raise MediaError(source, "empty download")
        return io.BytesIO(raw)
    path = source[len("file://") :] if source.startswith("file://") else source
    if not os.path.exists(path):
        raise MediaError(source, "file not found")
    if os.path.isdir(path):
        raise MediaError(source, "is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(source, "empty file (0 bytes)")
    return path


# A WAV header states every stream parameter: probing its data (ffmpeg's default) costs about
# 5 ms per file, most of a short clip's decode; a training stage opens tens of thousands.
_WAV_OPEN = {"format": "wav", "options": {"probesize": "32", "analyzeduration": "0"}}


def _is_wav(src: str | io.IOBase) -> bool:
    """Whether ``read_source``'s result starts with a RIFF/WAVE header."""
    if isinstance(src, str):
        with open(src, "rb") as f:
            head = f.read(12)
    elif getattr(src, "seekable", lambda: False)():
        pos = src.tell()
        head = src.read(12)
        src.seek(pos)
    else:
        return False
    return head[:4] == b"RIFF" and head[8:12] == b"WAVE"


def open_container(source: Any):
    """``av.open`` on any source; corrupt or unrecognised data raises ``MediaError``."""
    import av

    src = read_source(source)
    try:
        return av.open(src, mode="r", **(_WAV_OPEN if _is_wav(src) else {}))
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types for bad input
        raise MediaError(source, f"cannot decode: corrupt or unsupported media ({e})") from None
