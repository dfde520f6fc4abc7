"""Dense encoder pretraining: tasks "vision" and "hearing" of ``omnistream train``.

The Thinker's answer gives an encoder one or two informative tokens per input, too little to
learn what each part of the input shows. On omni-mini's stage-2 vision encoder a linear probe
reads each image token's colour (97%) but hardly its shape kind (49% against 41% for the most
common kind), so "What color is the circle?" and "Which shape is red?" stay near chance; its
audio encoder, likewise, hears a spoken question's template but not its words. Here an encoder
learns from every output token instead, through small training-only heads (not saved in the
checkpoint) that read ground truth the task generator knows:

* ``vision`` (``thinker.visual.*``, merger included): per merged image token the kind and colour
  of the shape covering it and whether it holds a shape's centre (``render_image``'s shapes);
  and per merged token of a ``video-motion`` clip that shows the shape the way it moves. The
  LLM could not learn the motion from the answer alone (omni-mini v1 answered 1 of 10 of its
  own training clips right, below chance); a token sees it, since its two frames (temporal
  patch 2) show where the shape's edges were and where they went.
* ``hearing`` (``thinker.audio_tower.*``): the words of a spoken utterance, by CTC over the
  audio tokens (25 per second) with the tasks' word list (``HEARING_WORDS``), as an ASR-trained
  encoder (the release's) hears them.

Both keep the tokens' RMS near ``media_rms_limit`` (the scale the Thinker stages hold them to).
Data (seeded like the task data)::

    python -m omnistream.train.dense vision OUT --n N --seed S   # OUT/images, OUT/vision.jsonl
    python -m omnistream.train.dense hearing OUT --n N --seed S  # OUT/audio, OUT/hearing.jsonl

Output: the source checkpoint with the trained encoder (released layout), ``train_log.jsonl``,
``resume.pt`` (every ``save_every`` steps / ``save_every_s`` seconds, and at the end)::

    omnistream train --config configs/train/mini_vision.json --data OUT/vision.jsonl \\
        --model DIR --out DIR2 [--eval-data HELD/vision.jsonl]
    python -m omnistream.train.dense eval DIR2 HELD/vision.jsonl   # the heads on held-out data
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.train.loop import RESUME_FILE, StepBook, adamw, lr_at, mark_done
from omnistream.train.model import save_whole, write_lines
from omnistream.train.stages import Stage

KINDS = ("circle", "square", "triangle")  # label 0: no shape
COLORS = ("red", "green", "blue", "yellow")
MIN_COVER = 0.15  # a token shows a shape when the shape covers this much of its pixels
MOTIONS = ("left", "right", "up", "down")  # labels 1-4 (as the other heads: 0 unused)
TARGETS = (("kind", len(KINDS) + 1), ("color", len(COLORS) + 1), ("centre", 2),
           ("motion", len(MOTIONS) + 1))
MOTION_DIFF = 0.5  # normalised pixel units (about 35 of 255) from the background: the shape
MOTION_COVER = 0.05  # a merged token shows the moving shape when this much of it is the shape
IGNORE = -100  # no ground truth for this head on this token (cross_entropy's ignore_index)
IMAGE_FAMILIES = ("image-count", "image-count-color", "image-color", "image-shape")
VISION_FAMILIES = (*IMAGE_FAMILIES, "video-motion")  # make_vision_data's cycle
DATA_FILES = {"vision": "vision.jsonl", "hearing": "hearing.jsonl"}


def _hearing_words() -> tuple[str, ...]:
    from omnistream.train.sentences import COLORS as COLOR_WORDS
    from omnistream.train.sentences import NUMBERS, SHAPES
    from omnistream.train.tasks import REPEAT_VOCABULARY

    questions = "how many shapes are there what color is the which shape what is plus minus"
    return tuple(sorted({w.lower() for w in REPEAT_VOCABULARY} | set(questions.split())
                        | set(NUMBERS) | set(COLOR_WORDS) | set(SHAPES)))


def words_of(text: str) -> list[str]:
    """Lower-case words of ``text`` (punctuation dropped), as the hearing stage counts them."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


# ------------------------------------------------------------------------------------ targets


