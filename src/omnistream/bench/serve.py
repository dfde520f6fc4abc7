"""``omnistream bench serve``: a bounded load test of the server on loopback, N concurrent
streaming clients (text + speech) through the official ``openai`` client.

    omnistream bench serve --model tiny            # the tiny checkpoint (built if missing)
    omnistream bench serve --fake --step-ms 5      # the deterministic fake engine (a checkout)
    omnistream bench serve --model DIR --clients 1 4 8 --max-tokens 32
    omnistream bench serve --shapes 3b --layers 4 --clients 1 8   # random weights, 3B widths

The server runs in a child process on 127.0.0.1 (its own GIL) with one cache slot per client of
the largest level, so its scheduler decodes the streams in batches (``engine/batch.py``). Every
client streams one reply with greedy text; all replies must equal the single-client reply (no
cross-talk) and end normally. Prints wall time, aggregate text tokens/s, audio seconds produced
per second and first-audio latency per concurrency level, each also as a ratio to the first
level (``--clients 1 ...``: batching's gain over one stream).

``--shapes 3b|7b`` writes (once, under ``--cache-dir``) a random checkpoint with the release's
Thinker and Talker widths and ``--layers`` / ``--talker-layers`` decoder layers (tiny encoders;
token2wav tiny for 3b, the release's for 7b).
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


def _serve(model: str | None, fake: bool, step_ms: float, port: int, max_speech_s: float,
           slots: int, dtype: str, device: str, code2wav_hold: int, tf32: bool,
           code2wav_thread: bool) -> None:
    import uvicorn

    from omnistream.serve.app import create_app
    from omnistream.serve.config import ServeConfig

    if fake:
        engine = _fake_engine_module().FakeEngine(step_delay=step_ms / 1000)
    else:
        from omnistream.engine.session import Engine

        engine = Engine.load(model, dtype=dtype, device=device, quiet=True, tf32=tf32)
    app = create_app(engine, ServeConfig(max_concurrent=slots, max_speech_s=max_speech_s,
                                         code2wav_hold=code2wav_hold,
                                         code2wav_thread=code2wav_thread))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def shaped_checkpoint(shapes: str, layers: int | None, talker_layers: int | None,
                      cache_dir: str | None = None) -> Path:
    """A random checkpoint (written once) with the release's 3B or 7B Thinker and Talker
    widths, ``layers`` / ``talker_layers`` decoder layers (None: all), tiny encoders; token2wav
    tiny for 3b, the release's for 7b. (The 3B Talker's widths are not in the facts sheet: the
    7B Talker's, fed 2048-wide Thinker states.)"""
    from omnistream.bench.common import TALKER_7B, TEXT_3B, TEXT_7B, omni_dict
    from omnistream.config import BigVGANConfig, DiTConfig
    from omnistream.maketiny import make_tiny

    text = dict(TEXT_3B if shapes == "3b" else TEXT_7B)
    talker = dict(TALKER_7B, embedding_size=text["hidden_size"])
    if layers:
        text["num_hidden_layers"] = layers
    if talker_layers:
        talker["num_hidden_layers"] = talker_layers
    dit = bigvgan = None
    if shapes == "7b":
        dit = {k: v for k, v in DiTConfig().to_dict().items() if not k.startswith("rope")}
        bigvgan = BigVGANConfig().to_dict()
    name = f"serve-{shapes}-L{text['num_hidden_layers']}-T{talker['num_hidden_layers']}"
    out = Path(cache_dir or Path.home() / ".cache" / "omnistream" / "bench") / name
    if not (out / "config.json").exists():
        print(f"writing the random checkpoint {out} ...", file=sys.stderr)
        make_tiny(out, seed=0, config=omni_dict(text=text, talker=talker, dit=dit,
                                                bigvgan=bigvgan))
    return out


