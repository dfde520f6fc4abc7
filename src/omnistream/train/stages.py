"""Training stages as declarative configs (``configs/train/*.json``).

A stage says *what* is trained (``task`` + which parameters), on which sequence lengths, and with
which optimisation settings. The loop reads nothing else. Parameter selection is by glob patterns
over checkpoint names (``thinker.audio_tower.*``); ``trainable`` is applied first, then ``frozen``
removes names from it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

TASKS = ("thinker", "talker", "talker_dpo", "vocoder", "codec", "codec_dit", "codec_encoder",
         "vision", "hearing")
# speech codec stages (``train/codec.py``)
CODEC_TASKS = ("vocoder", "codec", "codec_dit", "codec_encoder")
# dense encoder pretraining (``train/dense.py``)
DENSE_TASKS = ("vision", "hearing")


@dataclass
class LoRAOptions:
    r: int = 8  # rank
    alpha: float = 16.0  # scale = alpha / r
    modules: list[str] = field(default_factory=lambda: ["thinker.model"])  # where to apply
    targets: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


@dataclass
class Stage:
    name: str = "full"
    task: str = "thinker"  # one of TASKS
    trainable: list[str] = field(default_factory=lambda: ["thinker.*"])  # glob over param names
    frozen: list[str] = field(default_factory=list)  # removed from trainable
    talker_last_layers: int = 0  # > 0: add the talker's last N layers + norm + codec_head
    lora: LoRAOptions | None = None  # set: train only the LoRA factors of lora.modules
    # data
    max_len: int = 2048  # longer records are dropped (reported), never truncated
    batch_size: int = 4  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    length_group: int = 32  # sort each window of batch_size * this many examples by length
    # optimisation
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    max_steps: int = 1000
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = off
    # glob over param names -> multiplier of the stage's lr (first match wins): e.g. a vision
    # tower that would forget its colours at the LLM's rate learns at a tenth of it
    lr_scale: dict[str, float] = field(default_factory=dict)
    dtype: str = "float32"  # autocast dtype: "float32" (off) | "bfloat16"
    # thinker, encoders trained from scratch (``losses.media_penalty``; 0 = off): each
    # audio/vision output row's RMS is pulled back under the limit, each output dimension's
    # spread over the batch's tokens of each kind up to the floor
    media_rms_limit: float = 0.0
    media_std_floor: float = 0.0
    # talker
    speaker_bos: int = 151872  # thinker-vocab token of the voice (Chelsie)
    dpo_beta: float = 0.1
    # talker: fraction of teacher-forced input codes replaced by other codes of the same reply
    # (``losses.talker_inputs``; a regulariser against leaning on the exact previous codes)
    code_noise: float = 0.0
    # talker: weight of the guided attention loss (``losses.talker_loss``; 0 = off) on records
    # with ``speech_units``, and the layer and head it guides
    guided_attention: float = 0.0
    guided_layer: int = 2
    guided_head: int = 0
    # speech codec stages: training crops of this many mel frames (100 per second)
    segment_frames: int = 192
    # codec: weight of a character CTC loss on whole clips' quantised codes (0 = off), so the
    # codes carry what was said, as the release's ASR-supervised speech tokenizer does
    ctc_weight: float = 0.0
    # vocoder: what BigVGAN learns from: "mel" (the recording's) or "decoded" (the checkpoint's
    # round trip of it, codes -> DiT), so it learns to undo what the DiT gets wrong
    vocoder_input: str = "mel"
    save_every_s: float = 240.0  # codec stages also checkpoint after this many seconds
    # bookkeeping
    eval_every: int = 0  # steps; 0 = never
    eval_batches: int = 4
    save_every: int = 0  # steps; 0 = only at the end
    log_every: int = 1
    seed: int = 0
    dist: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard, sharded DCP checkpoints)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown stage keys: {sorted(unknown)}")
        d = dict(d)
        if d.get("lora") is not None:
            d["lora"] = LoRAOptions(**d["lora"])
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        stage = cls(**d)
        if stage.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {stage.task!r}")
        return stage

    @classmethod
    def from_file(cls, path: str | Path) -> Stage:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> Stage:
        return dataclasses.replace(self, **kw)

    @property
    def needs_talker(self) -> bool:
        return self.task in ("talker", "talker_dpo")


def select_trainable(model: nn.Module, stage: Stage) -> list[str]:
    """Set ``requires_grad`` on ``model`` per the stage; returns the trained parameter names.
    With LoRA, call after ``apply_lora``: only the LoRA factors are trained. A ``trainable`` or
    ``frozen`` pattern that matches no parameter is an error (a typo would silently train
    nothing). Thinker parameters in a talker stage are trained jointly: the talker loss reaches
    them (``losses.talker_side``)."""
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in (*stage.trainable, *stage.frozen)
                 if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched and stage.lora is None:
        raise ValueError(f"stage {stage.name!r}: patterns {unmatched} match no parameter")
    if stage.lora is not None:
        chosen = {n for n in names if n.endswith((".lora_A", ".lora_B"))}
    else:
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in stage.trainable)}
        if stage.talker_last_layers > 0:
            n_layers = len(model.talker.model.layers)
            first = n_layers - stage.talker_last_layers
            pats = [f"talker.model.layers.{i}.*" for i in range(first, n_layers)]
            pats += ["talker.model.norm.*", "talker.codec_head.*"]
            chosen |= {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)}
        chosen = {n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in stage.frozen)}
    if not chosen:
        raise ValueError(f"stage {stage.name!r} selects no trainable parameters")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return sorted(chosen)