def token_targets(meta: dict, grid_h: int, grid_w: int, merge: int = 2,
                  patch: int = 14) -> Tensor:
    """Per merged token of an image (raster order, as the vision encoder outputs them) the
    ground truth [N, 4]: kind (0 none, 1 + KINDS index), colour (0 none, 1 + COLORS index) of
    the shape covering most of the token (at least MIN_COVER of it), 1 where the token holds
    a shape's centre, and no motion ground truth (``video_targets``). ``meta``:
    ``render_image``'s ground truth (original ``size`` and ``shapes``); the encoder saw the
    image resized to ``grid_w * patch`` x ``grid_h * patch``."""
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
    out = torch.zeros(gy * gx, len(TARGETS), dtype=torch.long)
    out[:, 3] = IGNORE
    for i, row in enumerate(cells):
        cover = np.bincount(row, minlength=len(meta["shapes"]) + 1)[1:]
        if len(cover) and cover.max() >= MIN_COVER * row.size:
            s = meta["shapes"][int(cover.argmax())]
            out[i, 0] = 1 + KINDS.index(s["kind"])
            out[i, 1] = 1 + COLORS.index(s["color"])
    for cx, cy in centres:
        out[int(min(cy, gy - 1)) * gx + int(min(cx, gx - 1)), 2] = 1
    return out


def video_targets(px: Tensor, rec: dict, merge: int = 2, patch: int = 14) -> Tensor:
    """[N, 4] for a ``video-motion`` clip's pixel patches ``px`` [merge² N, C * 2 * patch²]
    (the processor's order: each merged token's patches together, each patch's frame pair):
    its direction (1 + MOTIONS index) on the merged tokens whose pixels show the shape in
    either frame (at least MOTION_COVER of them away from the background, the clip's median
    colour); no ground truth elsewhere (the background shows no motion, and a still class
    would outweigh the few moving tokens) nor for the image heads."""
    x = px.reshape(px.shape[0] // merge**2, merge**2, 3, -1, patch * patch)  # [N, m², C, T, p²]
    bg = x.transpose(0, 2).reshape(3, -1).median(-1).values  # [C]
    away = (x - bg[:, None, None]).abs().amax(2) > MOTION_DIFF  # [N, m², T, p²]
    shows = away.float().flatten(1).mean(1) >= MOTION_COVER  # [N]
    out = torch.full((x.shape[0], len(TARGETS)), IGNORE, dtype=torch.long)
    out[shows, 3] = 1 + MOTIONS.index(rec["motion"])
    return out


class Heads(nn.Module):
    """Training-only linear readouts ``{name: n_classes}`` of an encoder's tokens, after a
    LayerNorm: the heads cannot gain from larger tokens, so their scale is the RMS limit's."""

    def __init__(self, dim: int, outputs: dict[str, int]):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in outputs.items()})

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:  # [N, D] -> {name: [N, n]}
        x = self.norm(tokens)
        return {name: head(x) for name, head in self.heads.items()}


# --------------------------------------------------------------------------------------- data


def make_vision_data(out_dir: str | Path, n: int, seed: int, progress: bool = True) -> Path:
    """``n`` items of VISION_FAMILIES in turn (the task generator's cases ``case_rng(seed,
    family, i)``): images as PNGs under ``out_dir/images`` with their shapes, ``video-motion``
    clips under ``out_dir/videos`` with their direction, listed in ``out_dir/vision.jsonl``.
    The same arguments write the same bytes. Returns the JSONL path."""
    from omnistream.train.tasks import case_rng, make_case

    def one(j: int) -> tuple[str, bytes, dict]:
        family, i = VISION_FAMILIES[j % len(VISION_FAMILIES)], j // len(VISION_FAMILIES)
        case = make_case(family, case_rng(seed, family, i))
        if family == "video-motion":
            return (f"videos/{j:06d}.mp4", case.media[0].data,
                    {"motion": case.meta["direction"], "case": [seed, family, i]})
        return (f"images/{j:06d}.png", case.media[0].data,
                {"size": case.meta["size"], "shapes": case.meta["shapes"],
                 "case": [seed, family, i]})

    return _write_data(Path(out_dir), "vision", n, one, progress)


def make_hearing_data(out_dir: str | Path, n: int, seed: int, progress: bool = True) -> Path:
    """``n`` spoken utterances, the task generator's ``spoken-repeat`` cases (a random voice,
    speed, silence and noise reading a word list or a family's question), as WAVs under
    ``out_dir/audio`` and their text in ``out_dir/hearing.jsonl``. Returns the JSONL path."""
    from omnistream.train.tasks import case_rng, make_case

    def one(i: int) -> tuple[str, bytes, dict]:
        case = make_case("spoken-repeat", case_rng(seed, "spoken-repeat", i))
        return (f"audio/{i:06d}.wav", case.media[0].data,
                {"text": case.meta["text"], "case": [seed, "spoken-repeat", i]})

    return _write_data(Path(out_dir), "hearing", n, one, progress)


