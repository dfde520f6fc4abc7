"""The FastAPI app: OpenAI chat completions, the Realtime socket, the web page, health.

``create_app(engine, cfg)`` builds it around any object that follows docs/ENGINE_API.md;
``add_serve_args`` / ``run_serve`` are the ``omnistream serve`` entry points.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnistream.engine.events import Done

from .bridge import new_session
from .config import ServeConfig
from .errors import APIError
from .scheduler import Scheduler, SlotLimiter

log = logging.getLogger("omnistream.serve")
WEB_DIR = Path(__file__).parent / "web"


class ServerState:
    """What the routes share: the engine, its scheduler, limits, readiness."""

    def __init__(self, engine, cfg: ServeConfig):
        self.engine = engine
        self.cfg = cfg
        self.model_id = str(getattr(engine, "model_id", "omnistream"))
        self.scheduler = Scheduler()
        self.slots = SlotLimiter(cfg.max_concurrent)
        self.ready = asyncio.Event()
        self.warmup_s: float | None = None
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "omnistream"}

    async def warm_up(self) -> None:
        """One short text+speech reply through the whole stack before /ready says yes."""
        t0 = time.perf_counter()
        if self.cfg.warmup:
            def make_gen():
                sess = new_session(self.engine, voice=None, system=None, audio_output=True,
                                   sampling={"temperature": 0.0}, max_new_tokens=2, seed=0,
                                   max_speech_s=1.0)
                return sess.respond([{"role": "user", "content": [{"type": "text",
                                                                   "text": "Hi"}]}])
            try:
                async for ev in self.scheduler.stream(make_gen, None, name="warmup"):
                    if isinstance(ev, Done):
                        break
            except Exception:  # noqa: BLE001 - a failed warm-up should not kill the server
                log.exception("warm-up failed")
        self.warmup_s = time.perf_counter() - t0
        self.ready.set()


def bearer_ok(cfg: ServeConfig, header: str | None) -> bool:
    if cfg.api_key is None:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), cfg.api_key.encode())


def create_app(engine, cfg: ServeConfig | None = None) -> FastAPI:
    """The server app around ``engine`` (see docs/ENGINE_API.md)."""
    cfg = cfg or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = ServerState(engine, cfg)
        app.state.omni = st
        st.scheduler.start()
        warm = asyncio.create_task(st.warm_up())
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.to_thread(st.scheduler.stop)

    app = FastAPI(title="omnistream", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path.startswith("/v1/") and \
                not bearer_ok(cfg, request.headers.get("authorization")):
            return APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer "
                            "<key>'.", code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, str(exc.errors())[:500]).response()

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    @app.get("/health")
    async def health(request: Request):
        st = request.app.state.omni
        return {"status": "ok", "ready": st.ready.is_set(), "active": st.slots.used,
                "max_concurrent": cfg.max_concurrent}

    @app.get("/ready")
    async def ready(request: Request):
        st = request.app.state.omni
        if not st.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return {"status": "ready", "model": st.model_id, "warmup_s": st.warmup_s,
                "voices": list(st.engine.speakers)}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    from .openai import router as openai_router
    from .realtime import router as realtime_router

    app.include_router(openai_router)
    app.include_router(realtime_router)
    return app


# ---------------------------------------------------------------- CLI


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``omnistream serve`` options."""
    d = ServeConfig()
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help="concurrent sessions before 429")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
    p.add_argument("--max-audio-s", type=float, default=d.max_audio_s)
    p.add_argument("--max-video-s", type=float, default=d.max_video_s)
    p.add_argument("--max-speech-s", type=float, default=d.max_speech_s,
                   help="longest spoken reply (seconds)")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="folder whose files requests may name by path")
    p.add_argument("--no-remote-media", action="store_true", help="refuse http(s) media URLs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the Thinker/Talker decoders")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--log-level", default="warning", help="info also logs every request")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        api_key=args.api_key, max_concurrent=args.max_concurrent, max_tokens=args.max_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20), max_audio_s=args.max_audio_s,
        max_video_s=args.max_video_s, max_speech_s=args.max_speech_s,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_media=not args.no_remote_media, warmup=not args.no_warmup)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import uvicorn

    from omnistream.engine.session import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device, audio_output=True,
                         quantize=args.quantize)
    if engine.random_weights:
        print("note: this checkpoint has RANDOM weights (omnistream make-tiny): replies are noise",
              file=sys.stderr)
    print(f"serving {engine.model_id} on http://{args.host}:{args.port} "
          f"(voices: {', '.join(engine.speakers)}; web page at /)", file=sys.stderr)
    app = create_app(engine, config_from_args(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=16 * 2**20)
    return 0


serve_main = run_serve


def main(argv: list[str] | None = None) -> int:
    p = add_serve_args(argparse.ArgumentParser("omnistream serve"))
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
