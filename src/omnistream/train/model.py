"""The model being trained: Thinker (+ Talker) under the checkpoint's own prefixes.

``OmniTrain.state_dict()`` keys are the released tensor names (``thinker.*``, ``talker.*``), so a
checkpoint is loaded by reading the safetensors files and saved by writing them back: the
token2wav tensors (never trained here) and every tensor of a component that was not loaded are
copied from the source checkpoint, so the output directory is a complete release-layout model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from omnistream import checkpoint
from omnistream.config import OmniConfig
from omnistream.models import RANDOM_WEIGHTS_MARKER
from omnistream.nn.talker import Talker
from omnistream.nn.thinker import Thinker


class OmniTrain(nn.Module):
    """Container whose parameter names equal the checkpoint's (``thinker.``/``talker.``)."""

    def __init__(self, cfg: OmniConfig, with_talker: bool):
        super().__init__()
        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker_config)
        if with_talker:
            self.talker = Talker(cfg.talker_config)
        else:
            self.talker = None


# -- reading / writing the released layout ------------------------------------------------------


def read_tensors(
    model_dir: str | Path, prefixes: tuple[str, ...] | None = None
) -> dict[str, Tensor]:
    """All tensors of a checkpoint (optionally only names starting with one of ``prefixes``),
    as copies: training must not hold views of files it may later overwrite."""
    return {k: v.clone() for k, v in checkpoint.read_tensors(model_dir)
            if prefixes is None or k.startswith(prefixes)}


def load_model(model_dir: str | Path, with_talker: bool, dtype=torch.float32) -> OmniTrain:
    """Build ``OmniTrain`` from a release-layout directory (weights cast to ``dtype``)."""
    cfg = OmniConfig.from_file(Path(model_dir) / "config.json")
    model = OmniTrain(cfg, with_talker)
    names = set(model.state_dict())
    prefixes = ("thinker.", "talker.") if with_talker else ("thinker.",)
    sd = {k: v.to(dtype) for k, v in read_tensors(model_dir, prefixes).items() if k in names}
    for alias, target in tied_aliases(model).items():  # a tied head is stored once
        if alias not in sd and target in sd:
            sd[alias] = sd[target]
    missing = names - set(sd)
    if missing:
        raise KeyError(
            f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )
    model.load_state_dict(sd, strict=True)
    return model.to(dtype)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` of parameters shared under several names (e.g. a tied output head,
    ``thinker.lm_head.weight`` -> ``thinker.model.embed_tokens.weight``)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[n] = first[id(p)]
        else:
            first[id(p)] = n
    return out


# a training run's own record (its log, its stage, a dense or codec stage's resume state): never
# part of a checkpoint made from that run's output
TRAINING_RECORDS = ("train_log.jsonl", "train_stage.json", "resume.pt")


def side_files(src_dir: str | Path) -> list[Path]:
    """A checkpoint's files to carry into one made from it: config, tokenizer, processor,
    spk_dict ...; not its weights, its random-weights marker, training records or a write that
    a kill left unfinished (``*.tmp``)."""
    return [f for f in Path(src_dir).iterdir()
            if f.is_file()
            and not f.name.endswith((".safetensors", ".index.json", ".jsonl", ".tmp"))
            and f.name not in (RANDOM_WEIGHTS_MARKER, *TRAINING_RECORDS)]


def save_released(out_dir: str | Path, src_dir: str | Path, trained: dict[str, Tensor]) -> Path:
    """Write a complete release-layout checkpoint to ``out_dir``: the source's non-weight files
    (config, tokenizer, processor, spk_dict ...) and one ``model.safetensors`` holding the source
    tensors with ``trained`` (checkpoint names, LoRA already merged) written over them, each in the
    source tensor's dtype. The source's random-weights marker is not copied: trained weights are
    not make-tiny's noise."""
    out, src = Path(out_dir), Path(src_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in side_files(src):
        shutil.copy2(f, out / f.name)
    (out / RANDOM_WEIGHTS_MARKER).unlink(missing_ok=True)
    tensors = read_tensors(src)
    for k, v in trained.items():
        if k not in tensors:
            if any(j in tensors and w.data_ptr() == v.data_ptr() for j, w in trained.items()):
                continue  # a tied alias of a stored tensor (stored once, as in the source)
            raise KeyError(f"trained tensor {k} is not in the source checkpoint")
        tensors[k] = v.detach().to("cpu", tensors[k].dtype).contiguous()
    write_whole(out / "model.safetensors",
                lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return out


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: a process killed while writing leaves the
    previous file (or none), never half of one. (``side_files`` never carries a ``*.tmp``.)"""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def write_lines(path: Path, lines: list[str]) -> None:
    """``lines`` (JSONL records, ...) as a UTF-8 text file, one per line, ``write_whole``."""
    write_whole(path, lambda p: p.write_text("".join(line + "\n" for line in lines),
                                             encoding="utf-8"))


def save_whole(obj: object, path: Path) -> None:
    """``torch.save`` whole or not at all (``write_whole``)."""
    write_whole(path, lambda p: torch.save(obj, p))
