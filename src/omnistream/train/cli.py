"""``omnistream train --config STAGE.json --data F.jsonl --model DIR --out DIR``.

Single process: run it directly. Several: ``torchrun --nproc_per_node N -m omnistream.cli train
...`` (each process reads ``RANK``/``WORLD_SIZE``; gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage config (configs/train/*.json)")
    p.add_argument("--data", required=True, nargs="+", help="training JSONL file(s)")
    p.add_argument("--model", required=True, help="source checkpoint directory (released layout)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, logs, resume state)")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out JSONL file(s)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--batch-size", type=int, default=None, help="examples per micro-batch per process"
    )
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="autocast dtype")
    p.add_argument("--dist", choices=["ddp", "fsdp"], default=None)
    p.add_argument(
        "--stop-at", type=int, default=None, help="stop after this many steps (resumable)"
    )
    p.add_argument("--no-resume", action="store_true", help="ignore a resume state in --out")


def run_train(args: argparse.Namespace) -> int:
    from omnistream.engine.allocator import tune_malloc
    from omnistream.train.loop import train
    from omnistream.train.stages import CODEC_TASKS, DENSE_TASKS, Stage

    stage = Stage.from_file(args.config)
    over = {
        k: getattr(args, k)
        for k in ("max_steps", "lr", "batch_size", "grad_accum", "dtype", "dist")
    }
    stage = stage.replace(**{k: v for k, v in over.items() if v is not None})
    tune_malloc()  # freed activations reused, not mapped afresh: CPU steps faster (allocator.py)
    if stage.task in CODEC_TASKS:
        from omnistream.train.codec import train_codec

        train_codec(stage, args.data, args.model, args.out, stop_at=args.stop_at,
                    resume=not args.no_resume)
        return 0
    if stage.task in DENSE_TASKS:
        from omnistream.train.dense import train_dense

        res = train_dense(stage, args.data, args.model, args.out, eval_data=args.eval_data,
                           stop_at=args.stop_at, resume=not args.no_resume)
        if "held_out" in res:
            print(" ".join(f"{k} {v:.3f}" for k, v in res["held_out"].items()))
        return 0
    res = train(
        stage,
        args.data,
        args.model,
        args.out,
        eval_data=args.eval_data,
        stop_at=args.stop_at,
        resume=not args.no_resume,
    )
    if res["bad_records"]:
        print(f"{len(res['bad_records'])} bad records skipped (see train_log.jsonl)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omnistream-train", description=__doc__)
    add_train_args(ap)
    return run_train(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
