"""Training: the stages (loss falls, frozen parts stay put), the Talker's losses, exact resume,
LoRA merge, and the saved checkpoint loading in omnistream and transformers.

All on the tiny random checkpoint with a synthetic set of spoken / written questions about
generated images (``train.synth.make_dataset``). Each training run is a handful of steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omnistream.tiny import tiny_config
from omnistream.tokenizer import Tokenizer
from omnistream.train.data import IGNORE, Dataset, collate
from omnistream.train.loop import train
from omnistream.train.lora import LoRALinear, apply_lora, merge_lora
from omnistream.train.model import OmniTrain, read_tensors
from omnistream.train.stages import Stage, select_trainable

CONFIGS = Path(__file__).parent.parent / "configs" / "train"
LLM = ("thinker.model.", "thinker.lm_head.")
ENCODERS = ("thinker.audio_tower.", "thinker.visual.")


def stage(name: str, **kw) -> Stage:
    """A shipped stage config, shrunk for the tests."""
    small = {
        "batch_size": 4,
        "grad_accum": 1,
        "warmup_steps": 2,
        "min_lr": 1e-4,
        "save_every": 0,
        "eval_every": 0,
    }
    return Stage.from_file(CONFIGS / f"{name}.json").replace(**{**small, **kw})


def changed(src: Path, out: Path) -> dict[str, bool]:
    a, b = read_tensors(src), read_tensors(out)
    assert a.keys() == b.keys()
    return {k: not torch.equal(a[k], b[k]) for k in a}


def dropped(losses: list[float], frac: float) -> bool:
    return losses[-1] <= (1 - frac) * losses[0]


def test_stage_configs_parse():
    names = sorted(p.stem for p in CONFIGS.glob("*.json"))
    assert {
        "align_encoders",
        "full",
        "long_context",
        "talker",
        "talker_dpo",
        "speaker_finetune",
        "speaker_lora",
        "full_lora",
    } <= set(names)
    for n in names:
        Stage.from_file(CONFIGS / f"{n}.json")
    with pytest.raises(ValueError, match="unknown stage keys"):
        Stage.from_dict({"nmae": "x"})


def test_speaker_finetune_selects_last_talker_layers():
    from omnistream.config import OmniConfig

    model = OmniTrain(OmniConfig.from_dict(tiny_config()), with_talker=True)
    names = select_trainable(model, stage("speaker_finetune", talker_last_layers=1))
    assert names and all(
        n.startswith(("talker.model.layers.1.", "talker.model.norm.", "talker.codec_head."))
        for n in names
    )
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("thinker."))


def _talker_model(seed: int = 0) -> OmniTrain:
    """A tiny Thinker + Talker with every parameter random (biases and norms too)."""
    from helpers import randomize_

    from omnistream.config import OmniConfig

    model = OmniTrain(OmniConfig.from_dict(tiny_config()), with_talker=True)
    randomize_(model.thinker, seed=seed)
    randomize_(model.talker, seed=seed + 1, std=0.1)
    return model.eval()


def _talker_batch(tiny_dir, data, model, idx=(1, 2)) -> dict:
    """A collated talker batch of examples ``idx`` (1 and 2 hold an image and a question)."""
    tok = Tokenizer.from_dir(tiny_dir)
    ds = Dataset(data, tok, model.cfg.thinker_config, task="talker")
    return collate([ds.examples[i] for i in idx], tok.special.pad)


@torch.no_grad()
def test_teacher_forced_talker_logits_equal_inference(tiny_dir, data):
    """Training's talker input (``losses.talker_inputs``, right-padded batch, media in the
    prompt) gives the logits inference gets from ``Talker.prefill`` + ``Talker.step`` fed with
    the Thinker's prefill + decode states of the same prompt and reply."""
    from omnistream.train import losses

    model = _talker_model()
    thinker, talker = model.thinker, model.talker
    batch = _talker_batch(tiny_dir, data, model)
    bos = Stage().speaker_bos
    both, track = losses.talker_side(thinker, talker, batch, bos)
    codes = [ex.codes for ex in batch["examples"]]
    x, pos, tgt = losses.talker_inputs(talker, both, track, batch, codes)
    keep = tgt != IGNORE
    trained = losses.talker_logits(talker, x, pos, keep).split(keep.sum(1).tolist())
    for b, ex in enumerate(batch["examples"]):
        assert ex.media, "the prompt has media placeholders (zeroed on the text track)"
        P, n, m = ex.reply_start, ex.reply_len, len(ex.codes)
        one = collate([ex], 0)
        media = losses.encode_media(thinker, one["media"])
        ids = one["input_ids"][:, :P]
        cache = thinker.model.new_cache(1, P + n)
        step = thinker.prefill(ids, cache, media=media)
        deltas = step.rope_deltas
        reply = []
        for t in ex.input_ids[P : P + n]:  # the reply tokens, fed as inference feeds them
            s = thinker.decode_step(torch.tensor([t]), cache, deltas)
            reply.append(s.hidden + s.embeds)  # [1, 1, D]
        tcache = talker.new_cache(1, P + m + 2)
        prompt = talker.prompt_track(ids, step.hidden, step.embeds)
        logits = [talker.prefill(tcache, prompt, step.position_ids, deltas, track.bos, reply[0])]
        for k in range(1, m + 1):
            text = track.at(k, n, reply[k] if k < n else None)
            logits.append(talker.step(tcache, torch.tensor([ex.codes[k - 1]]), text, deltas))
        assert m + 1 > n + 1  # the steps run past the reply (text end, then text pad)
        torch.testing.assert_close(trained[b], torch.cat(logits), atol=1e-4, rtol=0)


