"""Dense vision pretraining: task "vision" of ``omnistream train``.

The Thinker's answer gives the vision encoder one or two informative tokens per image, and that
is too little to learn *which* shape a patch shows: on omni-mini's stage-2 encoder a linear probe
reads each image token's colour (97%) but hardly its shape kind (49% against 41% for the most
common kind), so "What color is the circle?" and "Which shape is red?" stay near chance. Here
the encoder (``thinker.visual.*``, merger included) learns from every output token instead:
small training-only heads (not saved in the checkpoint) read, from each merged token, the kind
and colour of the shape covering it and whether it holds a shape's centre, the ground truth
that the task generator drew (``train/tasks_media.render_image``).

Data: ``python -m omnistream.train.vision make OUT --n N --seed S`` renders N images of the
omni-mini image families (``train/tasks.py``, seeded like the task data) into ``OUT/images`` and
writes ``OUT/vision.jsonl`` (one record per image: its path and its shapes). Output: the source
checkpoint with the trained ``thinker.visual.*`` (released layout), ``train_log.jsonl`` and
``resume.pt`` (every ``save_every`` steps / ``save_every_s`` seconds, and at the end)::

    omnistream train --config configs/train/mini_vision.json --data OUT/vision.jsonl \\
        --model DIR --out DIR2 [--eval-data HELD/vision.jsonl]
    python -m omnistream.train.vision eval DIR2 HELD/vision.jsonl   # the heads' accuracy
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.train.loop import LOG_FILE, lr_at
from omnistream.train.stages import Stage

RESUME_FILE = "resume.pt"
KINDS = ("circle", "square", "triangle")  # label 0: no shape
COLORS = ("red", "green", "blue", "yellow")
MIN_COVER = 0.15  # a token shows a shape when the shape covers this much of its pixels
TARGETS = (("kind", len(KINDS) + 1), ("color", len(COLORS) + 1), ("centre", 2))
IMAGE_FAMILIES = ("image-count", "image-count-color", "image-color", "image-shape")


# ------------------------------------------------------------------------------------ targets


def token_targets(meta: dict, grid_h: int, grid_w: int, merge: int = 2,
                  patch: int = 14) -> Tensor:
    """Per merged token of an image (raster order, as the vision encoder outputs them) the
    ground truth [N, 3]: kind (0 none, 1 + KINDS index), colour (0 none, 1 + COLORS index) of
    the shape covering most of the token (at least MIN_COVER of it), and 1 where the token holds
    a shape's centre. ``meta``: ``render_image``'s ground truth (original ``size`` and
    ``shapes``); the encoder saw the image resized to ``grid_w * patch`` x ``grid_h * patch``."""
    from PIL import Image, ImageDraw

    from omnistream.train.tasks_media import Shape, draw_shape

    w, h = meta["size"]
    W, H, cell = grid_w * patch, grid_h * patch, merge * patch
    lab = Image.new("L", (w, h), 0)  # drawn at the original size, resized as the image was
    draw = ImageDraw.Draw(lab)
    centres = []
    for k, s in enumerate(meta["shapes"]):
        draw_shape(draw, Shape(s["kind"], s["color"], k + 1, s["x"], s["y"], s["size"]))
        centres.append(((s["x"] + s["size"] / 2) * W / w // cell,
                        (s["y"] + s["size"] / 2) * H / h // cell))
    lab = lab.resize((W, H), Image.NEAREST)
    gy, gx = grid_h // merge, grid_w // merge
    cells = np.asarray(lab).reshape(gy, cell, gx, cell).transpose(0, 2, 1, 3).reshape(gy * gx, -1)
    out = torch.zeros(gy * gx, 3, dtype=torch.long)
    for i, row in enumerate(cells):
        cover = np.bincount(row, minlength=len(meta["shapes"]) + 1)[1:]
        if len(cover) and cover.max() >= MIN_COVER * row.size:
            s = meta["shapes"][int(cover.argmax())]
            out[i, 0] = 1 + KINDS.index(s["kind"])
            out[i, 1] = 1 + COLORS.index(s["color"])
    for cx, cy in centres:
        out[int(min(cy, gy - 1)) * gx + int(min(cx, gx - 1)), 2] = 1
    return out


class VisionHeads(nn.Module):
    """Training-only linear readouts of the merged tokens, one per entry of TARGETS, after a
    LayerNorm: the heads cannot gain from larger tokens, so their scale is the RMS limit's."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in TARGETS})

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:  # [N, D] -> {name: [N, n]}
        x = self.norm(tokens)
        return {name: head(x) for name, head in self.heads.items()}


# --------------------------------------------------------------------------------------- data


