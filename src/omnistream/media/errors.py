"""The one error type raised for bad media input."""

from __future__ import annotations


class MediaError(ValueError):
    """A media item that cannot be used. The message names the item (file, URL or a short
    description of the object) and the problem."""

    def __init__(self, source: object, problem: str):
        self.source = describe(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def describe(source: object) -> str:
    """A short, printable name for a media source (paths and URLs as given, data URLs cut)."""
    if isinstance(source, str):
        if source.startswith("data:"):
            return source[: source.find(",") + 1 if "," in source else 32][:48] + "..."
        return source
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<{type(source).__name__} shape {tuple(shape)}>"
    name = getattr(source, "name", None) or getattr(source, "filename", None)
    if isinstance(name, str) and name:
        return name
    return f"<{type(source).__name__}>"