def _write_data(out: Path, task: str, n: int, one: Callable[[int], tuple[str, bytes, dict]],
                progress: bool) -> Path:
    from tqdm import tqdm

    lines = []
    for j in tqdm(range(n), desc=f"{task} data", disable=not progress, unit="item"):
        rel, data, rec = one(j)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        lines.append(json.dumps({"media": rel, **rec}))
    path = out / DATA_FILES[task]  # whole or not at all: `make mini` takes it as the step's mark
    write_lines(path, lines)
    return path


class DenseSet:
    """Records of ``vision.jsonl`` / ``hearing.jsonl`` files, featurised on demand as the
    engine's processor does; ``batch`` gives one model call's inputs and targets."""

    def __init__(self, task: str, files: list[str | Path], model_dir: str | Path):
        from omnistream.prompt import processor_options

        self.task = task
        need = ("shapes", "motion") if task == "vision" else ("text",)
        self.items: list[tuple[Path, dict]] = []
        for f in files:
            base = Path(f).parent
            for k, line in enumerate(Path(f).read_text().splitlines()):
                if line.strip():
                    rec = json.loads(line)
                    if "media" not in rec or not any(n in rec for n in need):
                        raise ValueError(f"{f}:{k + 1}: a {task} record needs 'media' and "
                                         f"{' or '.join(map(repr, need))} (python -m "
                                         f"omnistream.train.dense {task})")
                    self.items.append((base / rec["media"], rec))
        if not self.items:
            raise ValueError(f"no records in {[str(f) for f in files]}")
        self.opts = processor_options(model_dir)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: list[int], merge: int = 2) -> tuple:
        """Vision records: pixel patches [P, C], grid_thw [n, 3], targets [N, 4] (``merge``:
        the encoder's spatial merge). Hearing records: mel features [128, sum(frames)], frames
        per clip [n], texts."""
        from omnistream.train.data import process_media

        if self.task == "hearing":
            feats = [process_media("audio", str(p), {"type": "audio", "audio": str(p)}, self.opts)
                     for p, _ in (self.items[i] for i in idx)]
            return (torch.cat([f.features for f in feats], 1),
                    torch.tensor([int(f.feature_len) for f in feats]),
                    [self.items[i][1]["text"] for i in idx])
        px, grids, tgt = [], [], []
        for i in idx:
            path, rec = self.items[i]
            kind = "video" if "motion" in rec else "image"
            v = process_media(kind, str(path), {"type": kind, kind: str(path)}, self.opts)
            grid = torch.as_tensor(v.grid_thw).reshape(3)
            px.append(torch.as_tensor(v.pixel_values))
            grids.append(grid)
            if kind == "video":
                tgt.append(video_targets(torch.as_tensor(v.pixel_values), rec, merge))
            else:
                tgt.append(token_targets(rec, int(grid[1]), int(grid[2]), merge))
        return torch.cat(px), torch.stack(grids), torch.cat(tgt)


# ------------------------------------------------------------------------------------- losses


def _rms_term(tokens: Tensor, rms_limit: float, parts: dict[str, float]) -> Tensor:
    """``losses.media_penalty``'s RMS term (0 when ``rms_limit`` is 0); logs the mean RMS. The
    term is the same for every kind of token, so the tokens go in as any one kind."""
    from omnistream.nn.thinker import Media
    from omnistream.train.losses import media_penalty

    if rms_limit <= 0:
        return tokens.new_zeros(())
    parts["rms"] = tokens.detach().pow(2).mean(-1).sqrt().mean().item()
    return media_penalty(Media(image_embeds=tokens), rms_limit, 0.0)