@torch.no_grad()
def test_code_noise_corrupts_input_codes_only(tiny_dir, data):
    """``code_noise`` replaces some teacher-forced input codes by codes of the same reply; the
    targets, the prompt and the start positions stay as they were."""
    from omnistream.train import losses

    model = _talker_model()
    batch = _talker_batch(tiny_dir, data, model)
    both, track = losses.talker_side(model.thinker, model.talker, batch, Stage().speaker_bos)
    codes = [ex.codes for ex in batch["examples"]]
    x0, pos0, tgt0 = losses.talker_inputs(model.talker, both, track, batch, codes)
    torch.manual_seed(0)
    x1, pos1, tgt1 = losses.talker_inputs(model.talker, both, track, batch, codes, 0.5)
    assert torch.equal(tgt0, tgt1) and torch.equal(pos0, pos1)
    for b, ex in enumerate(batch["examples"]):
        P, m = ex.reply_start, len(ex.codes)
        assert torch.equal(x0[b, : P + 2], x1[b, : P + 2])  # prompt, speaker, start
        changed = (x0[b, P + 2 : P + 2 + m] != x1[b, P + 2 : P + 2 + m]).any(-1)  # [m]
        assert 0 < int(changed.sum()) < m, "about half of the input codes replaced"
        # a replaced input is the codec embedding of another code of the same reply
        emb = model.talker.codec(torch.tensor(ex.codes))  # [m, E]
        diff = x1[b, P + 2 : P + 2 + m] - x0[b, P + 2 : P + 2 + m]  # [m, E]
        k = int(changed.nonzero()[0])
        assert any(torch.allclose(diff[k], emb[j] - emb[k], atol=1e-5) for j in range(m))
    # the stage key reaches the training loss
    from omnistream.train.loop import Objective

    loss = {}
    for noise in (0.0, 0.5):
        torch.manual_seed(0)
        loss[noise], _ = Objective(model, Stage(task="talker", code_noise=noise))(batch)
    assert not torch.allclose(loss[0.0], loss[0.5])


