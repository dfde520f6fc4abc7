"""OpenAI-compatible server: chat completions, the Realtime socket and a web page."""

from __future__ import annotations


def __getattr__(name):  # keep ``import omnistream.serve`` free of FastAPI until it is used
    if name in ("create_app", "add_serve_args", "run_serve", "serve_main"):
        from . import app

        return getattr(app, name)
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    raise AttributeError(name)
