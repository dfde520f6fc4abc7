"""The ``omnistream`` command: make-tiny, generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

RANDOM_WEIGHTS_NOTICE = (
    "note: this checkpoint has RANDOM weights (made by `omnistream make-tiny`); its text and "
    "speech are noise. Use --model with a real Qwen2.5-Omni checkpoint for real answers."
)
# commands whose code needs an optional extra: (module imported first, the extra's name)
EXTRAS = {"serve": ("omnistream.serve.app", "serve"), "train": ("omnistream.train.cli", None)}


class _MediaArg(argparse.Action):
    """``--audio/--image/--video F``: appends ``(kind, F)`` to one shared list."""

    def __call__(self, parser, namespace, values, option_string=None):
        media = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, media + [(option_string.lstrip("-"), values)])


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    # the Talker's: each unset one is the checkpoint's (generation_config.json's talker_* keys,
    # else the release's T 0.9, k 40, p 0.8, penalty 1.05)
    p.add_argument("--talker-temperature", type=float, default=None)
    p.add_argument("--talker-top-k", type=int, default=None)
    p.add_argument("--talker-top-p", type=float, default=None)
    p.add_argument("--talker-repetition-penalty", type=float, default=None)
    p.add_argument("--talker-max-new-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=None)


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: $OMNISTREAM_MODEL, else the "
                        "repository's models/omni-mini, else its tiny/)")


def _add_model(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the Thinker/Talker decoders")
    p.add_argument("--device", default="cpu")


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="omnistream", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the released layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="answer one prompt in streamed text (+ speech)")
    _add_model(p)
    p.add_argument("--prompt", default=None,
                   help="the question in text (optional with --audio / --image / --video)")
    p.add_argument("--system", default=None)
    # one list in command-line order: the prompt's media parts come in the order given
    for kind in ("audio", "image", "video"):
        p.add_argument(f"--{kind}", dest="media", action=_MediaArg, default=[], metavar="F")
    p.add_argument("--use-audio-in-video", action="store_true")
    p.add_argument("--voice", default=None)
    p.add_argument("--no-audio", action="store_true", help="text only (speech half not loaded)")
    p.add_argument("--out", default="reply.wav", help="WAV written progressively as audio streams")
    p.add_argument("--play", action="store_true", help="play audio as it streams (needs a device)")
    p.add_argument("--ignore-eos", action="store_true", help="run both stages to max lengths")
    p.add_argument("--offline", action="store_true",
                   help="non-streaming path (whole reply, then speech)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    _add_sampling(p)

    p = sub.add_parser("chat", help="interactive multi-turn terminal session")
    _add_model(p)
    p.add_argument("--system", default=None)
    p.add_argument("--voice", default=None)
    p.add_argument("--no-audio", action="store_true")
    p.add_argument("--out-dir", default="chat_audio")
    p.add_argument("--mic", action="store_true",
                   help="talk instead of typing: turns from the microphone, replies on the "
                        "speaker; speaking over a reply interrupts it (needs the audio extra)")
    p.add_argument("--vad", default="auto", choices=["auto", "silero", "energy"],
                   help="--mic: turn detector (auto: Silero when silero-vad is installed)")
    p.add_argument("--silence-ms", type=int, default=500, help="--mic: silence that ends a turn")
    p.add_argument("--no-barge-in", action="store_true",
                   help="--mic: ignore the microphone while a reply plays (no headphones)")
    _add_sampling(p)

    # (conflict_handler: our --model, with its default, replaces the server's own)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP + Realtime server with a web page",
                       conflict_handler="resolve")
    try:
        from omnistream.serve.app import add_serve_args
    except ImportError:  # `omnistream serve` itself says what to install (main)
        add_serve_args = None
    if add_serve_args is not None:
        add_serve_args(p)
        _add_model_arg(p)

    p = sub.add_parser("codec", help="speech codec: encode speech to codes, decode, evaluate")
    csub = p.add_subparsers(dest="codec_cmd", required=True)
    q = csub.add_parser("encode", help="speech file -> 50 Hz codes (JSON)")
    q.add_argument("input", help="audio file (any format PyAV decodes)")
    _add_model_arg(q)
    q.add_argument("-o", "--out", default=None, help="codes JSON (default: print to stdout)")
    q = csub.add_parser("decode", help="codes JSON -> 24 kHz WAV (streamed as the engine speaks)")
    q.add_argument("codes", help="codes JSON written by `omnistream codec encode`")
    _add_model_arg(q)
    q.add_argument("-o", "--out", required=True, help="output WAV")
    q.add_argument("--voice", default=None)
    _add_decode_args(q)
    q = csub.add_parser("eval", help="round trip on held-out sentences (WER, MCD, speed)")
    _add_model_arg(q)
    _add_decode_args(q)
    q.add_argument("--n", type=int, default=100, help="held-out sentences")
    q.add_argument("--no-recognizer", action="store_true", help="skip WER (no eval extra)")
    q.add_argument("--vocoder-wer", action="store_true",
                   help="also the WER of the vocoder on each clip's own mel")
    q.add_argument("--seed", type=int, default=0,
                   help="decode noise: clip i uses seed + i (default 0)")
    q.add_argument("--json-out", default=None)

    p = sub.add_parser("eval", help="omni-mini tasks on fresh cases: accuracy per family, "
                       "speech WER, time to first audio, real-time factor")
    _add_model_arg(p)
    p.add_argument("--n", type=int, default=50, help="fresh cases per family")
    p.add_argument("--seed", type=int, default=None, help="case seed (>= 1000000, the default)")
    p.add_argument("--families", default=None, help="comma-separated (default: all)")
    p.add_argument("--no-recognizer", action="store_true", help="skip WER (no eval extra)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--speech-seconds", type=float, default=12.0, help="speech per reply, at most")
    p.add_argument("--solver", default=None, choices=["rk4", "euler"],
                   help="code2wav ODE solver (default: the checkpoint's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--levels", action="store_true",
                   help="audio at random microphone levels (robustness; not TASKS.md's)")
    p.add_argument("--codec-wer", action="store_true",
                   help="also the voice's recordings of the answers through the checkpoint's "
                        "codec: the codec's share of the WER")
    p.add_argument("--json-out", default=None,
                   help="every case's result, with its rendering's ground truth, as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-case lines")

    sub.add_parser("bench", help="benchmarks against the transformers reference "
                   "(`omnistream bench --help`)")

    p = sub.add_parser("train", help="fine-tune (SFT / DPO / talker / encoder alignment)")
    try:
        from omnistream.train.cli import add_train_args
    except ImportError:  # `omnistream train` itself names the missing module (main)
        add_train_args = None
    if add_train_args is not None:
        add_train_args(p)
    return ap


def _messages(args: argparse.Namespace) -> list[dict]:
    content = [{"type": kind, kind: f} for kind, f in args.media]
    if args.prompt:
        content.append({"type": "text", "text": args.prompt})
    if not content:
        raise ValueError("nothing to answer: give --prompt, --audio, --image or --video")
    msgs = []
    if args.system:
        msgs.append({"role": "system", "content": args.system})
    msgs.append({"role": "user", "content": content})
    return msgs


def _session_options(args: argparse.Namespace):
    """The ``SessionOptions`` of ``generate`` / ``chat`` from their flags."""
    from omnistream.engine.options import SessionOptions
    from omnistream.engine.sampling import SamplingParams

    return SessionOptions(
        voice=args.voice, system=args.system, audio_output=not args.no_audio,
        use_audio_in_video=getattr(args, "use_audio_in_video", False),
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty),
        max_new_tokens=args.max_new_tokens, ignore_eos=getattr(args, "ignore_eos", False),
        seed=args.seed,
        talker_max_new_tokens=args.talker_max_new_tokens,
    )


def _talker_flags(options, args: argparse.Namespace, engine):
    """``options`` with the given ``--talker-*`` flags over the checkpoint's Talker sampling."""
    flags = {f: getattr(args, "talker_" + f) for f in
             ("temperature", "top_k", "top_p", "repetition_penalty")}
    flags = {f: v for f, v in flags.items() if v is not None}
    if not flags:
        return options
    return options.replace(talker_sampling=replace(engine.talker_sampling, **flags))