def test_speech_units_align_codes_with_reply_tokens(tiny_dir, data, tmp_path):
    """A record's ``speech_units`` become each unit's codes (50 per second) and the reply tokens
    that spell it; units that do not fit the reply are refused with the reason."""
    from omnistream.config import OmniConfig

    tok = Tokenizer.from_dir(tiny_dir)
    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    ex = Dataset(data, tok, cfg, task="talker").examples[0]
    (c0, c1, j0, j1), (d0, d1, k0, k1) = ex.units
    assert (c0, c1, d0, d1) == (0, 6, 6, 12)
    reply = ex.input_ids[ex.reply_start : ex.reply_start + ex.reply_len]
    text = tok.decode(reply)  # "The {shape} is {color}."
    assert tok.decode(reply[j0:j1]) == text[: text.index(" is ")]
    assert tok.decode(reply[k0:k1]) == text[text.index(" is ") : -1]
    rec = json.loads(data.read_text().splitlines()[0])
    bad = []
    for units in ([[5, 2, 0.0, 0.1]], [[0, 400, 0.0, 0.1]], "words"):
        bad.append(json.dumps({**rec, "speech_units": units}))
    for f in data.parent.iterdir():
        if f.suffix in (".png", ".wav"):
            shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "units.jsonl"
    path.write_text("\n".join([json.dumps(rec), *bad]) + "\n")
    ds = Dataset(path, tok, cfg, task="talker", log=lambda _: None)
    assert len(ds) == 1 and len(ds.errors) == 3
    assert "lo < hi" in ds.errors[0] and "not in the reply" in ds.errors[1]
    assert "lo < hi" in ds.errors[2]


def test_guided_attention_is_the_heads_attention_and_training_follows_it(tiny_dir, data,
                                                                         monkeypatch):
    """``losses.guided_attention`` is -log of the attention mass the guided head really gives
    (the probabilities recomputed from the q and k the model's SDPA call receives) to each code's
    unit tokens; with ``guided_attention`` > 0 training pulls that head onto them."""
    import torch.nn.functional as F

    from omnistream.nn import text as text_mod
    from omnistream.train import losses
    from omnistream.train.loop import Objective

    model = _talker_model()
    batch = _talker_batch(tiny_dir, data, model, idx=(0, 1, 2, 3))
    bos, layer, head = Stage().speaker_bos, 1, 1
    both, track = losses.talker_side(model.thinker, model.talker, batch, bos)
    x, pos, tgt = losses.talker_inputs(model.talker, both, track, batch,
                                       [e.codes for e in batch["examples"]])
    queries, keys = losses.unit_attention_targets(batch, x.shape[1])
    for b, e in enumerate(batch["examples"]):
        base = e.reply_start + 1
        assert queries[b, base : base + 12].all() and not queries[b, base + 12 :].any()
        assert keys[b, base + 3].nonzero()[:, 0].tolist() == [base + j for j in range(2)]
        assert keys[b, base + 7].nonzero()[:, 0].tolist() == [base + 2, base + 3]
    probs, real = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, T, S]
        T = s.shape[-1]
        probs.append(s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e30).softmax(-1))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    targets = (queries, keys)
    monkeypatch.setattr(text_mod.F, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        _, g, n = losses.guided_logits(model.talker, x, pos, tgt != IGNORE, layer, head, targets)
    monkeypatch.undo()
    mass = (probs[layer][:, head] * keys).sum(-1)[queries]  # [N]
    assert n == int(queries.sum()) and n > 0
    torch.testing.assert_close(g, -mass.log().sum(), rtol=1e-4, atol=1e-4)

    def guided_nll() -> float:
        with torch.no_grad():
            both, track = losses.talker_side(model.thinker, model.talker, batch, bos)
            x, pos, tgt = losses.talker_inputs(model.talker, both, track, batch,
                                               [e.codes for e in batch["examples"]])
            _, g, _ = losses.guided_logits(model.talker, x, pos, tgt != IGNORE, layer, head,
                                           targets)
            return float(g) / n

    before = guided_nll()
    objective = Objective(model, Stage(task="talker", guided_attention=1.0, guided_layer=layer,
                                       guided_head=head))
    opt = torch.optim.Adam(model.talker.parameters(), lr=3e-3)
    for _ in range(15):
        loss, count = objective(batch)
        opt.zero_grad()
        (loss / count).backward()
        opt.step()
    assert guided_nll() < 0.5 * before


def test_joint_talker_training_reaches_thinker_params(tiny_dir, data):
    """A talker stage that lists Thinker parameters trains them (the loss reaches them); one
    that does not leaves the Thinker without gradients."""
    from omnistream.train import losses

    for trainable, joint in ((["talker.*", "thinker.model.layers.*"], True), (["talker.*"], False)):
        model = _talker_model()
        select_trainable(model, Stage(task="talker", trainable=trainable))
        batch = _talker_batch(tiny_dir, data, model)
        loss, count = losses.talker_loss(model.thinker, model.talker, batch, Stage().speaker_bos)
        loss.backward()
        grad = model.thinker.model.layers[0].mlp.down_proj.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == joint
        assert model.thinker.model.embed_tokens.weight.grad is None  # not listed: not trained
        assert model.talker.codec_head.weight.grad is not None and count > 0


def test_trainable_pattern_that_matches_nothing_is_an_error():
    from omnistream.config import OmniConfig

    model = OmniTrain(OmniConfig.from_dict(tiny_config()), with_talker=False)
    with pytest.raises(ValueError, match=r"thinker\.modle\.\*"):
        select_trainable(model, Stage(trainable=["thinker.audio_tower.*", "thinker.modle.*"]))
    with pytest.raises(ValueError, match=r"talker\.\*"):  # a thinker-only model has no talker
        select_trainable(model, Stage(trainable=["talker.*"]))
    with pytest.raises(ValueError, match="thinker.visaul"):
        select_trainable(model, Stage(frozen=["thinker.visaul.*"]))


def test_lora_merge_equals_adapted_layer():
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.q_proj = torch.nn.Linear(8, 6)
    wrapped = apply_lora(block, r=2, alpha=4.0, targets=("q_proj",))
    assert wrapped == ["q_proj"] and isinstance(block.q_proj, LoRALinear)
    torch.nn.init.normal_(block.q_proj.lora_B)
    x = torch.randn(3, 8)
    sd = merge_lora(block.state_dict(), scale=2.0)
    assert set(sd) == {"q_proj.weight", "q_proj.bias"}
    plain = torch.nn.Linear(8, 6)
    plain.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items()})
    torch.testing.assert_close(plain(x), block.q_proj(x), atol=1e-6, rtol=1e-6)