async def _one(client, prompt: str, max_tokens: int, delay: float = 0.0,
               voice: str = "Chelsie") -> dict:
    """One streamed text + speech reply through the official client, sent after ``delay`` s
    (its times count from then)."""
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    first_audio = first_text = last_text = None
    text, audio_bytes, usage, finish = [], 0, None, None
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True,
            modalities=["text", "audio"], audio={"voice": voice, "format": "pcm16"},
            max_tokens=max_tokens, temperature=0, seed=0, stream_options={"include_usage": True})
        async for ch in stream:
            usage = ch.usage or usage
            for c in ch.choices:
                finish = c.finish_reason or finish
                a = getattr(c.delta, "audio", None) or {}
                a = a if isinstance(a, dict) else a.model_dump()  # typed in newer SDKs
                t = a.get("transcript") or c.delta.content
                if t:
                    last_text = time.perf_counter() - t0
                    first_text = first_text or last_text
                    text.append(t)
                if a.get("data"):
                    first_audio = first_audio or time.perf_counter() - t0
                    audio_bytes += len(base64.b64decode(a["data"]))
    except Exception as e:  # noqa: BLE001 - an HTTP error or a failed stream: reported per row
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {
        "text": "".join(text),
        "audio_s": audio_bytes / 2 / OUTPUT_SAMPLE_RATE,
        "ttfa": first_audio,
        "ttft": first_text,
        "text_end": last_text,
        "start": t0,
        "total": time.perf_counter() - t0,
        "finish": finish,
        "tokens": usage.completion_tokens if usage is not None else 0,
    }


