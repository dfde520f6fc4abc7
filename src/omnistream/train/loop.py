"""The training loop: one stage, read top to bottom (nanoGPT style).

    setup (process group, seeds) -> data -> model (+ LoRA, trainable selection, DDP/FSDP2)
    -> optimizer -> resume? -> for each step: lr, micro-batches with accumulation, clip, step,
    log, eval, checkpoint -> final release-layout checkpoint in ``out_dir``.

Loss normalisation: every objective returns a *sum* and a count; the step's loss is the sum over
all micro-batches and processes divided by the global count (all-reduced before the backward), so
1 process with accumulation and N processes give the same loss and gradients for one global batch.

Resume state (``out_dir/resume/``, swapped in whole at each save): trained parameters,
optimizer, step, data position and RNG states; a resumed run continues the exact same loss
curve. Distributed runs are started by ``torchrun`` (env ``WORLD_SIZE``/``RANK``; gloo on CPU,
nccl on CUDA) or by calling ``train`` in spawned processes that set those variables.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from omnistream.checkpoint import resolve_dtype
from omnistream.prompt import processor_options
from omnistream.tokenizer import Tokenizer
from omnistream.train import losses
from omnistream.train.data import IGNORE, Batches, Dataset, collate, split
from omnistream.train.lora import apply_lora, merge_lora
from omnistream.train.model import load_model, save_released
from omnistream.train.stages import Stage, select_trainable

RESUME_DIR = "resume"
LOG_FILE = "train_log.jsonl"
RESUME_FILE = "resume.pt"  # a single-process stage's resume state (dense, codec)
STAGE_FILE = "train_stage.json"  # the finished stage's settings, written last: its "done" mark


def mark_done(out: Path, s: Stage) -> None:
    """Write ``STAGE_FILE``: only after a stage's last step (``make mini`` skips a marked stage)."""
    (out / STAGE_FILE).write_text(json.dumps(s.to_dict(), indent=2) + "\n")


class StepBook:
    """What a single-process stage (``train.dense``, ``train.codec``) does after each step: a
    JSON line in ``LOG_FILE`` every ``log_every`` steps (with ``elapsed_s``, the seconds since
    this run of the stage began, as ``train`` logs them), the progress bar (``verbose``), and
    ``save()`` every ``save_every`` steps, every ``save_every_s`` seconds and at step ``end``."""

    def __init__(self, out: Path, s: Stage, step: int, end: int, save: Callable[[], None],
                 verbose: bool) -> None:
        self.s, self.end, self.save = s, end, save
        self.log_f = (out / LOG_FILE).open("a")
        self.bar = None
        if verbose:
            from tqdm import tqdm

            self.bar = tqdm(total=s.max_steps, initial=step, desc=s.name, unit="step")
        self.last_save = self.t0 = time.monotonic()

    def log(self, rec: dict) -> None:
        self.log_f.write(json.dumps(rec) + "\n")
        self.log_f.flush()

    def stepped(self, rec: dict) -> None:
        """After step ``rec["step"]``, whose ``rec["loss"]`` the bar shows."""
        step = rec["step"]
        if step % max(1, self.s.log_every) == 0:
            self.log({**rec, "elapsed_s": round(time.monotonic() - self.t0, 3)})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}")
        due = self.s.save_every and step % self.s.save_every == 0
        if due or time.monotonic() - self.last_save > self.s.save_every_s or step == self.end:
            self.save()
            self.last_save = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log_f.close()


class Objective(nn.Module):
    """The stage's loss as a module forward (so DDP / FSDP see the forward they wrap)."""

    def __init__(self, model: nn.Module, stage: Stage, ref_talker: nn.Module | None = None):
        super().__init__()
        self.model, self.stage = model, stage
        self.ref_talker = [ref_talker]  # a list: not a submodule (never wrapped, never saved)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        m, s = self.model, self.stage
        if s.task == "thinker":
            return losses.thinker_loss(m.thinker, batch, s.media_rms_limit,
                                       s.media_std_floor)
        if s.task == "talker":
            return losses.talker_loss(m.thinker, m.talker, batch, s.speaker_bos, s.code_noise,
                                      s.guided_attention, s.guided_layer, s.guided_head)
        return losses.dpo_loss(
            m.thinker, m.talker, self.ref_talker[0], batch, s.speaker_bos, s.dpo_beta
        )