# -- stages ---------------------------------------------------------------------------------------


def test_encoder_alignment_trains_encoders_only(tiny_dir, data, tmp_path):
    st = stage("align_encoders", lr=3e-2, max_steps=6)
    res = train(st, data, tiny_dir, tmp_path / "out", verbose=False)
    losses = res["losses"]
    print("alignment losses", [round(x, 3) for x in losses])
    assert dropped(losses, 0.01), losses  # the LLM is random and frozen: a small but real drop
    diff = changed(tiny_dir, tmp_path / "out")
    assert any(v for k, v in diff.items() if k.startswith(ENCODERS))
    frozen = [k for k, v in diff.items() if v and not k.startswith(ENCODERS)]
    assert frozen == [], frozen[:5]  # the LLM, talker and token2wav are bit-identical


def test_lr_scale_sets_each_groups_rate(tiny_dir, data, tmp_path):
    """``lr_scale`` 0 keeps the vision tower bit-identical while the rest of the Thinker moves;
    matching is by glob, first pattern wins."""
    st = stage("full", lr=1e-3, max_steps=2, lr_scale={"thinker.visual.*": 0.0,
                                                       "thinker.*": 1.0})
    train(st, data, tiny_dir, tmp_path / "out", verbose=False)
    diff = changed(tiny_dir, tmp_path / "out")
    vision = [v for k, v in diff.items() if k.startswith("thinker.visual.")]
    assert vision and not any(vision)
    assert any(v for k, v in diff.items() if k.startswith("thinker.model."))
    assert any(v for k, v in diff.items() if k.startswith("thinker.audio_tower."))