def _load_engine(args: argparse.Namespace, audio_output: bool):
    from omnistream.engine.session import Engine
    from omnistream.models import resolve_model

    engine = Engine.load(resolve_model(args.model), dtype=args.dtype, device=args.device,
                         audio_output=audio_output, quantize=args.quantize)
    if engine.random_weights:
        print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    return engine


def _cmd_generate(args: argparse.Namespace) -> int:
    from omnistream.engine.events import AudioChunk, Done, TextDelta
    from omnistream.engine.wav import Player, StreamingWavWriter

    options = _session_options(args)
    messages = _messages(args)
    # a missing audio device fails here, before the model loads and before any output
    player = Player.open() if (args.play and options.audio_output) else None
    try:
        engine = _load_engine(args, options.audio_output)
        sess = engine.session(_talker_flags(options, args, engine))
        events = sess.respond(messages, offline=args.offline)
        first = next(events)  # media decoding and prefill: bad input fails here, before any file
        writer = StreamingWavWriter(args.out) if options.audio_output else None
        done = None
        for ev in itertools.chain([first], events):
            if isinstance(ev, TextDelta):
                if not args.json:
                    print(ev.text, end="", flush=True)
            elif isinstance(ev, AudioChunk):
                writer.write(ev.pcm)
                if player is not None:
                    player.write(ev.pcm)
            elif isinstance(ev, Done):
                done = ev
        if writer is not None:
            writer.close()
    finally:
        if player is not None:
            player.close()
    assert done is not None
    if args.json:
        print(json.dumps({
            "text": done.text, "prompt_ids": sess.last_prompt_ids, "text_ids": done.text_ids,
            "codec_ids": done.codec_ids, "timings": done.timings,
            "finish_reason": done.finish_reason,
        }))
    else:
        print()
        t = done.timings
        parts = [f"{k}={v:.3f}" for k, v in t.items()]
        print("[" + " ".join(parts) + "]", file=sys.stderr)
        if writer is not None:
            print(f"wrote {args.out} ({writer.seconds:.2f} s of audio)", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from omnistream.engine.events import AudioChunk, Done, TextDelta
    from omnistream.engine.wav import StreamingWavWriter

    if args.mic:
        return _cmd_chat_mic(args)
    options = _session_options(args)
    audio_output = options.audio_output
    engine = _load_engine(args, audio_output)
    sess = engine.session(_talker_flags(options, args, engine))
    out_dir = Path(args.out_dir)
    print("omnistream chat: type a message; attach files with /audio F, /image F, /video F; "
          "/quit to leave.", file=sys.stderr)
    attach: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        cmd, _, arg = line.partition(" ")
        if cmd in ("/audio", "/image", "/video"):
            kind = cmd[1:]
            if not Path(arg).exists():
                print(f"no such file: {arg}", file=sys.stderr)
                continue
            attach.append({"type": kind, kind: arg})
            print(f"attached {kind} {arg}", file=sys.stderr)
            continue
        content = attach + [{"type": "text", "text": line}]
        attach = []
        writer = None
        if audio_output:
            out_dir.mkdir(parents=True, exist_ok=True)
            writer = StreamingWavWriter(out_dir / f"turn{turn:03d}.wav")
        try:
            for ev in sess.respond([{"role": "user", "content": content}]):
                if isinstance(ev, TextDelta):
                    print(ev.text, end="", flush=True)
                elif isinstance(ev, AudioChunk) and writer is not None:
                    writer.write(ev.pcm)
                elif isinstance(ev, Done):
                    print()
        except ValueError as e:  # bad input names its problem; the session goes on
            print(f"error: {e}", file=sys.stderr)
        if writer is not None:
            writer.close()
            print(f"[audio: {writer.path}]", file=sys.stderr)
        turn += 1
    return 0


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="flow-matching ODE steps per chunk (default: the checkpoint's)")
    p.add_argument("--solver", default=None, choices=["euler", "rk4"],
                   help="ODE solver (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's)")


