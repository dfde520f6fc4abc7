"""The omni-mini checkpoint: its config, a from-scratch initialisation, the byte budget, and the
shipped copy.

The config is ``configs/mini/config.json`` (Thinker: Qwen2.5 decoder with the Qwen tokenizer's
151,936-row vocabulary and a tied head, small audio and vision encoders; Talker with the release's
codec vocabulary and special ids) plus the speech codec's ``token2wav_config`` and
``codec_encoder_config``, taken from the trained codec's directory (else
``configs/codec/config.json``). ``init_mini`` writes a released-layout checkpoint: Thinker and
Talker at random (N(0, 0.02) weights, zero biases, unit norms, as ``make-tiny``; the Thinker's
token embedding, its head too, N(0, ``EMBED_STD``)), the codec's
trained ``token2wav.*`` / ``codec_encoder.*`` tensors and its ``spk_dict.pt`` (one voice, Joe),
the tokenizer files. Training checkpoints keep every tensor in float32; ``ship`` writes the
shipped copy (Thinker and Talker bfloat16, the codec float32) and checks the budget::

    python -m omnistream.train.mini_model init OUT [--codec DIR] [--seed 0]
    python -m omnistream.train.mini_model budget DIR
    python -m omnistream.train.mini_model ship SRC OUT
    python -m omnistream.train.mini_model balance SRC OUT [--alpha 4 | --ratio R --records F]
    python -m omnistream.train.mini_model refresh SRC OUT --new A.jsonl.. --seen B.jsonl..
    python -m omnistream.train.mini_model average A B OUT [--weight 0.5]
    python -m omnistream.train.mini_model mean OUT A B [C ...]
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from omnistream.checkpoint import SPEAKERS_FILE, build_component, read_tensors, weight_map
from omnistream.config import OmniConfig
from omnistream.maketiny import (
    GENERATION_CONFIG,
    INIT_STD,
    PREPROCESSOR_CONFIG,
    random_state,
    tied_names,
    write_safetensors,
)
from omnistream.models import RANDOM_WEIGHTS_MARKER, REPO_ROOT
from omnistream.tokenizer import (
    CHAT_TEMPLATE,
    TOKENIZER_FILES,
    tokenizer_files,
    write_tokenizer_files,
)
from omnistream.train.model import side_files

_CONFIGS = (REPO_ROOT or Path.cwd()) / "configs"
MINI_CONFIG_FILE = _CONFIGS / "mini" / "config.json"
CODEC_CONFIG_FILE = _CONFIGS / "codec" / "config.json"
BUDGET_BYTES = 80_000_000  # all shipped weights together (issue 13)
PARTS = ("thinker", "talker", "token2wav", "codec_encoder")
# Stored dtypes by tensor-name prefix (the longest that matches decides). The DiT's weights are
# stored in bfloat16 beside the fp32 vocoder: the 8-layer DiT (codec v3) in fp32 put the model at
# 85 MB.
SHIP_DTYPES = {"thinker.": torch.bfloat16, "talker.": torch.bfloat16,
               "token2wav.": torch.float32, "token2wav.code2wav_dit_model.": torch.bfloat16,
               "codec_encoder.": torch.float32}


def ship_dtype(name: str, dtype: torch.dtype,
               dtypes: dict[str, torch.dtype] = SHIP_DTYPES) -> torch.dtype:
    """The stored dtype of tensor ``name`` (now ``dtype``) under ``dtypes``."""
    best = max((k for k in dtypes if name.startswith(k)), key=len, default=None)
    return dtype if best is None else dtypes[best]


EMBED = "thinker.model.embed_tokens.weight"
# The Thinker's token embedding is its head too. At width 128 a row of N(0, 0.02) has norm 0.23:
# no logit can stand more than about 2.6 above the 151,935 others, and the LLM failed to learn to
# copy a word list until the rows had grown (a toy of its shape did not copy in 600 steps, and with
# rows of N(0, 0.2) it copied by step 300; on the LLM itself, repeat 0% -> 100% after 800 steps:
# docs/MINI.md, thirty-fourth session). 0.02 is an initializer range for widths in the thousands.
EMBED_STD = 0.2
VOICE, VOICE_BOS = "Joe", 151872  # the codec's voice (the Piper voice it was trained on)
# The tasks' shapes stay recognisable far below the release's pixel budgets, and media tokens
# are most of a step's time and of a stage's memory: images at most 224x224 (64 tokens), video
# frames at most 112x112 (16 tokens per 2 frames).
MINI_PREPROCESSOR_CONFIG = PREPROCESSOR_CONFIG | {
    "max_pixels": 224 * 224, "video_min_pixels": 56 * 56, "video_max_pixels": 112 * 112}
# The small Talker speaks more clearly greedy than at the release's temperature and repetition
# penalty (engine/sampling.py reads these keys).
MINI_GENERATION_CONFIG = GENERATION_CONFIG | {"talker_do_sample": False,
                                              "talker_repetition_penalty": 1.0}


def mini_config(codec_dir: str | Path | None = None) -> dict:
    """``configs/mini/config.json`` with the codec's Token2Wav and speech encoder configs."""
    cfg = json.loads(MINI_CONFIG_FILE.read_text())
    src = Path(codec_dir) / "config.json" if codec_dir is not None else CODEC_CONFIG_FILE
    codec = json.loads(src.read_text())
    for key in ("token2wav_config", "codec_encoder_config"):
        if codec.get(key) is None:
            raise ValueError(f"{src} has no {key}")
        cfg[key] = copy.deepcopy(codec[key])
    cfg.setdefault("torch_dtype", "float32")
    return cfg