def test_tied_embedding_trains_the_same_with_sparse_lookup_gradients(tiny_dir, data, tmp_path,
                                                                    monkeypatch):
    """A trained embedding tied to the head (omni-mini's) sends its lookup gradient sparse
    (``loop.sparse_tied_embedding``); the weights after three steps equal a run with dense
    lookup gradients up to float rounding."""
    from omnistream.maketiny import make_tiny
    from omnistream.train import loop
    from omnistream.train.model import load_model

    tied = make_tiny(tmp_path / "tied", seed=0,
                     config=tiny_config(**{"thinker_config.text_config.tie_word_embeddings": True}))
    st = stage("mini_2_all", lr=1e-3, max_steps=3)
    real, used = loop.sparse_tied_embedding, []
    monkeypatch.setattr(loop, "sparse_tied_embedding", lambda m: used.append(real(m)) or used[-1])
    sparse = train(st, data, tied, tmp_path / "sparse", verbose=False)["losses"]
    assert used == [True]
    monkeypatch.setattr(loop, "sparse_tied_embedding", lambda m: False)
    dense = train(st, data, tied, tmp_path / "dense", verbose=False)["losses"]
    assert sparse == pytest.approx(dense, rel=1e-6) and len(sparse) == 3
    a, b = read_tensors(tmp_path / "sparse"), read_tensors(tmp_path / "dense")
    assert changed(tied, tmp_path / "sparse")["thinker.model.embed_tokens.weight"]
    assert "thinker.lm_head.weight" not in a
    for k in a:  # saved in bf16: one rounding step apart at most (a step of the run is ~1e-3)
        assert torch.allclose(a[k].float(), b[k].float(), rtol=2**-7, atol=1e-6), k
    # an untied embedding (the tiny default's) or a frozen one keeps dense gradients
    assert not real(load_model(tiny_dir, with_talker=False))
    m = load_model(tied, with_talker=False)  # the flag is what makes the lookup's gradient sparse
    assert real(m) and m.thinker.model.embed_tokens.sparse
    m.thinker.model.embed_tokens(torch.tensor([[1, 2]])).sum().backward()
    assert m.thinker.model.embed_tokens.weight.grad.is_sparse
    frozen = load_model(tied, with_talker=False).requires_grad_(False)
    assert not real(frozen) and not frozen.thinker.model.embed_tokens.sparse


def _media_stats(model_dir: Path, data: Path) -> tuple[float, float]:
    """The encoders' outputs over the whole set: mean row RMS^2, mean per-dimension std."""
    from omnistream.train.losses import encode_media
    from omnistream.train.model import load_model

    m = load_model(model_dir, with_talker=False)
    ds = Dataset(data, Tokenizer.from_dir(model_dir), m.cfg.thinker_config, log=lambda _: None)
    with torch.no_grad():
        media = encode_media(m.thinker, collate(ds.examples, 0)["media"])
        e = torch.cat([x for x in (media.audio_embeds, media.image_embeds) if x is not None])
        return float(e.pow(2).mean()), float(e.std(0).mean())