def n_targets(batch: dict[str, Any], task: str) -> int:
    """The count ``Objective`` will return for ``batch``, known before the forward."""
    if task == "thinker":
        return int((batch["labels"] != IGNORE).sum())
    if task == "talker":
        return sum(len(e.codes) + 1 for e in batch["examples"])
    return len(batch["examples"])


def param_groups(model: nn.Module, s: Stage) -> list[dict]:
    """The trainable parameters grouped by weight decay (matrices only) and ``s.lr_scale``."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((v for pat, v in s.lr_scale.items() if fnmatch.fnmatchcase(name, pat)), 1.0)
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    # matrices first: the order resume states from before ``lr_scale`` were saved in
    order = sorted(groups, key=lambda k: (not k[0], k[1]))
    return [{"params": groups[k], "weight_decay": s.weight_decay if k[0] else 0.0,
             "lr_scale": k[1]} for k in order]


def adamw(params, s: Stage, fused: bool = True, **kw: Any) -> torch.optim.AdamW:
    """The stages' optimizer: AdamW at the stage's rate and betas, fused (one kernel over every
    tensor: on this CPU a step over omni-mini's 25 M parameters takes 12 ms instead of 64).
    ``fused=False`` for sharded (FSDP) parameters."""
    return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, fused=fused, **kw)


def sparse_tied_embedding(model: nn.Module) -> bool:
    """Let a trained token embedding that is tied to the output head send its lookup gradient
    sparse; returns whether it did. The head's gradient is dense anyway, and the lookup's is
    added into it in place: a dense lookup gradient first fills a zero [V, D] matrix, then a
    second dense add (at omni-mini's 151,936 x 128, 35 of a stage-2 step's 600 ms). The
    parameter's summed gradient is dense, so the fused optimizer is unchanged."""
    thinker = getattr(model, "thinker", None)
    if thinker is None:
        return False
    emb = thinker.model.embed_tokens
    if thinker.lm_head.weight is not emb.weight or not emb.weight.requires_grad:
        return False
    emb.sparse = True
    return True


def lr_at(step: int, s: Stage) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if step >= s.max_steps:
        return s.min_lr
    ratio = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.lr - s.min_lr)


def _speech_codes(model_dir: str | Path, cfg):
    """``path -> codes`` through the checkpoint's speech encoder (None without one), so talker
    records may give the reply as a recording (``speech``) instead of ``codec_ids``."""
    if cfg.codec_encoder_config is None:
        return None
    from omnistream.engine.codec import Codec

    codec = Codec.load(model_dir)

    @functools.cache  # many records share a reply (and its recording)
    def codes(path: str) -> tuple[int, ...]:
        return tuple(codec.encode(path).tolist())

    return lambda path: list(codes(str(path)))


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _all_sum(x: float | torch.Tensor, world: int, device) -> float:
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    if world > 1:
        dist.all_reduce(t)
    return float(t)


