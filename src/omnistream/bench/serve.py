"""``omnistream bench serve``: a bounded load test of the server on loopback, N concurrent
streaming clients (text + speech).

    omnistream bench serve --model tiny            # the tiny checkpoint (built if missing)
    omnistream bench serve --fake --step-ms 5      # the deterministic fake engine (a checkout)
    omnistream bench serve --model DIR --clients 1 4 8 --max-tokens 32

The server runs in a child process on 127.0.0.1 (its own GIL). Every client streams one reply with
greedy decoding; all replies must equal the single-client reply (no cross-talk) and end normally.
Prints wall time, throughput and first-audio latency per concurrency level.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path

from omnistream.media.audio import OUTPUT_SAMPLE_RATE

ROOT = Path(__file__).resolve().parents[3]  # the source checkout (for tests/serve_fake.py)


def _fake_engine_module():
    """``tests/serve_fake.py`` of a source checkout (the fake engine the server tests use)."""
    tests = ROOT / "tests"
    if not (tests / "serve_fake.py").is_file():
        raise SystemExit("--fake needs a source checkout (tests/serve_fake.py)")
    sys.path.insert(0, str(tests))
    import serve_fake

    return serve_fake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str | None, fake: bool, step_ms: float, port: int,
           max_speech_s: float = 120.0) -> None:
    import uvicorn

    from omnistream.serve.app import create_app
    from omnistream.serve.config import ServeConfig

    if fake:
        engine = _fake_engine_module().FakeEngine(step_delay=step_ms / 1000)
    else:
        from omnistream.engine.session import Engine

        engine = Engine.load(model, quiet=True)
    app = create_app(engine, ServeConfig(max_concurrent=64, max_speech_s=max_speech_s))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def _one(client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "modalities": ["text", "audio"],
        "audio": {"format": "pcm16"},
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first_audio = first_text = None
    text, audio_bytes, usage, finish = [], 0, None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                return {"error": ch["error"]["message"]}
            usage = ch.get("usage") or usage
            for c in ch["choices"]:
                finish = c.get("finish_reason") or finish
                a = c["delta"].get("audio") or {}
                t = a.get("transcript") or c["delta"].get("content")
                if t:
                    first_text = first_text or time.perf_counter() - t0
                    text.append(t)
                if a.get("data"):
                    first_audio = first_audio or time.perf_counter() - t0
                    audio_bytes += len(base64.b64decode(a["data"]))
    return {
        "text": "".join(text),
        "audio_s": audio_bytes / 2 / OUTPUT_SAMPLE_RATE,
        "ttfa": first_audio,
        "ttft": first_text,
        "total": time.perf_counter() - t0,
        "finish": finish,
        "tokens": (usage or {}).get("completion_tokens", 0),
    }


async def _level(
    url: str, n: int, prompt: str, max_tokens: int, ref: dict | None, timeout: float
) -> tuple[dict, list[dict]]:
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        t0 = time.perf_counter()
        res = await asyncio.wait_for(
            asyncio.gather(*[_one(client, url, prompt, max_tokens) for _ in range(n)]), timeout
        )
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in res if "error" in r]
    ok = not errors and all(r["finish"] in ("stop", "length") for r in res)
    if ok and ref is not None:
        ok = all(
            r["text"] == ref["text"] and abs(r["audio_s"] - ref["audio_s"]) < 1e-6 for r in res
        )
    ttfa = [r["ttfa"] for r in res if r.get("ttfa") is not None]
    row = {
        "clients": n,
        "ok": ok,
        "errors": errors[:2],
        "wall_s": wall,
        "tokens_per_s": sum(r.get("tokens", 0) for r in res) / wall,
        "audio_s_per_s": sum(r.get("audio_s", 0) for r in res) / wall,
        "ttfa_p50_s": statistics.median(ttfa) if ttfa else None,
        "ttfa_max_s": max(ttfa) if ttfa else None,
    }
    return row, res


def _fmt(v: float | None) -> str:
    return f"{v:9.3f}" if v is not None else "        -"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omnistream bench serve", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="checkpoint folder ('tiny' is built if missing)")
    p.add_argument("--fake", action="store_true", help="use the fake engine from tests/")
    p.add_argument("--step-ms", type=float, default=5.0, help="fake engine: time per step")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-speech-s", type=float, default=2.0,
                   help="speech per reply (random weights never end their speech)")
    p.add_argument("--prompt", default="Tell me a short story about a robot.")
    p.add_argument("--timeout", type=float, default=300.0, help="per concurrency level (s)")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    args = p.parse_args(argv)

    try:
        import httpx
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"omnistream bench serve needs the server and test extras ({e.name} is "
                         "missing): pip install 'omnistream[serve,test]'") from None
    if args.fake:
        _fake_engine_module()
    model = None
    if not args.fake:
        model = args.model
        if model == "tiny" and not Path(model, "config.json").exists():
            from omnistream.maketiny import make_tiny

            make_tiny(model, seed=0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(
        target=_serve, args=(model, args.fake, args.step_ms, port, args.max_speech_s), daemon=True
    )
    proc.start()
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or not proc.is_alive():
                print("server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        prompt = args.prompt + (" LONG" if args.fake else "")
        _, ref = asyncio.run(_level(url, 1, prompt, args.max_tokens, None, args.timeout))
        rows = []
        for n in args.clients:
            row, _ = asyncio.run(_level(url, n, prompt, args.max_tokens, ref[0], args.timeout))
            rows.append(row)
        engine = f"fake ({args.step_ms:.0f} ms/step)" if args.fake else model
        print(
            f"engine: {engine}; max_tokens {args.max_tokens}; reply: {ref[0].get('tokens')} "
            f"tokens, {ref[0].get('audio_s', 0):.2f} s audio"
        )
        if args.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print(
                f"{'clients':>7} {'ok':>4} {'wall s':>7} {'tok/s':>7} {'audio s/s':>9} "
                f"{'TTFA p50':>9} {'TTFA max':>9}"
            )
            for r in rows:
                print(
                    f"{r['clients']:>7} {str(r['ok']):>4} {r['wall_s']:7.2f} "
                    f"{r['tokens_per_s']:7.1f} {r['audio_s_per_s']:9.2f} {_fmt(r['ttfa_p50_s'])} "
                    f"{_fmt(r['ttfa_max_s'])}"
                )
                if r["errors"]:
                    print("   errors:", r["errors"])
        return 0 if all(r["ok"] for r in rows) else 2
    finally:
        proc.terminate()
        proc.join(10)


if __name__ == "__main__":
    raise SystemExit(main())