def test_media_penalty_keeps_encoder_outputs_informative(tiny_dir, data, tmp_path):
    """Without the penalty, encoder alignment blows the outputs up (one huge constant vector);
    with it they stay under the RMS limit and keep their spread over tokens."""
    from omnistream.nn.thinker import Media
    from omnistream.train.losses import media_penalty

    rows = torch.full((4, 8), 2.0)  # RMS 2 each, no spread
    assert media_penalty(Media(image_embeds=rows), 1.0, 0.0).item() == pytest.approx(3.0)
    assert media_penalty(Media(audio_embeds=rows), 2.5, 0.0).item() == 0.0
    assert media_penalty(Media(audio_embeds=rows), 0.0, 0.5).item() == pytest.approx(0.5, 1e-2)
    assert media_penalty(None, 1.0, 0.5) is None
    runs = {"free": (0.0, 0.0), "kept": (0.05, 0.03)}
    for name, (limit, floor) in runs.items():
        st = stage("align_encoders", lr=3e-2, max_steps=6, media_rms_limit=limit,
                   media_std_floor=floor)
        train(st, data, tiny_dir, tmp_path / name, verbose=False)
    stats = {k: _media_stats(d, data) for k, d in (("before", tiny_dir),
                                                   ("free", tmp_path / "free"),
                                                   ("kept", tmp_path / "kept"))}
    print("encoder outputs (mean RMS^2, mean std):", stats)
    assert stats["free"][0] > 20 * stats["before"][0]  # the blow-up the penalty prevents
    assert stats["kept"][0] < stats["free"][0] / 100
    assert stats["kept"][1] > 0.03


@pytest.fixture(scope="module")
def full_run(tiny_dir, data, tmp_path_factory):
    """The full-thinker stage, 8 steps uninterrupted, and the same run interrupted at step 4
    and resumed."""
    base = tmp_path_factory.mktemp("full")
    st = stage("full", lr=1e-2, max_steps=8, frozen=["thinker.model.embed_tokens.*"])
    whole = train(st, data, tiny_dir, base / "whole", verbose=False)
    first = train(st, data, tiny_dir, base / "resumed", stop_at=4, verbose=False)
    second = train(st, data, tiny_dir, base / "resumed", verbose=False)
    return whole, first, second, base


def test_full_stage_loss_falls(full_run, tiny_dir):
    whole, _, _, base = full_run
    losses = whole["losses"]
    print("full stage losses", [round(x, 3) for x in losses])
    assert len(losses) == 8 and dropped(losses, 0.30), losses
    diff = changed(tiny_dir, base / "whole")
    assert not any(
        v for k, v in diff.items() if k.startswith(("talker.", "token2wav.", "thinker.model.embed"))
    )
    assert diff["thinker.lm_head.weight"] and diff["thinker.model.layers.0.self_attn.q_proj.weight"]
    log = [
        json.loads(line) for line in (base / "whole" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))