def vision_loss(visual: nn.Module, heads: Heads, px: Tensor, grid: Tensor, tgt: Tensor,
                rms_limit: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Sum of the heads' cross entropies over every merged token that has their ground truth
    (+ the RMS term), and each head's accuracy on the tokens that show a shape (kind, colour),
    hold a centre or move."""
    tokens = visual(px, grid)
    logits = heads(tokens)
    parts: dict[str, float] = {}
    loss = _rms_term(tokens, rms_limit, parts)
    for k, (name, _) in enumerate(TARGETS):
        if (tgt[:, k] != IGNORE).any():  # a batch of images only has no motion, and vice versa
            loss = loss + F.cross_entropy(logits[name], tgt[:, k], ignore_index=IGNORE)
        sel = tgt[:, k] > 0  # accuracy where there is something to see (most tokens show none)
        hit = logits[name][sel].argmax(-1) == tgt[sel, k]
        parts[f"acc_{name}"] = hit.float().mean().item() if sel.any() else 0.0
    return loss, parts


def hearing_loss(tower: nn.Module, heads: Heads, feats: Tensor, lens: Tensor, texts: list[str],
                 rms_limit: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """CTC of each clip's words (``HEARING_WORDS`` + 1, blank 0) over its audio tokens, per
    word (+ the RMS term), and the greedy decoding's word accuracy (1 - word error rate)."""
    tokens, n_tok = tower(feats, lens)  # [sum(n_tok), D]
    logp = heads(tokens)["words"].log_softmax(-1)
    index = {w: i + 1 for i, w in enumerate(HEARING_WORDS)}
    targets = [torch.tensor([index.get(w, len(index) + 1) for w in words_of(t)]) for t in texts]
    rows = logp.split(n_tok.tolist())
    padded = nn.utils.rnn.pad_sequence(list(rows))  # [T, B, V]
    parts: dict[str, float] = {}
    loss = _rms_term(tokens, rms_limit, parts) + F.ctc_loss(
        padded, torch.cat(targets), n_tok, torch.tensor([len(t) for t in targets]),
        reduction="sum", zero_infinity=True) / max(sum(len(t) for t in targets), 1)
    edits = words = 0
    for r, t in zip(rows, texts, strict=True):
        e, n = _word_errors(t, greedy_words(r))
        edits, words = edits + e, words + n
    parts["acc_words"] = 1.0 - edits / max(words, 1)
    return loss, parts


def _word_errors(text: str, heard: list[str]) -> tuple[int, int]:
    """(word edits, words) of ``heard`` against ``text``, as the recognizer's WER counts them."""
    from omnistream.eval.recognizer import word_errors

    return word_errors(text, " ".join(heard))


def greedy_words(logp: Tensor) -> list[str]:
    """Best-path CTC decoding of one clip's [T, V] scores into words."""
    ids = logp.argmax(-1).tolist()
    out, prev = [], 0
    for i in ids:
        if i != prev and 0 < i <= len(HEARING_WORDS):
            out.append(HEARING_WORDS[i - 1])
        prev = i
    return out


HEARING_WORDS = _hearing_words()


# ----------------------------------------------------------------------------------- training


def _setup(task: str, model) -> tuple[nn.Module, Heads, int]:
    """The encoder a task trains, its heads, and the vision encoder's spatial merge (what
    ``DenseSet.batch`` needs for the vision targets)."""
    tc = model.cfg.thinker_config
    if task == "vision":
        merge = tc.vision_config.spatial_merge_size
        heads = Heads(tc.vision_config.out_hidden_size, dict(TARGETS))
        return model.thinker.visual, heads, merge
    heads = Heads(tc.audio_config.output_dim, {"words": len(HEARING_WORDS) + 2})
    return model.thinker.audio_tower, heads, 2


def _loss(task: str, encoder: nn.Module, heads: Heads, batch: tuple,
          rms_limit: float) -> tuple[Tensor, dict[str, float]]:
    fn = vision_loss if task == "vision" else hearing_loss
    return fn(encoder, heads, *batch, rms_limit)


def train_dense(stage: Stage, data: list[str | Path], model_dir: str | Path,
                out_dir: str | Path, eval_data: list[str | Path] | None = None,
                stop_at: int | None = None, resume: bool = True,
                verbose: bool = True) -> dict[str, Any]:
    """Run a "vision" or "hearing" stage (module docstring): trains the encoder and its heads;
    with ``eval_data``, the heads' scores on it at the end (``evaluate_heads``)."""
    from omnistream.train.model import load_model, save_released

    s = stage
    prefix = "thinker.visual." if s.task == "vision" else "thinker.audio_tower."
    if s.trainable != [prefix + "*"] or s.frozen or s.lora is not None:
        raise ValueError(f"a {s.task} stage trains {prefix}* (trainable [\"{prefix}*\"], no "
                         f"frozen, no lora), not {s.trainable}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model = load_model(model_dir, with_talker=False)
    encoder, heads, merge = _setup(s.task, model)
    encoder.train()
    dataset = DenseSet(s.task, data, model_dir)
    params = [*encoder.parameters(), *heads.parameters()]
    opt = adamw(params, s, weight_decay=s.weight_decay)
    step, rng = 0, random.Random(s.seed)
    order: list[int] = []
    rpath = out / RESUME_FILE
    if resume and rpath.exists():
        st = torch.load(rpath, weights_only=False)
        encoder.load_state_dict(st["encoder"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["optimizer"])
        step, rng, order = st["step"], st["rng"], st["order"]
        if verbose:
            print(f"resumed {s.name} at step {step}")
    def save() -> None:
        save_released(out, model_dir, {prefix + k: v for k, v in encoder.state_dict().items()})
        state = {"encoder": encoder.state_dict(), "heads": heads.state_dict(),
                 "optimizer": opt.state_dict(), "step": step, "rng": rng, "order": order,
                 "task": s.task, "stage": s.to_dict()}
        save_whole(state, rpath)

    end = s.max_steps if stop_at is None else min(s.max_steps, stop_at)
    book = StepBook(out, s, step, end, save, verbose)
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
        loss, parts = _loss(s.task, encoder, heads, dataset.batch(idx, merge), s.media_rms_limit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        book.stepped({"step": step, "of": s.max_steps, "loss": loss.item(), "lr": lr, **parts,
                      "step_s": time.perf_counter() - t0})
    result: dict[str, Any] = {"out": str(out), "step": step}
    if eval_data and step >= s.max_steps:
        held = DenseSet(s.task, eval_data, model_dir)
        result["held_out"] = evaluate_heads(s.task, encoder, heads, held, merge)
        book.log({"event": "held_out", "step": step, **result["held_out"]})
    book.close()
    if step >= end and not rpath.exists():
        save()
    if step >= s.max_steps:
        mark_done(out, s)
    return result


@torch.no_grad()
def evaluate_heads(task: str, encoder: nn.Module, heads: Heads, data: DenseSet, merge: int,
                   batch: int = 16) -> dict[str, float]:
    """Vision: per head, accuracy over all tokens with its ground truth and over those that
    show a shape (kind, colour), hold a centre (``centre_shape``) or move (``motion_shape``).
    Hearing: the greedy decoding's word error rate."""
    was = encoder.training
    encoder.eval()
    hit: dict[str, float] = {}
    cnt: dict[str, int] = {}
    for lo in range(0, len(data), batch):
        b = data.batch(list(range(lo, min(lo + batch, len(data)))), merge)
        if task == "hearing":
            tokens, n_tok = encoder(b[0], b[1])
            for r, t in zip(heads(tokens)["words"].split(n_tok.tolist()), b[2], strict=True):
                e, n = _word_errors(t, greedy_words(r))
                hit["wer"] = hit.get("wer", 0.0) + e
                cnt["wer"] = cnt.get("wer", 0) + n
            continue
        logits = heads(encoder(b[0], b[1]))
        for k, (name, _) in enumerate(TARGETS):
            has = b[2][:, k] != IGNORE
            ok = logits[name][has].argmax(-1) == b[2][has, k]
            sel = b[2][has, k] > 0
            for key, v in ((name, ok), (name + "_shape", ok[sel])):
                hit[key] = hit.get(key, 0.0) + v.sum().item()
                cnt[key] = cnt.get(key, 0) + v.numel()
    encoder.train(was)
    return {k: hit[k] / max(cnt[k], 1) for k in hit}


def evaluate_dense(model_dir: str | Path, data: list[str | Path]) -> dict[str, float]:
    """A dense stage's output (``model_dir``: its checkpoint, and its heads in ``resume.pt``)
    scored on held-out ``data``."""
    from omnistream.train.model import load_model

    st = torch.load(Path(model_dir) / RESUME_FILE, weights_only=False)
    model = load_model(model_dir, with_talker=False)
    encoder, heads, merge = _setup(st["task"], model)
    heads.load_state_dict(st["heads"])
    return evaluate_heads(st["task"], encoder, heads, DenseSet(st["task"], data, model_dir),
                          merge)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m omnistream.train.dense",
                                description="Dense encoder pretraining: data and evaluation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("vision", "images with their shapes, clips with their motion "
                                  "(vision.jsonl)"),
                       ("hearing", "spoken utterances with their text (hearing.jsonl)")):
        mk = sub.add_parser(name, help=what)
        mk.add_argument("out", type=Path)
        mk.add_argument("--n", type=int, default=4000)
        mk.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="a dense stage's heads on held-out data")
    ev.add_argument("model", type=Path)
    ev.add_argument("data", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "eval":
        for k, v in evaluate_dense(a.model, a.data).items():
            print(f"{k:14s} {v:.3f}")
    else:
        make = make_vision_data if a.cmd == "vision" else make_hearing_data
        print(make(a.out, a.n, a.seed))


if __name__ == "__main__":
    main()