async def _level(
    url: str, n: int, prompt: str, max_tokens: int, ref: dict | None, timeout: float,
    stagger: float = 0.0, voice: str = "Chelsie",
) -> tuple[dict, list[dict]]:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                  timeout=timeout) as client:
        t0 = time.perf_counter()
        res = await asyncio.wait_for(
            asyncio.gather(*[_one(client, prompt, max_tokens, i * stagger, voice)
                             for i in range(n)]),
            timeout
        )
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in res if "error" in r]
    ok = not errors and all(r["finish"] in ("stop", "length") for r in res)
    differ = 0  # replies whose text or audio length is not the solo reply's
    if ok and ref is not None:
        differ = sum(
            r["text"] != ref["text"] or abs(r["audio_s"] - ref["audio_s"]) >= 1e-6 for r in res
        )
        ok = differ == 0
    ttfa = [r["ttfa"] for r in res if r.get("ttfa") is not None]
    row = {
        "clients": n,
        "ok": ok,
        "errors": errors[:2],
        "differ": differ,
        "wall_s": wall,
        "tokens_per_s": sum(r.get("tokens", 0) for r in res) / wall,
        # while text was being written: from the first request to the last text token of any
        "text_tokens_per_s": sum(r.get("tokens", 0) for r in res)
        / max([r["start"] - t0 + r["text_end"] if r.get("text_end") else wall for r in res]
              or [wall]),
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
    p.add_argument("--shapes", choices=["3b", "7b"], default=None,
                   help="instead of --model: a random checkpoint of these widths")
    p.add_argument("--layers", type=int, default=None, help="--shapes: Thinker layers")
    p.add_argument("--talker-layers", type=int, default=None, help="--shapes: Talker layers")
    p.add_argument("--cache-dir", default=None, help="--shapes: where the checkpoint is kept")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fake", action="store_true", help="use the fake engine from tests/")
    p.add_argument("--step-ms", type=float, default=5.0, help="fake engine: time per step")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-speech-s", type=float, default=2.0,
                   help="speech per reply (random weights never end their speech)")
    p.add_argument("--prompt", default="Tell me a short story about a robot.")
    p.add_argument("--timeout", type=float, default=300.0, help="per concurrency level (s)")
    p.add_argument("--voice", default="Chelsie", help="the checkpoint's voice (omni-mini: Joe)")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="client i starts i * this many seconds after the first (arrivals "
                        "while others stream); 0: all at once")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the levels this many times (interleaved), keep each one's best")
    from omnistream.serve.config import ServeConfig  # one home for the server's defaults
    p.add_argument("--code2wav-hold", type=int, default=ServeConfig.code2wav_hold,
                   help="the server's --code2wav-hold (0: chunks never wait for company)")
    p.add_argument("--code2wav-thread", action=argparse.BooleanOptionalAction,
                   default=ServeConfig.code2wav_thread, help="the server's --code2wav-thread")
    p.add_argument("--tf32", action="store_true", help="the server's --tf32 (CUDA)")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    args = p.parse_args(argv)

    try:
        import httpx
        import openai  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"omnistream bench serve needs the server and test extras ({e.name} is "
                         "missing): pip install 'omnistream[serve,test]'") from None
    if args.fake:
        _fake_engine_module()
    model = None
    if args.shapes:
        model = str(shaped_checkpoint(args.shapes, args.layers, args.talker_layers,
                                      args.cache_dir))
    elif not args.fake:
        model = args.model
        if model == "tiny" and not Path(model, "config.json").exists():
            from omnistream.maketiny import make_tiny

            make_tiny(model, seed=0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(
        target=_serve, daemon=True,
        args=(model, args.fake, args.step_ms, port, args.max_speech_s, max(args.clients),
              args.dtype, args.device, args.code2wav_hold, args.tf32, args.code2wav_thread))
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
        _, ref = asyncio.run(_level(url, 1, prompt, args.max_tokens, None, args.timeout,
                                    voice=args.voice))
        runs: dict[int, list[dict]] = {n: [] for n in args.clients}
        for _ in range(args.repeats):  # levels interleaved; the shortest wall of each is kept
            for n in args.clients:
                runs[n].append(asyncio.run(_level(url, n, prompt, args.max_tokens, ref[0],
                                                  args.timeout, args.stagger, args.voice))[0])
        rows = [min(rs, key=lambda r: r["wall_s"]) | {"ok": all(r["ok"] for r in rs)}
                for rs in runs.values()]
        engine = f"fake ({args.step_ms:.0f} ms/step)" if args.fake else model
        print(
            f"engine: {engine} ({args.dtype}, {args.device}); max_tokens {args.max_tokens}; "
            f"arrivals {args.stagger:g} s apart; "
            f"reply: {ref[0].get('tokens')} tokens, {ref[0].get('audio_s', 0):.2f} s audio"
        )
        base = rows[0]
        for r in rows:  # gains over the first level (one stream with --clients 1 ...)
            r["x_tokens_per_s"] = r["tokens_per_s"] / max(base["tokens_per_s"], 1e-9)
            r["x_text_tokens_per_s"] = (r["text_tokens_per_s"]
                                        / max(base["text_tokens_per_s"], 1e-9))
            r["x_audio_s_per_s"] = r["audio_s_per_s"] / max(base["audio_s_per_s"], 1e-9)
            if r["ttfa_p50_s"] and base["ttfa_p50_s"]:
                r["x_ttfa_p50"] = r["ttfa_p50_s"] / base["ttfa_p50_s"]
        if args.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print("tok/s: text tokens over the whole replies' wall time; text tok/s: over the time "
                  "until the last text token; x: ratio to the first level")
            print(
                f"{'clients':>7} {'ok':>4} {'wall s':>7} {'tok/s':>7} {'text tok/s':>10} "
                f"{'audio s/s':>9} {'TTFA p50':>9} {'TTFA max':>9}   x tok/s  x text  x audio"
                "  x TTFA"
            )
            for r in rows:
                print(
                    f"{r['clients']:>7} {str(r['ok']):>4} {r['wall_s']:7.2f} "
                    f"{r['tokens_per_s']:7.1f} {r['text_tokens_per_s']:10.1f} "
                    f"{r['audio_s_per_s']:9.2f} {_fmt(r['ttfa_p50_s'])} {_fmt(r['ttfa_max_s'])} "
                    f"{r['x_tokens_per_s']:9.2f} {r['x_text_tokens_per_s']:7.2f} "
                    f"{r['x_audio_s_per_s']:8.2f} {_fmt(r.get('x_ttfa_p50'))[2:]}"
                )
                if r["errors"]:
                    print("   errors:", r["errors"])
                if r["differ"]:  # greedy, so only rounding can do it (bf16: batched kernels)
                    print(f"   {r['differ']} of {r['clients']} replies differ from the solo "
                          "reply (text or audio length)")
        return 0 if all(r["ok"] for r in rows) else 2
    finally:
        proc.terminate()
        proc.join(10)


if __name__ == "__main__":
    raise SystemExit(main())