def test_resume_continues_the_same_curve(full_run):
    whole, first, second, base = full_run
    assert len(first["losses"]) == 4 and len(second["losses"]) == 4
    assert first["losses"] + second["losses"] == whole["losses"]  # exact
    log = (base / "resumed" / "train_log.jsonl").read_text()
    assert '"event": "resume", "step": 4' in log
    assert not (base / "resumed" / "resume").exists()  # cleared once the stage completed
    a, b = read_tensors(base / "whole"), read_tensors(base / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Killed(BaseException):
    """The process dying (a session's end): nothing after it runs."""


def test_a_run_killed_while_saving_resumes_from_the_state_before(full_run, tiny_dir, data,
                                                                 monkeypatch):
    """A process killed in the middle of writing its resume state leaves the state before it
    whole: the run resumes from there and ends exactly as the uninterrupted run."""
    whole, _, _, base = full_run
    st = stage("full", lr=1e-2, max_steps=8, frozen=["thinker.model.embed_tokens.*"],
               save_every=2)
    out = base / "killed"
    real_save, saves = torch.save, []

    def torn_save(obj, f, *a, **k):
        if str(f).endswith("state.pt"):
            saves.append(f)
            if len(saves) == 2:  # the save at step 4: half a file, then the process dies
                Path(f).write_bytes(b"PK\x03\x04 half a state")
                raise _Killed
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", torn_save)
        with pytest.raises(_Killed):
            train(st, data, tiny_dir, out, verbose=False)
    second = train(st, data, tiny_dir, out, verbose=False)
    assert '"event": "resume", "step": 2' in (out / "train_log.jsonl").read_text()
    assert second["losses"] == whole["losses"][2:]
    a, b = read_tensors(base / "whole"), read_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [d for d in out.iterdir() if d.name.startswith("resume")]


def test_resume_source_is_the_newest_whole_state(tmp_path):
    """Wherever a kill falls in a save (``_save_resume``: write resume.tmp, meta.json last, move
    resume to resume.old, resume.tmp to resume), one whole state is found, the newest."""
    from omnistream.train.loop import _resume_source

    rdir = tmp_path / "resume"

    def state(name: str, step: int | None) -> None:
        d = tmp_path / name
        d.mkdir()
        if step is not None:
            (d / "meta.json").write_text(json.dumps({"step": step}))

    assert _resume_source(rdir) is None
    state("resume", 4)
    state("resume.tmp", None)  # killed while writing the next state
    assert _resume_source(rdir) == rdir
    (tmp_path / "resume.tmp" / "meta.json").write_text('{"st')  # killed while writing its meta
    assert _resume_source(rdir) == rdir
    (tmp_path / "resume.tmp" / "meta.json").write_text('{"step": 6}')  # whole, not swapped in
    assert _resume_source(rdir) == tmp_path / "resume.tmp"
    rdir.rename(tmp_path / "resume.old")  # killed between the two moves
    assert _resume_source(rdir) == tmp_path / "resume.tmp"
    shutil.rmtree(tmp_path / "resume.tmp")
    assert _resume_source(rdir) == tmp_path / "resume.old"


def test_saved_checkpoint_generates(full_run):
    from omnistream.checkpoint import load_component
    from omnistream.engine.offline import generate_text

    _, _, _, base = full_run
    out = base / "whole"
    thinker = load_component(out, "thinker", dtype="float32", quiet=True)
    talker = load_component(out, "talker", dtype="float32", quiet=True)
    assert talker is not None
    tok = Tokenizer.from_dir(out)
    prompt = "<|im_start|>user\nDescribe a red square.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt)])
    gen = generate_text(thinker, ids, max_new_tokens=4, eos_ids=())
    assert gen.tokens.shape == (1, 4)


def test_saved_checkpoint_loads_in_transformers(full_run):
    pytest.importorskip("transformers")
    from transformers import Qwen2_5OmniForConditionalGeneration

    _, _, _, base = full_run
    out = base / "whole"
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    stored = read_tensors(out)
    got = model.state_dict()["thinker.model.language_model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(
        got, stored["thinker.model.layers.0.self_attn.q_proj.weight"].float()
    )


def test_talker_stage_loss_falls(tiny_dir, data, tmp_path):
    st = stage("talker", lr=2e-2, max_steps=8, eval_every=4, eval_batches=2)
    res = train(st, data, tiny_dir, tmp_path / "out", eval_data=data, verbose=False)
    losses = res["losses"]
    assert [e["step"] for e in res["eval"]] == [4, 8]
    assert res["eval"][1]["eval_loss"] < res["eval"][0]["eval_loss"] < losses[0]
    print("talker losses", [round(x, 3) for x in losses])
    assert dropped(losses, 0.25), losses
    diff = changed(tiny_dir, tmp_path / "out")
    assert not any(v for k, v in diff.items() if not k.startswith("talker."))
    assert diff["talker.codec_head.weight"]


def test_talker_dpo_prefers_chosen(tiny_dir, data, tmp_path):
    st = stage("talker_dpo", lr=1e-2, max_steps=5, dpo_beta=0.5)
    res = train(st, data, tiny_dir, tmp_path / "out", verbose=False)
    losses = res["losses"]
    print("dpo losses", [round(x, 4) for x in losses])
    assert abs(losses[0] - 0.693147) < 1e-4  # policy == reference at the start: -log sigmoid(0)
    assert dropped(losses, 0.30), losses


def test_lora_stage_saves_merged_weights(tiny_dir, data, tmp_path):
    st = stage("speaker_lora", lr=2e-2, max_steps=4, dtype="bfloat16")  # bf16 autocast
    res = train(st, data, tiny_dir, tmp_path / "out", verbose=False)
    assert res["losses"][-1] < res["losses"][0], res["losses"]
    out = tmp_path / "out"
    stored = read_tensors(out)
    assert not any("lora_" in k for k in stored)
    assert stored.keys() == read_tensors(tiny_dir).keys()
    diff = changed(tiny_dir, out)
    moved = {k for k, v in diff.items() if v}
    assert moved and all(
        k.startswith("talker.model.layers.") and k.endswith("proj.weight") for k in moved
    )
    # the merged weights are what the adapted model computed (up to the bf16 rounding on disk)
    model = res["model"]
    merged = merge_lora(
        {k: v.detach() for k, v in model.state_dict().items()}, st.lora.alpha / st.lora.r
    )
    k = "talker.model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(stored[k].float(), merged[k].to(torch.bfloat16).float())


def test_balance_alpha_is_sized_from_the_thinkers_norms(tiny_dir, data):
    """``text_track_norms`` measures what ``balance_tensors`` scales (hidden / alpha, embedding
    * alpha), and ``balance_alpha`` picks the power of two that brings the ratio nearest to the
    target: v10's norms (21.9, 1.07) give its alpha 8, the third run's (11.2, 2.18) give 4."""
    from omnistream.train.mini_model import balance, balance_alpha, text_track_norms

    assert balance_alpha(21.9, 1.07, 0.32) == 8.0
    assert balance_alpha(11.24, 2.18, 0.32) == 4.0
    assert balance_alpha(0.1, 1.0, 0.32) == 1.0  # never weaker tokens than the Thinker's own
    with pytest.raises(ValueError, match="positive"):
        balance_alpha(1.0, 0.0, 0.32)
    h, e = text_track_norms(tiny_dir, data, n=6)
    assert h > 0 and e > 0
    bal = balance(tiny_dir, data.parent / "balanced", 4.0)
    hb, eb = text_track_norms(bal, data, n=6)
    assert hb == pytest.approx(h / 4, rel=1e-4) and eb == pytest.approx(e * 4, rel=1e-4)
    assert balance_alpha(hb, eb, h / e / 16) == 1.0


@torch.no_grad()
def test_balance_keeps_the_thinker_and_strengthens_the_tokens(tiny_dir, data):
    """``mini_model.balance_tensors``: the Thinker's logits are unchanged (media in the prompt),
    its hidden states reach the Talker alpha times smaller and its embeddings alpha times larger,
    and the Talker's input projection sees the codec embedding and the hidden states as before
    and the token embeddings alpha**2 times stronger."""
    from omnistream.config import OmniConfig
    from omnistream.train import losses
    from omnistream.train.mini_model import balance_config, balance_tensors

    a = 4.0
    model = _talker_model()
    cfg = balance_config(tiny_config(), a)
    bal = OmniTrain(OmniConfig.from_dict(cfg), with_talker=True).eval()
    bal.load_state_dict(balance_tensors(dict(model.state_dict()), a))
    tok = Tokenizer.from_dir(tiny_dir)
    ds = Dataset(data, tok, model.cfg.thinker_config, task="talker")
    batch = collate(ds.examples[:4], tok.special.pad)
    assert batch["media"]["image"] and batch["media"]["audio"]
    h, e = losses.thinker_states(model.thinker, batch)
    hb, eb = losses.thinker_states(bal.thinker, batch)
    torch.testing.assert_close(bal.thinker.lm_head(hb), model.thinker.lm_head(h))
    torch.testing.assert_close(hb, h / a)
    torch.testing.assert_close(eb, e * a)
    proj, proj_b = model.talker.thinker_to_talker_proj, bal.talker.thinker_to_talker_proj
    codec = model.talker.model.embed_tokens.weight[:16]
    codec_b = bal.talker.model.embed_tokens.weight[:16]
    torch.testing.assert_close(proj_b(codec_b), proj(codec))
    torch.testing.assert_close(proj_b(hb), proj(h), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj_b(eb) - proj_b.bias, a * a * (proj(e) - proj.bias),
                               atol=1e-4, rtol=1e-4)
