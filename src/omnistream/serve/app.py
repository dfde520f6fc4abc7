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
from omnistream.media.vad import make_detector

from .bridge import new_session, reserve_slots
from .config import ServeConfig
from .errors import APIError, validation_error
from .scheduler import Scheduler, SlotLimiter

log = logging.getLogger("omnistream.serve")
WEB_DIR = Path(__file__).parent / "web"


class ServerState:
    """What the routes share: the engine, its scheduler, limits, readiness."""

    def __init__(self, engine, cfg: ServeConfig):
        self.engine = engine
        self.cfg = cfg
        self.model_id = str(getattr(engine, "model_id", "omnistream"))
        self.scheduler = Scheduler(code2wav_hold=cfg.code2wav_hold,
                                   code2wav_thread=cfg.code2wav_thread)
        reserve_slots(engine, cfg.max_concurrent, cfg.max_speech_s)  # sessions decode batched
        self.slots = SlotLimiter(cfg.max_concurrent)
        self.ready = asyncio.Event()
        self.warmup_s: float | None = None
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "omnistream"}

    async def warm_up(self) -> None:
        """One short text+speech reply through the whole stack before the server listens.

        Raises ``WarmupError`` naming the cause when it fails: a server that cannot answer
        "Hi" does not start."""
        t0 = time.perf_counter()
        if self.cfg.warmup:
            def make_gen():
                sess = new_session(self.engine, voice=None, system=None,
                                   audio_output=bool(list(self.engine.speakers)),
                                   sampling={"temperature": 0.0}, max_new_tokens=2, seed=0,
                                   max_speech_s=1.0)
                return sess.respond([{"role": "user", "content": [{"type": "text",
                                                                   "text": "Hi"}]}])
            try:
                async for ev in self.scheduler.stream(make_gen, None, name="warmup"):
                    if isinstance(ev, Done):
                        break
            except Exception as e:  # noqa: BLE001 - re-raised with its cause named
                raise WarmupError(f"warm-up failed: {type(e).__name__}: {e}") from e
        try:  # the turn detector's weights, loaded once for every socket
            make_detector(kind=self.cfg.vad)
        except (ImportError, ValueError, RuntimeError) as e:
            raise WarmupError(f"turn detector {self.cfg.vad!r}: {e}") from e
        self.warmup_s = time.perf_counter() - t0
        self.ready.set()


class WarmupError(RuntimeError):
    """The warm-up reply failed; the server does not start."""


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by Content-Length or as they stream
    in (before any JSON parsing or validation)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cl = dict(scope.get("headers") or ()).get(b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.limit:
            err = APIError(413, f"request body is {int(cl)} bytes; the limit is {self.limit}",
                           code="request_too_large")
            return await err.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # FastAPI passes HTTP exceptions from body reading on
                    raise StarletteHTTPException(
                        413, f"request body is over the limit of {self.limit} bytes")
            return msg

        await self.app(scope, limited, send)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnistream")
    except PackageNotFoundError:
        return "0"


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
        app.state.startup_error = None
        st.scheduler.start()
        try:
            try:
                await st.warm_up()
            except WarmupError as e:
                app.state.startup_error = str(e)
                log.error("%s; the server does not start", e)
                raise
            yield
        finally:
            await asyncio.to_thread(st.scheduler.stop)

    # /openapi.json and /docs are open like /health (auth covers /v1/ only)
    app = FastAPI(title="omnistream", version=_version(), lifespan=lifespan, docs_url="/docs",
                  redoc_url=None, openapi_url="/openapi.json",
                  description="OpenAI-compatible chat completions (text and speech in and out) "
                  "and the Realtime socket `/v1/realtime` (not described here: WebSocket).")
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

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
        code = "request_too_large" if exc.status_code == 413 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    @app.get("/health")
    async def health(request: Request):
        """Liveness and load (no API key needed)."""
        st = request.app.state.omni
        return {"status": "ok", "ready": st.ready.is_set(), "active": st.slots.used,
                "max_concurrent": cfg.max_concurrent}

    @app.get("/ready", responses={503: {"description": "still warming up"}})
    async def ready(request: Request):
        """Readiness: the model answered its warm-up (no API key needed)."""
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
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: float32 matmuls (Token2Wav's) in TF32")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--vad", default=d.vad, choices=["auto", "silero", "energy"],
                   help="Realtime turn detector (auto: Silero when silero-vad is installed, "
                        "else loudness)")
    p.add_argument("--realtime-temperature", type=float, default=d.realtime_temperature,
                   help="a Realtime session's temperature until the client sets one (OpenAI's "
                        "default is 0.8; 0: greedy, as chat completions answer by default)")
    p.add_argument("--code2wav-hold", type=int, default=d.code2wav_hold,
                   help="most rounds a ready speech chunk waits for other replies' chunks to "
                        "share one code2wav call (0: never)")
    p.add_argument("--code2wav-thread", action=argparse.BooleanOptionalAction,
                   default=d.code2wav_thread,
                   help="code2wav on a thread of its own beside the Thinker and Talker steps, "
                        "so text does not wait for speech (then --code2wav-hold is unused)")
    p.add_argument("--log-level", default="warning", help="info also logs every request")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        api_key=args.api_key, max_concurrent=args.max_concurrent, max_tokens=args.max_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20), max_audio_s=args.max_audio_s,
        max_video_s=args.max_video_s, max_speech_s=args.max_speech_s,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_media=not args.no_remote_media, warmup=not args.no_warmup, vad=args.vad,
        realtime_temperature=args.realtime_temperature, code2wav_hold=args.code2wav_hold,
        code2wav_thread=args.code2wav_thread)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    from omnistream.engine.session import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    cfg = config_from_args(args)  # bad settings fail before the model loads
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device, audio_output=True,
                         quantize=args.quantize, tf32=args.tf32)
    if engine.random_weights:
        print("note: this checkpoint has RANDOM weights (omnistream make-tiny): replies are noise",
              file=sys.stderr)
    print(f"serving {engine.model_id} on http://{args.host}:{args.port} "
          f"(voices: {', '.join(engine.speakers)}; web page at /)", file=sys.stderr)
    return serve_app(create_app(engine, cfg), args.host, args.port,
                     args.log_level)


def serve_app(app: FastAPI, host: str, port: int, log_level: str = "warning") -> int:
    """Run ``app`` with uvicorn until interrupted; 1 with an error line when it cannot start
    (a failed warm-up, a port in use)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           ws_max_size=16 * 2**20, lifespan="on"))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when the app's startup fails
        pass
    if not server.started:
        why = getattr(app.state, "startup_error", None) or "see the log above"
        print(f"error: the server did not start: {why}", file=sys.stderr)
        return 1
    return 0


serve_main = run_serve


def main(argv: list[str] | None = None) -> int:
    p = add_serve_args(argparse.ArgumentParser("omnistream serve"))
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