def _codec_tensors(codec_dir: Path) -> dict[str, Tensor]:
    names = [k for k in weight_map(codec_dir) if k.startswith(("token2wav.", "codec_encoder."))]
    out = {k: v.clone().float() for k, v in read_tensors(codec_dir, names=names)}
    for part in ("token2wav", "codec_encoder"):
        if not any(k.startswith(part + ".") for k in out):
            raise ValueError(f"{codec_dir} holds no {part}.* tensors (a trained codec has both)")
    return out


def _fresh_codec(cfg: OmniConfig, seed: int) -> dict[str, Tensor]:
    """Untrained codec parts (for tests and timing runs without a trained codec)."""
    from omnistream.checkpoint import component_factory
    from omnistream.train.codec import fresh_init_

    out = {}
    for i, part in enumerate(("token2wav", "codec_encoder")):
        m = component_factory(part)(cfg)
        fresh_init_(m, seed * 31 + 7 + i)
        out |= {f"{part}.{k}": v.detach().clone() for k, v in m.state_dict().items()}
    return out


def init_tensors(cfg: OmniConfig, seed: int = 0) -> dict[str, Tensor]:
    """Random Thinker and Talker tensors (float32, checkpoint names; a tied head stored once):
    N(0, INIT_STD), zero biases, unit norms, the Thinker's token embedding N(0, EMBED_STD)."""
    out: dict[str, Tensor] = {}
    for i, part in enumerate(("thinker", "talker")):
        module = build_component(part, cfg)
        tied = tied_names(module)
        for k, v in random_state(module, seed * 31 + i, std=INIT_STD).items():
            if k in tied:
                continue
            if k.endswith(".bias"):
                v = torch.zeros_like(v)
            out[f"{part}.{k}"] = v
    out[EMBED] = out[EMBED] * (EMBED_STD / INIT_STD)  # drawn N(0, INIT_STD): now N(0, EMBED_STD)
    return out


def _voice(seed: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed + 7)
    return {VOICE: {"bos_token": VOICE_BOS, "cond": torch.randn(1, 192, generator=g) * 0.5,
                    "ref_mel": torch.randn(1, 300, 80, generator=g) * 0.5 - 5.0}}