def make_vision_data(out_dir: str | Path, n: int, seed: int, progress: bool = True) -> Path:
    """``n`` images of the omni-mini image families (each family in turn; the task generator's
    cases ``case_rng(seed, family, i)``) as PNGs under ``out_dir/images`` and their shapes in
    ``out_dir/vision.jsonl``. The same arguments write the same bytes. Returns the JSONL path."""
    from tqdm import tqdm

    from omnistream.train.tasks import case_rng, make_case

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for j in tqdm(range(n), desc="vision images", disable=not progress, unit="image"):
        family, i = IMAGE_FAMILIES[j % len(IMAGE_FAMILIES)], j // len(IMAGE_FAMILIES)
        case = make_case(family, case_rng(seed, family, i))
        rel = f"images/{j:06d}.png"
        (out / rel).write_bytes(case.media[0].data)
        lines.append(json.dumps({"image": rel, "size": case.meta["size"],
                                 "shapes": case.meta["shapes"], "case": [seed, family, i]}))
    path = out / "vision.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class VisionSet:
    """Records of ``vision.jsonl`` files, featurised on demand as the engine's processor does."""

    def __init__(self, files: list[str | Path], model_dir: str | Path):
        from omnistream.prompt import processor_options

        self.items: list[tuple[Path, dict]] = []
        for f in files:
            base = Path(f).parent
            for line in Path(f).read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.items.append((base / rec["image"], rec))
        if not self.items:
            raise ValueError(f"no vision records in {[str(f) for f in files]}")
        self.opts = processor_options(model_dir)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: list[int], merge: int) -> tuple[Tensor, Tensor, Tensor]:
        """Pixel patches [P, C], grid_thw [n, 3] and targets [N, 3] of records ``idx``."""
        from omnistream.train.data import process_media

        px, grids, tgt = [], [], []
        for i in idx:
            path, rec = self.items[i]
            v = process_media("image", str(path), {"type": "image", "image": str(path)},
                              self.opts)
            grid = torch.as_tensor(v.grid_thw).reshape(3)
            px.append(torch.as_tensor(v.pixel_values))
            grids.append(grid)
            tgt.append(token_targets(rec, int(grid[1]), int(grid[2]), merge))
        return torch.cat(px), torch.stack(grids), torch.cat(tgt)


# ------------------------------------------------------------------------------------ training


