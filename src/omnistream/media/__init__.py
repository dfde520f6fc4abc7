"""Media decoding and features: audio (log-mel), images and video (patches)."""

from omnistream.media.errors import MediaError

__all__ = ["MediaError"]