def _cmd_codec(args: argparse.Namespace) -> int:
    from omnistream.engine.codec import Codec, read_codes, write_codes
    from omnistream.models import resolve_codec_model

    model = resolve_codec_model(args.model)
    if args.codec_cmd == "eval":
        from omnistream.eval.codec import evaluate_codec, print_report

        res = evaluate_codec(model, n=args.n, recognize=not args.no_recognizer,
                             vocoder_wer=args.vocoder_wer, seed=args.seed, steps=args.steps,
                             solver=args.solver, guidance_scale=args.guidance)
        print_report(res)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    codec = Codec.load(model)
    if args.codec_cmd == "encode":
        codes = codec.encode(args.input)
        if args.out:
            write_codes(args.out, codes, model)
            print(f"{len(codes)} codes ({len(codes) / 50:.2f} s) -> {args.out}", file=sys.stderr)
        else:
            print(json.dumps({"codes": codes.tolist(), "rate": 50}))
        return 0
    from omnistream.engine.wav import wav_bytes

    codes = codec.check_codes(read_codes(args.codes))
    pcm = codec.decode(codes, voice=args.voice, steps=args.steps, solver=args.solver,
                       guidance_scale=args.guidance)  # checked before any output is written
    Path(args.out).write_bytes(wav_bytes(pcm))
    print(f"{pcm.size / 24000:.2f} s of speech -> {args.out}", file=sys.stderr)
    return 0