def vision_loss(visual: nn.Module, heads: VisionHeads, px: Tensor, grid: Tensor,
                tgt: Tensor, rms_limit: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Sum of the heads' cross entropies over every merged token, and each head's accuracy on
    the tokens that show a shape (kind, colour) or hold a centre (centre).
    ``rms_limit`` > 0 adds ``losses.media_penalty``'s RMS term: the tokens keep the scale the
    Thinker's stages hold them to (``media_rms_limit``), so the LLM reads them as before."""
    from omnistream.nn.thinker import Media
    from omnistream.train.losses import media_penalty

    tokens = visual(px, grid)
    logits = heads(tokens)
    loss, parts = torch.zeros(()), {}
    if rms_limit > 0:
        loss = media_penalty(Media(image_embeds=tokens), rms_limit, 0.0)
        parts["rms"] = tokens.pow(2).mean(-1).sqrt().mean().item()
    for k, (name, _) in enumerate(TARGETS):
        loss = loss + F.cross_entropy(logits[name], tgt[:, k])
        sel = tgt[:, k] > 0  # accuracy where there is something to see (most tokens show none)
        hit = logits[name][sel].argmax(-1) == tgt[sel, k]
        parts[f"acc_{name}"] = hit.float().mean().item() if sel.any() else 0.0
    return loss, parts


@torch.no_grad()
def heads_accuracy(visual: nn.Module, heads: VisionHeads, data: VisionSet, merge: int,
                   batch: int = 16) -> dict[str, float]:
    """Per head: accuracy over all tokens, and over the tokens that show a shape (kind, colour)
    or hold a centre (centre)."""
    hit = {f"{n}{s}": 0.0 for n, _ in TARGETS for s in ("", "_shape")}
    cnt = dict.fromkeys(hit, 0)
    for lo in range(0, len(data), batch):
        px, grid, tgt = data.batch(list(range(lo, min(lo + batch, len(data)))), merge)
        logits = heads(visual(px, grid))
        for k, (name, _) in enumerate(TARGETS):
            ok = logits[name].argmax(-1) == tgt[:, k]
            sel = tgt[:, k] > 0
            hit[name] += ok.sum().item()
            cnt[name] += ok.numel()
            hit[name + "_shape"] += ok[sel].sum().item()
            cnt[name + "_shape"] += int(sel.sum())
    return {k: hit[k] / max(cnt[k], 1) for k in hit}


def train_vision(stage: Stage, data: list[str | Path], model_dir: str | Path,
                 out_dir: str | Path, eval_data: list[str | Path] | None = None,
                 stop_at: int | None = None, resume: bool = True,
                 verbose: bool = True) -> dict[str, Any]:
    """Run a "vision" stage (module docstring). Trains ``thinker.visual.*`` and the heads."""
    from omnistream.train.model import load_model, save_released

    s = stage
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model = load_model(model_dir, with_talker=False)
    visual = model.thinker.visual.train()
    merge = model.cfg.thinker_config.vision_config.spatial_merge_size
    heads = VisionHeads(model.cfg.thinker_config.vision_config.out_hidden_size)
    dataset = VisionSet(data, model_dir)
    held = VisionSet(eval_data, model_dir) if eval_data else None
    params = [*visual.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    step, rng = 0, random.Random(s.seed)
    order: list[int] = []
    rpath = out / RESUME_FILE
    if resume and rpath.exists():
        st = torch.load(rpath, weights_only=False)
        visual.load_state_dict(st["visual"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["optimizer"])
        step, rng, order = st["step"], st["rng"], st["order"]
        if verbose:
            print(f"resumed {s.name} at step {step}")
    (out / "train_stage.json").write_text(json.dumps(s.to_dict(), indent=2) + "\n")
    log_f = (out / LOG_FILE).open("a")
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=s.max_steps, initial=step, desc=s.name, unit="step")

    def save() -> None:
        trained = {f"thinker.visual.{k}": v for k, v in visual.state_dict().items()}
        save_released(out, model_dir, trained)
        state = {"visual": visual.state_dict(), "heads": heads.state_dict(),
                 "optimizer": opt.state_dict(), "step": step, "rng": rng, "order": order,
                 "stage": s.to_dict()}
        torch.save(state, rpath.with_suffix(".tmp"))
        rpath.with_suffix(".tmp").replace(rpath)

    last_save = time.monotonic()
    end = s.max_steps if stop_at is None else min(s.max_steps, stop_at)
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, s)
        for g in opt.param_groups:
            g["lr"] = lr
        if len(order) < s.batch_size:  # epochs in a seeded random order
            perm = list(range(len(dataset)))
            rng.shuffle(perm)
            order = order + perm
        idx, order = order[: s.batch_size], order[s.batch_size :]
        loss, parts = vision_loss(visual, heads, *dataset.batch(idx, merge), s.media_rms_limit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        if step % max(1, s.log_every) == 0:
            rec = {"step": step, "of": s.max_steps, "loss": loss.item(), "lr": lr, **parts,
                   "step_s": time.perf_counter() - t0}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        due = s.save_every and step % s.save_every == 0
        if due or time.monotonic() - last_save > s.save_every_s or step == end:
            save()
            last_save = time.monotonic()
    if bar is not None:
        bar.close()
    result: dict[str, Any] = {"out": str(out), "step": step}
    if held is not None and step >= s.max_steps:
        visual.eval()
        result["held_out"] = heads_accuracy(visual, heads, held, merge)
        log_f.write(json.dumps({"event": "held_out", "step": step, **result["held_out"]}) + "\n")
    log_f.close()
    if step >= end and not rpath.exists():
        save()
    return result


def evaluate_vision(model_dir: str | Path, data: list[str | Path]) -> dict[str, float]:
    """The trained heads (``model_dir/resume.pt``) on the checkpoint's encoder over ``data``."""
    from omnistream.train.model import load_model

    model = load_model(model_dir, with_talker=False)
    vcfg = model.cfg.thinker_config.vision_config
    heads = VisionHeads(vcfg.out_hidden_size)
    heads.load_state_dict(torch.load(Path(model_dir) / RESUME_FILE, weights_only=False)["heads"])
    return heads_accuracy(model.thinker.visual.eval(), heads, VisionSet(data, model_dir),
                          vcfg.spatial_merge_size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m omnistream.train.vision",
                                description="Dense vision pretraining data and evaluation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="render images with their shapes (vision.jsonl)")
    mk.add_argument("out", type=Path)
    mk.add_argument("--n", type=int, default=4000)
    mk.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="the heads' accuracy on held-out images")
    ev.add_argument("model", type=Path)
    ev.add_argument("data", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "make":
        print(make_vision_data(a.out, a.n, a.seed))
    else:
        for k, v in evaluate_vision(a.model, a.data).items():
            print(f"{k:14s} {v:.3f}")


if __name__ == "__main__":
    main()