def _write_side_files(out: Path, cfg_dict: dict) -> None:
    def dump(name: str, obj) -> None:
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    dump("config.json", cfg_dict)
    dump("generation_config.json", MINI_GENERATION_CONFIG)
    dump("preprocessor_config.json", MINI_PREPROCESSOR_CONFIG)
    dump("chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_tokenizer_files(out)


def init_mini(out_dir: str | Path, codec_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the from-scratch omni-mini checkpoint (float32, released layout) to ``out_dir``.

    ``codec_dir``: the trained codec (``token2wav.*``, ``codec_encoder.*``, ``spk_dict.pt``);
    None: untrained codec parts and a random voice (tests, timing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = mini_config(codec_dir)
    cfg = OmniConfig.from_dict(cfg_dict)
    tensors = init_tensors(cfg, seed)
    if codec_dir is not None:
        tensors |= _codec_tensors(Path(codec_dir))
        shutil.copyfile(Path(codec_dir) / SPEAKERS_FILE, out / SPEAKERS_FILE)
    else:
        tensors |= _fresh_codec(cfg, seed)
        torch.save(_voice(seed), out / SPEAKERS_FILE)
    write_safetensors(out, [tensors])
    _write_side_files(out, cfg_dict)
    codec_note = f"codec from {codec_dir}" if codec_dir is not None else "untrained codec"
    (out / RANDOM_WEIGHTS_MARKER).write_text(
        f"omni-mini before training (seed {seed}, {codec_note})\n")
    return out


# -- budget and shipping -------------------------------------------------------------------------


def budget(tensors: dict[str, Tensor] | str | Path,
           dtypes: dict[str, torch.dtype] | None = None) -> dict[str, dict[str, int]]:
    """``{part: {"params", "bytes"}}`` (and ``"total"``) of a checkpoint's tensors (a dict or a
    directory) stored in ``dtypes`` (default: the shipped ones)."""
    if not isinstance(tensors, dict):
        tensors = dict(read_tensors(tensors))
    dtypes = SHIP_DTYPES if dtypes is None else dtypes
    out = {p: {"params": 0, "bytes": 0} for p in PARTS}
    for k, v in tensors.items():
        part = k.split(".", 1)[0]
        row = out.setdefault(part, {"params": 0, "bytes": 0})
        dt = ship_dtype(k, v.dtype, dtypes) if v.is_floating_point() else v.dtype
        row["params"] += v.numel()
        row["bytes"] += v.numel() * dt.itemsize
    out["total"] = {"params": sum(r["params"] for r in out.values()),
                    "bytes": sum(r["bytes"] for r in out.values())}
    return out


def format_budget(b: dict[str, dict[str, int]]) -> str:
    """The budget as a table, against ``BUDGET_BYTES``."""
    rows = [f"{'part':<14}{'params':>12}{'MB':>9}"]
    for part, r in b.items():
        rows.append(f"{part:<14}{r['params']:>12,}{r['bytes'] / 1e6:>9.2f}")
    rows.append(f"budget {BUDGET_BYTES / 1e6:.0f} MB: "
                + ("fits" if b["total"]["bytes"] <= BUDGET_BYTES else "OVER"))
    return "\n".join(rows)


def ship(src_dir: str | Path, out_dir: str | Path) -> Path:
    """The shipped copy of a trained checkpoint: its side files (less the built-in tokenizer's)
    and one ``model.safetensors`` with Thinker, Talker and the DiT in bfloat16, the vocoder and
    the speech encoder in float32 (``SHIP_DTYPES``). Raises ValueError over budget."""
    src, out = Path(src_dir), Path(out_dir)
    tensors = {k: v.to(ship_dtype(k, v.dtype)) if v.is_floating_point() else v.clone()
               for k, v in read_tensors(src)}
    b = budget(tensors, {})
    if b["total"]["bytes"] > BUDGET_BYTES:
        raise ValueError("over budget:\n" + format_budget(b))
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    return _write_checkpoint(src, out, tensors, cfg, _ship_side_files)


def _write_checkpoint(src: Path, out: Path, tensors: dict[str, Tensor], cfg: dict,
                      finish: Callable[[Path], None] | None = None) -> Path:
    """``out``: ``src``'s side files, ``cfg`` as config.json and ``tensors``, written in a
    temporary folder (``finish`` edits it) that then replaces ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in side_files(src):
        shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if finish is not None:
        finish(tmp)
    write_safetensors(tmp, [tensors])
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def _ship_side_files(tmp: Path) -> None:
    """The shipped folder's own side files (``ship``)."""
    # the tokenizer is the built-in Qwen one (Tokenizer.from_dir falls back to it): 10.5 MB of
    # derivable files the repository need not hold (write_tokenizer_files writes them back)
    built_in = tokenizer_files()
    for name in TOKENIZER_FILES:
        f = tmp / name
        if f.is_file() and filecmp.cmp(f, built_in / name, shallow=False):
            f.unlink()
    # the decoding defaults belong to the shipped model, whatever run the weights came from
    (tmp / "generation_config.json").write_text(json.dumps(MINI_GENERATION_CONFIG, indent=2) + "\n")


# ``balance_tensors``: tensors scaled by alpha (+1) or 1/alpha (-1)
_BALANCE = (
    (r"thinker\.model\.embed_tokens\.weight", 1),
    (r"thinker\.model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)", 1),
    (r"thinker\.model\.norm\.weight", -1),
    (r"thinker\.audio_tower\.proj\.(weight|bias)", 1),
    (r"talker\.thinker_to_talker_proj\.weight", 1),
    (r"talker\.model\.embed_tokens\.weight", -1),
)


def balance_tensors(tensors: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """The same model with the token embeddings ``alpha**2`` times stronger in the Talker's text
    track (hidden + embedding), the Thinker's outputs unchanged (``alpha`` a power of two keeps
    them exact in floating point).

    The text track sums the Thinker's final hidden state (norm ~21 in omni-mini v3) and the
    token's embedding (norm ~1), so the Talker hardly sees which token it is to say and speaks
    the word the hidden state expects (a wrong count, colour or side). The Thinker is a pre-norm
    decoder: scaling its residual stream by ``alpha`` and its final norm by
    ``1/alpha`` leaves every logit as it was, while its hidden states reach the Talker ``alpha``
    times smaller and its embeddings ``alpha`` times larger; the Talker's input projection
    (times ``alpha``) and codec embedding (``1/alpha``) then see ``codec + hidden + alpha**2 *
    embedding``. The Talker is trained on from there."""
    merger = sorted({int(m.group(1)) for k in tensors
                     if (m := re.fullmatch(r"thinker\.visual\.merger\.mlp\.(\d+)\.weight", k))})
    rules = list(_BALANCE)
    if merger:  # the vision merger's last linear layer writes the image tokens
        rules.append((rf"thinker\.visual\.merger\.mlp\.{merger[-1]}\.(weight|bias)", 1))
    if "thinker.lm_head.weight" in tensors:  # an untied head (omni-mini's is the embedding)
        rules.append((r"thinker\.lm_head\.weight", 1))
    out = dict(tensors)
    for pattern, sign in rules:
        hits = [k for k in tensors if re.fullmatch(pattern, k)]
        if not hits:
            raise KeyError(f"balance: no tensor matches {pattern}")
        for k in hits:
            out[k] = tensors[k] * (alpha if sign > 0 else 1.0 / alpha)
    return out


def balance_config(cfg: dict, alpha: float) -> dict:
    """The config of a ``balance_tensors`` model: the Thinker's RMSNorm epsilon times
    ``alpha**2``, as every one of its norms reads the residual stream ``alpha`` times larger
    (RMSNorm(alpha x, alpha**2 eps) = RMSNorm(x, eps), so the logits stay exact)."""
    cfg = copy.deepcopy(cfg)
    text = cfg["thinker_config"]["text_config"]
    text["rms_norm_eps"] = text["rms_norm_eps"] * alpha * alpha
    return cfg


def balance(src_dir: str | Path, out_dir: str | Path, alpha: float = 4.0) -> Path:
    """A copy of the checkpoint ``src_dir`` with ``balance_tensors`` and ``balance_config``
    applied (side files copied)."""
    src, out = Path(src_dir), Path(out_dir)
    cfg = balance_config(json.loads((src / "config.json").read_text()), alpha)
    return _write_checkpoint(src, out, balance_tensors(dict(read_tensors(src)), alpha), cfg)


def mix(parts: Sequence[tuple[str | Path, float]], out_dir: str | Path) -> Path:
    """``sum(weight * checkpoint)`` over ``parts`` (``(dir, weight)``, weights in [0, 1] summing
    to 1) for every floating-point tensor of checkpoints of one model, in the first's dtypes (its
    config, side files and other tensors). Thinkers trained on from one ancestor lie in one
    basin: their average keeps much of what each learnt, and the mean of several repairs of one
    average ("soup") keeps what each repair kept (docs/MINI.md, forty-seventh to forty-ninth
    sessions)."""
    dirs, weights = [Path(d) for d, _ in parts], [float(w) for _, w in parts]
    if len(dirs) < 2:
        raise ValueError(f"mix: {len(dirs)} checkpoint(s); a mix needs two or more")
    for w in weights:
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"mix: weight {w} is outside [0, 1]")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"mix: the weights {weights} sum to {sum(weights):g}, not 1")
    first = dict(read_tensors(dirs[0]))
    acc = {k: v.float() * weights[0] if v.is_floating_point() else v for k, v in first.items()}
    for d, w in zip(dirs[1:], weights[1:], strict=True):
        seen = set()
        for k, v in read_tensors(d):
            if k not in first:
                raise ValueError(f"mix: {dirs[0]} has no tensor {k} of {d}")
            if v.shape != first[k].shape:
                raise ValueError(f"mix: {d}'s tensor {k} has shape {tuple(v.shape)}, "
                                 f"{dirs[0]}'s {tuple(first[k].shape)}")
            seen.add(k)
            if v.is_floating_point():
                acc[k] = acc[k] + v.float() * w
        if missing := sorted(first.keys() - seen):
            raise ValueError(f"mix: {d} has no tensor {missing[0]} ({len(missing)} missing)")
    tensors = {k: v.to(first[k].dtype) for k, v in acc.items()}
    return _write_checkpoint(dirs[0], Path(out_dir), tensors,
                             json.loads((dirs[0] / "config.json").read_text()))


def average(a_dir: str | Path, b_dir: str | Path, weight: float, out_dir: str | Path) -> Path:
    """``(1 - weight) * a + weight * b``: ``mix`` of two checkpoints."""
    return mix([(a_dir, 1.0 - weight), (b_dir, weight)], out_dir)


@torch.no_grad()
def text_track_norms(model_dir: str | Path, records: str | Path, n: int = 100) -> tuple[float,
                                                                                      float]:
    """Mean norms of the two parts of the Talker's text track, the Thinker's final hidden state
    and the token's embedding, at the reply tokens of the first ``n`` records of ``records``
    (JSONL; text records load fastest)."""
    from omnistream.tokenizer import Tokenizer
    from omnistream.train.data import IGNORE, Dataset, collate
    from omnistream.train.losses import thinker_states
    from omnistream.train.model import load_model

    model = load_model(model_dir, with_talker=False).eval()
    tok = Tokenizer.from_dir(model_dir)
    examples = Dataset(records, tok, model.cfg.thinker_config, log=lambda obj: None).examples[:n]
    if not examples:
        raise ValueError(f"text_track_norms: no records in {records}")
    hidden, embed = [], []
    for i in range(0, len(examples), 10):
        batch = collate(examples[i:i + 10], tok.special.pad)
        h, e = thinker_states(model.thinker, batch)  # [B, T, D] each
        keep = batch["labels"] != IGNORE  # [B, T]
        hidden.append(h[keep].norm(dim=-1))
        embed.append(e[keep].norm(dim=-1))
    return float(torch.cat(hidden).mean()), float(torch.cat(embed).mean())


def balance_alpha(hidden_norm: float, embed_norm: float, ratio: float) -> float:
    """The power of two ``alpha`` (at least 1) for which ``balance_tensors`` brings the text
    track's hidden-to-embedding norm ratio nearest to ``ratio`` (it divides the ratio by
    ``alpha**2``); a power of two keeps the balanced Thinker's logits exact."""
    if min(hidden_norm, embed_norm, ratio) <= 0:
        raise ValueError(f"balance_alpha: norms and ratio must be positive, got {hidden_norm}, "
                         f"{embed_norm}, {ratio}")
    exponent = round(math.log2(hidden_norm / (embed_norm * ratio)) / 2)
    return float(2 ** max(0, exponent))


def record_token_ids(files: list[str | Path], roles: tuple[str, ...] = ("system", "user",
                                                                        "assistant")) -> set[int]:
    """The Qwen token ids of the text that the messages of ``roles`` hold in the training
    records of ``files`` (JSONL)."""
    from omnistream.tokenizer import Tokenizer

    texts = []
    for f in files:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            for m in json.loads(line)["messages"]:
                if m["role"] not in roles:
                    continue
                c = m["content"]
                texts += [c] if isinstance(c, str) else [p["text"] for p in c
                                                         if p.get("type") == "text"]
    ids: set[int] = set()
    for e in Tokenizer.qwen().encode_batch(sorted(set(texts))):
        ids.update(e)
    return ids


def refresh_rows(tensors: dict[str, Tensor], ids: set[int] | list[int], like: set[int] | list[int],
                 seed: int = 0) -> dict[str, Tensor]:
    """The same tensors with the Thinker's token-embedding rows ``ids`` drawn again from
    N(0, s), s the spread of the rows ``like`` (the tokens the model uses).

    Why: omni-mini's head is its token embedding. A token that the model reads nowhere and never
    writes gets one gradient, the softmax pushing its logit down along the mean of the hidden
    states, so over a long training all such rows move to one shared direction (nineteenth
    session: the digits, "+" and "=" at norm 3.6, the used rows about 1.1). When such tokens
    later appear in the input they are one vector, and a short round cannot pull them apart:
    typed sums answered 6% before the rows were drawn again, 54% after (docs/MINI.md)."""
    ids, like = sorted(set(ids)), sorted(set(like) - set(ids))
    if not ids:
        return dict(tensors)
    w = tensors[EMBED]
    std = float(w[like].float().std()) if like else EMBED_STD
    g = torch.Generator().manual_seed(seed)
    fresh = torch.randn(len(ids), w.shape[1], generator=g) * std
    out = dict(tensors)
    out[EMBED] = w.clone()
    out[EMBED][ids] = fresh.to(w.dtype)
    return out


def refresh(src_dir: str | Path, out_dir: str | Path, new_data: list[str | Path],
            seen_data: list[str | Path], seed: int = 0) -> tuple[Path, int]:
    """A copy of ``src_dir`` whose token-embedding rows are drawn again (``refresh_rows``) for
    every token of the records ``new_data`` that the records ``seen_data`` (what the checkpoint
    was trained on) never hold; returns the copy and the number of rows drawn."""
    src = Path(src_dir)
    seen = record_token_ids(seen_data)
    stale = record_token_ids(new_data) - seen
    tensors = refresh_rows(dict(read_tensors(src)), stale, seen, seed)
    cfg = json.loads((src / "config.json").read_text())
    return _write_checkpoint(src, Path(out_dir), tensors, cfg), len(stale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnistream.train.mini_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="the from-scratch checkpoint")
    p.add_argument("out")
    p.add_argument("--codec", default=None, help="trained codec directory")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("budget", help="parameters and shipped bytes of a checkpoint")
    p.add_argument("dir")
    p = sub.add_parser("ship", help="the shipped (bf16) copy of a trained checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p = sub.add_parser("balance", help="stronger token embeddings in the Talker's text track")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--ratio", type=float, default=None,
                   help="size alpha from SRC's norms on --records to this hidden/embedding ratio")
    p.add_argument("--records", default=None, help="JSONL records for --ratio")
    p = sub.add_parser("average", help="(1 - weight) * A + weight * B, tensor by tensor")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("out")
    p.add_argument("--weight", type=float, default=0.5)
    p = sub.add_parser("mean", help="the mean of several checkpoints, tensor by tensor (a soup)")
    p.add_argument("out")
    p.add_argument("srcs", nargs="+")
    p = sub.add_parser("refresh", help="fresh embedding rows for the tokens new to a checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--new", nargs="+", required=True, help="records about to be trained on")
    p.add_argument("--seen", nargs="+", required=True, help="records src was trained on")
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "init":
        d = init_mini(a.out, a.codec, a.seed)
        print(format_budget(budget(d)))
        print(d)
    elif a.cmd == "budget":
        print(format_budget(budget(a.dir)))
    elif a.cmd == "balance":
        alpha = a.alpha
        if a.ratio is not None:
            if a.records is None:
                ap.error("balance --ratio needs --records")
            hidden, embed = text_track_norms(a.src, a.records)
            alpha = balance_alpha(hidden, embed, a.ratio)
            print(f"hidden norm {hidden:.2f}, embedding norm {embed:.2f}: alpha {alpha:g}")
        print(balance(a.src, a.out, alpha))
    elif a.cmd == "average":
        print(average(a.a, a.b, a.weight, a.out))
    elif a.cmd == "mean":
        print(mix([(d, 1 / len(a.srcs)) for d in a.srcs], a.out))
    elif a.cmd == "refresh":
        d, n = refresh(a.src, a.out, a.new, a.seen, a.seed)
        print(f"{d}: {n} token rows drawn again")
    else:
        d = ship(a.src, a.out)
        print(format_budget(budget(d, {})))
        print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