def _cmd_chat_mic(args: argparse.Namespace) -> int:
    from omnistream.engine.wav import AudioDeviceError, Player
    from omnistream.media.vad import VADConfig, make_detector
    from omnistream.mic import MicChat, open_microphone

    options = _session_options(args)
    # a missing microphone, speaker or detector fails here, before the model loads
    sd, rate = open_microphone()
    try:
        detector = make_detector(VADConfig(silence_duration_ms=args.silence_ms), args.vad)
    except ImportError as e:
        raise ValueError(str(e)) from e
    player = None
    if options.audio_output:
        try:
            player = Player.open()
        except AudioDeviceError as e:
            cause = e.__cause__
            if cause is None or "output device" not in str(e):
                raise
            raise AudioDeviceError(f"no audio output device to play the replies on "
                                   f"({type(cause).__name__}: {cause}); add --no-audio for "
                                   "text replies") from cause
    try:
        engine = _load_engine(args, options.audio_output)
        sess = engine.session(_talker_flags(options, args, engine))
        print(f"omnistream chat --mic: speak (turns: {detector.name} detector, input "
              f"{rate} Hz); Ctrl-C to leave. Use headphones: the microphone hears the speaker.",
              file=sys.stderr)
        chat = MicChat(sess, detector, rate, player=player,
                       out_dir=args.out_dir if options.audio_output else None,
                       barge_in=not args.no_barge_in)
        return chat.run(sd)
    finally:
        if player is not None:
            player.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``omnistream`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: options pass through untouched
        from omnistream.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    if argv[:1] and argv[0] in EXTRAS:
        missing = _missing_extra(argv[0])
        if missing:
            print(f"omnistream {argv[0]}: error: {missing}", file=sys.stderr)
            return 2
    args = _build_parser().parse_args(argv)
    from omnistream.checkpoint import CheckpointError
    from omnistream.engine.wav import AudioDeviceError

    try:
        return _dispatch(args)
    except (ValueError, CheckpointError, AudioDeviceError) as e:  # one line naming the problem
        print(f"omnistream {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _missing_extra(cmd: str) -> str | None:
    """Why ``cmd``'s code cannot be imported (the real missing module, and the extra that
    provides it), or None when it can."""
    module, extra = EXTRAS[cmd]
    try:
        __import__(module)
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        if not top or top == "omnistream":  # not a missing package: our own code is broken
            return f"cannot import {module}: {e}"
        if extra is not None:
            return f"{e}; install the {extra} extra: pip install 'omnistream[{extra}]'"
        return f"{e}; install it: pip install {top}"
    return None


def _cmd_eval(args: argparse.Namespace) -> int:
    from omnistream.eval.tasks import evaluate, format_table
    from omnistream.models import resolve_model

    def show(r) -> None:
        mark = "ok " if r.correct else "BAD"
        print(f"{mark} {r.family:<17} {r.answer!r} -> {r.reply!r}", file=sys.stderr, flush=True)

    res = evaluate(resolve_model(args.model), n=args.n, seed=args.seed,
                   families=args.families.split(",") if args.families else None,
                   recognize=False if args.no_recognizer else None,
                   max_new_tokens=args.max_new_tokens, speech_seconds=args.speech_seconds,
                   solver=args.solver, dtype=args.dtype, levels=args.levels,
                   codec_wer=args.codec_wer, progress=None if args.quiet else show)
    print(format_table(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.cmd == "make-tiny":
        from omnistream.maketiny import make_tiny

        make_tiny(args.dir, seed=args.seed)
        print(f"wrote a tiny random checkpoint to {args.dir} ({time.perf_counter() - t0:.1f} s)")
        return 0
    if args.cmd == "generate":
        return _cmd_generate(args)
    if args.cmd == "chat":
        return _cmd_chat(args)
    if args.cmd == "serve":
        from omnistream.models import resolve_model
        from omnistream.serve.app import run_serve

        args.model = resolve_model(args.model)
        return run_serve(args) or 0
    if args.cmd == "codec":
        return _cmd_codec(args)
    if args.cmd == "eval":
        return _cmd_eval(args)
    if args.cmd == "train":
        from omnistream.train.cli import run_train

        return run_train(args) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