def train(
    stage: Stage,
    data: str | Path | list,
    model_dir: str | Path,
    out_dir: str | Path,
    eval_data: str | Path | list | None = None,
    stop_at: int | None = None,
    resume: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run one stage. ``stop_at`` ends early after that many steps (the schedule still targets
    ``stage.max_steps``), as an interruption would; with ``resume`` a run picks up the state left
    in ``out_dir/resume``. Returns ``{"losses", "eval", "out", "bad_records"}`` (rank 0 fills
    all)."""
    s = stage
    out = Path(out_dir)
    # -- processes and devices -----------------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    master = rank == 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
    log_f = (out / LOG_FILE).open("a") if master else None

    def log(obj: dict) -> None:
        if master:
            line = json.dumps(obj)
            log_f.write(line + "\n")
            log_f.flush()
            if verbose:
                print(line, flush=True)

    torch.manual_seed(s.seed + rank)
    random.seed(s.seed + rank)
    np.random.seed(s.seed + rank)
    amp_dtype = resolve_dtype(s.dtype)
    amp_dtype = None if amp_dtype == torch.float32 else amp_dtype  # float32: autocast off
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )

    # -- data ----------------------------------------------------------------------------------
    model = load_model(model_dir, with_talker=s.needs_talker)  # fp32 master weights
    tok = Tokenizer.from_dir(model_dir)
    tcfg = model.cfg.thinker_config
    speech_codes = _speech_codes(model_dir, model.cfg) if s.needs_talker else None
    opts = processor_options(model_dir)  # media decoded as the engine will decode them
    ds = Dataset(data, tok, tcfg, s.task, s.max_len, log=log if master else (lambda _: None),
                 speech_codes=speech_codes, processor_options=opts, progress=master and verbose)
    eval_ds = (Dataset(eval_data, tok, tcfg, s.task, s.max_len, log=log,
                       speech_codes=speech_codes, processor_options=opts) if eval_data else None)
    global_batch = s.batch_size * s.grad_accum * world
    batches = Batches([len(e) for e in ds.examples], global_batch, s.seed, s.length_group)
    log(
        {
            "event": "data",
            "examples": len(ds),
            "bad_records": len(ds.errors),
            "global_batch": global_batch,
        }
    )

    # -- model ---------------------------------------------------------------------------------
    ref_talker = None
    if s.task == "talker_dpo":  # frozen copy of the talker as it is at the start of the stage
        ref_talker = copy.deepcopy(model.talker).requires_grad_(False).eval().to(device)
    if s.lora is not None:
        for name in s.lora.modules:
            apply_lora(model.get_submodule(name), s.lora.r, s.lora.alpha, tuple(s.lora.targets))
    trained = select_trainable(model, s)
    if world == 1:  # DDP would expect a sparse gradient of a sparse embedding, FSDP a dense one
        sparse_tied_embedding(model)
    model.to(device)
    objective = Objective(model, s, ref_talker)
    if world > 1 and s.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for stack in (model.thinker.model, getattr(model.talker, "model", None)):
            for layer in stack.layers if stack is not None else []:
                fully_shard(layer)
        fully_shard(objective)
        engine = objective
    elif world > 1:
        engine = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    else:
        engine = objective
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(param_groups(model, s), s, fused=not (world > 1 and s.dist == "fsdp"))
    log(
        {
            "event": "model",
            "stage": s.name,
            "task": s.task,
            "world": world,
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_tensors": len(trained),
        }
    )

    # -- resume --------------------------------------------------------------------------------
    step = 0
    rdir = out / RESUME_DIR
    src = _resume_source(rdir) if resume else None
    if src is not None:
        step = _load_resume(src, model, optimizer, batches, rank, s.dist == "fsdp" and world > 1)
        log({"event": "resume", "step": step})

    # -- loop ----------------------------------------------------------------------------------
    history: list[float] = []
    evals: list[dict] = []
    end = s.max_steps if stop_at is None else min(stop_at, s.max_steps)
    t0 = time.time()
    while step < end:
        lr = lr_at(step, s)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        micro = [
            collate([ds[i] for i in ids], tok.special.pad)
            for ids in split(next(batches), s.grad_accum, world, rank)
        ]
        micro = [_to(b, device) for b in micro]
        n_global = _all_sum(sum(n_targets(b, s.task) for b in micro), world, device)
        model.train()
        loss_sum = 0.0
        for a, b in enumerate(micro):
            last = a == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(engine, "no_sync")
                else engine.no_sync()
            )
            with sync:
                with autocast:
                    lsum, _ = engine(b)
                # DDP / FSDP average gradients over processes: scale so the result is sum / n_global
                (lsum.float() * (world / n_global)).backward()
            loss_sum += float(lsum.detach())
        loss = _all_sum(loss_sum, world, device) / n_global
        gnorm = None
        if s.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append(loss)
        if step % s.log_every == 0 or step == end:
            log(
                {
                    "step": step,
                    "of": s.max_steps,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "targets": int(n_global),
                    "elapsed_s": round(time.time() - t0, 3),
                }
            )
        if eval_ds is not None and s.eval_every and step % s.eval_every == 0:
            ev = evaluate(objective, eval_ds, s, tok.special.pad, world, rank, device, autocast)
            evals.append({"step": step, "eval_loss": ev})
            log({"step": step, "eval_loss": ev})
        if s.save_every and step % s.save_every == 0 and step < s.max_steps:
            _save_resume(
                rdir,
                model,
                optimizer,
                batches,
                step,
                s,
                rank,
                world,
                s.dist == "fsdp" and world > 1,
            )

    # -- the end: resume state if stopped early, otherwise the release-layout checkpoint ------
    if step < s.max_steps:
        _save_resume(
            rdir, model, optimizer, batches, step, s, rank, world, s.dist == "fsdp" and world > 1
        )
    else:
        scale = s.lora.alpha / s.lora.r if s.lora else 1.0
        full = _full_state(model, world, s.dist == "fsdp", scale)
        if master:
            save_released(out, model_dir, full)
            mark_done(out, s)
            log({"event": "saved", "dir": str(out), "step": step})
            for d in _resume_dirs(rdir):  # the stage is complete
                shutil.rmtree(d, ignore_errors=True)
    if world > 1:
        dist.barrier()
    if log_f:
        log_f.close()
    if own_group:
        dist.destroy_process_group()
    return {
        "losses": history,
        "eval": evals,
        "out": str(out),
        "bad_records": ds.errors,
        "model": model,
    }


@torch.no_grad()
def evaluate(objective, ds: Dataset, s: Stage, pad: int, world, rank, device, autocast) -> float:
    """Mean loss over the first ``eval_batches`` global batches of ``ds`` (fixed order)."""
    objective.eval()
    gb = s.batch_size * world
    tot = cnt = 0.0
    for k in range(min(s.eval_batches, len(ds) // gb)):
        ids = list(range(k * gb, (k + 1) * gb))
        b = _to(collate([ds[i] for i in split(ids, 1, world, rank)[0]], pad), device)
        with autocast:
            lsum, n = objective(b)
        tot += float(lsum)
        cnt += n
    objective.train()
    return _all_sum(tot, world, device) / max(1.0, _all_sum(cnt, world, device))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- checkpoints ----------------------------------------------------------------------------------


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _resume_dirs(rdir: Path) -> tuple[Path, Path, Path]:
    """The resume directory, the one a save is writing, and the one it replaces."""
    return rdir, rdir.with_name(rdir.name + ".tmp"), rdir.with_name(rdir.name + ".old")


def _resume_source(rdir: Path) -> Path | None:
    """The newest complete resume state among ``_resume_dirs`` (complete: its meta.json, written
    last, parses), or None. A run killed while saving leaves the previous state usable."""
    best, best_step = None, -1
    for d in _resume_dirs(rdir):
        try:
            step = int(json.loads((d / "meta.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            continue
        if step > best_step:
            best, best_step = d, step
    return best


def _save_resume(rdir: Path, model, optimizer, batches, step, s, rank, world, fsdp: bool) -> None:
    """Write the resume state into ``resume.tmp``, then swap it for ``resume``: a process killed
    at any point leaves one complete state (``_resume_source``), never a torn file."""
    _, tmp, old = _resume_dirs(rdir)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    if fsdp:  # sharded: every process writes its shards (torch.distributed.checkpoint)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(
            model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    elif rank == 0:
        torch.save(
            {
                "model": {k: v.cpu() for k, v in _trained_state(model).items()},
                "optim": optimizer.state_dict(),
            },
            tmp / "state.pt",
        )
    torch.save(_rng_state(), tmp / f"rng_{rank}.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        meta = {"step": step, "data": batches.state(), "stage": s.to_dict(), "world": world}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: a torn one
        # does not parse, so ``_resume_source`` passes this directory over
        shutil.rmtree(old, ignore_errors=True)
        if rdir.exists():
            rdir.replace(old)
        tmp.replace(rdir)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def _load_resume(rdir: Path, model, optimizer, batches, rank, fsdp: bool) -> int:
    meta = json.loads((rdir / "meta.json").read_text())
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        opts = StateDictOptions(ignore_frozen_params=True)
        msd, osd = get_state_dict(model, optimizer, options=opts)  # (creates optimizer state)
        # parameters that never had a gradient have no optimizer state in the checkpoint
        saved = dcp.FileSystemReader(str(rdir / "dcp")).read_metadata().state_dict_metadata
        osd["state"] = {k: v for k, v in osd["state"].items() if f"optim.state.{k}.step" in saved}
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(rdir / "dcp"))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        # (strict=False: the zero states made above for never-updated parameters are dropped)
    else:
        st = torch.load(rdir / "state.pt", weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in st["model"].items():
                params[k].copy_(v)
        optimizer.load_state_dict(st["optim"])
    rng = rdir / f"rng_{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    batches.load_state(meta["data"])
    return int(meta["step"])


def _full_state(
    model: nn.Module, world: int, fsdp: bool, lora_scale: float
) -> dict[str, torch.Tensor]:
    """Every tensor of the model under checkpoint names, LoRA merged, on the CPU (collective
    under FSDP: every process must call it)."""
    if world > 1 and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return merge_lora(sd, lora_scale)
