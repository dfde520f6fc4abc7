"""omni-mini: training records with audio in video equal the engine's prompt, the tied-head
model round trip, the mini checkpoint's budget, the DPO ranking, the Talker's spoken records,
the recipe (its order, merges, refresh, seeds) and the clearest renderings. ``omnistream eval``
is in test_mini_eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnistream.config import OmniConfig
from omnistream.tokenizer import Tokenizer


def _tone(seconds: float, sr: int = 16000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _video_with_audio(path: Path, seconds: float = 5.0, fps: int = 4) -> None:
    from omnistream.train.tasks_media import encode_mp4

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (112, 140, 3), dtype=np.uint8)
              for _ in range(int(seconds * fps))]
    path.write_bytes(encode_mp4(frames, fps, (_tone(seconds), 16000)))


def test_audio_in_video_record_equals_the_processor(tiny_dir, tmp_path):
    """A record with ``use_audio_in_video`` (family 9) gives the Processor's ids, audio rows and
    TMRoPE positions for its prompt (an audio clip before the video checks the audio order)."""
    from omnistream.nn.positions import get_rope_index
    from omnistream.prompt import Processor
    from omnistream.train.data import Dataset
    from omnistream.train.tasks_media import wav_bytes

    _video_with_audio(tmp_path / "v.mp4")
    (tmp_path / "a.wav").write_bytes(wav_bytes(_tone(1.3, hz=880.0), 16000))
    user = {"role": "user", "content": [{"type": "audio", "audio": "a.wav"},
                                         {"type": "video", "video": "v.mp4"},
                                         {"type": "text", "text": "What color was it?"}]}
    rec = {"messages": [user, {"role": "assistant", "content": "It was red."}],
           "use_audio_in_video": True}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    tok = Tokenizer.from_dir(tiny_dir)
    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    ds = Dataset(tmp_path / "d.jsonl", tok, cfg)
    assert not ds.errors
    ex = ds.examples[0]

    abs_user = {"role": "user", "content": [
        {"type": "audio", "audio": str(tmp_path / "a.wav")},
        {"type": "video", "video": str(tmp_path / "v.mp4")},
        {"type": "text", "text": "What color was it?"}]}
    ref = Processor.from_dir(tiny_dir)([abs_user], use_audio_in_video=True)
    P = ex.reply_start
    assert ex.input_ids[:P] == ref.input_ids.tolist()
    assert ref.items[1].chunks is not None and len(ref.items[1].chunks) >= 3  # interleaved
    # audio items: the clip, then the video's track, with the processor's frame counts
    lens = [it.feature_len for k, it in ex.media if k == "audio"]
    assert lens == ref.audio_feature_lengths.tolist()
    assert [k for k, _ in ex.media] == ["audio", "video", "audio"]
    pos, _ = get_rope_index(ref.input_ids[None], None, ref.video_grid_thw, None, True,
                            ref.audio_feature_lengths, ref.video_second_per_grid, cfg)
    assert torch.equal(ex.position_ids[:, :P], pos[:, 0])
    # the reply continues the positions after the prompt
    assert int(ex.position_ids[0, P]) == int(pos.max()) + 1


def test_records_use_the_checkpoints_processor_options(tiny_dir, tmp_path):
    """Training media are decoded as the engine decodes them: the checkpoint's pixel bounds
    (preprocessor_config.json) and a content part's own keys, not library defaults."""
    import shutil

    from PIL import Image

    from omnistream.prompt import Processor, processor_options
    from omnistream.train.data import Dataset

    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    pre = json.loads((model / "preprocessor_config.json").read_text())
    pre["max_pixels"] = 64 * 28 * 28
    (model / "preprocessor_config.json").write_text(json.dumps(pre))
    Image.new("RGB", (448, 448), (200, 30, 30)).save(tmp_path / "i.png")
    parts = [{"type": "image", "image": "i.png"},
             {"type": "image", "image": "i.png", "max_pixels": 16 * 28 * 28},
             {"type": "text", "text": "What color?"}]
    rec = {"messages": [{"role": "user", "content": parts},
                        {"role": "assistant", "content": "Red."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    tok = Tokenizer.from_dir(model)
    cfg = OmniConfig.from_file(model / "config.json").thinker_config
    ex = Dataset(tmp_path / "d.jsonl", tok, cfg,
                 processor_options=processor_options(model)).examples[0]
    abs_parts = [dict(p, image=str(tmp_path / "i.png")) if p["type"] == "image" else p
                 for p in parts]
    ref = Processor.from_dir(model)([{"role": "user", "content": abs_parts}])
    assert ex.input_ids[:ex.reply_start] == ref.input_ids.tolist()
    grids = [tuple(v.grid_thw) for k, v in ex.media]
    assert grids == [tuple(g) for g in ref.image_grid_thw.tolist()]
    assert grids[0] == (1, 16, 16) and grids[1] == (1, 8, 8)  # 64 and 16 merged tokens
    pre["video_max_pixels"] = 8 * 28 * 28
    (model / "preprocessor_config.json").write_text(json.dumps(pre))
    opts = processor_options(model)
    assert (opts.image_max_pixels, opts.video_max_pixels) == (64 * 28 * 28, 8 * 28 * 28)


def test_audio_in_video_flag_is_checked(tiny_dir, tmp_path):
    from omnistream.train.data import Dataset

    rec = {"messages": [{"role": "user", "content": "Hi!"},
                        {"role": "assistant", "content": "Hello!"}],
           "use_audio_in_video": "yes"}
    good = {k: v for k, v in rec.items() if k != "use_audio_in_video"}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(good) + "\n")
    tok = Tokenizer.from_dir(tiny_dir)
    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    ds = Dataset(tmp_path / "d.jsonl", tok, cfg, log=lambda _: None)
    assert len(ds) == 1 and "use_audio_in_video" in ds.errors[0]


# -- the tied head and the mini checkpoint ----------------------------------------------------


def test_tied_head_is_stored_once_and_trains(tmp_path):
    """A tied head (the mini's) is one tensor: stored once, loaded into both names by the engine
    and by training, trained through both uses, saved once."""
    from omnistream.checkpoint import weight_map
    from omnistream.engine.session import Engine
    from omnistream.maketiny import make_tiny
    from omnistream.tiny import tiny_config
    from omnistream.train.loop import train
    from omnistream.train.model import load_model, read_tensors
    from omnistream.train.stages import Stage
    from omnistream.train.synth import make_dataset

    src = make_tiny(tmp_path / "tied",
                    config=tiny_config(**{"thinker_config.text_config.tie_word_embeddings": True}))
    assert "thinker.lm_head.weight" not in weight_map(src)
    eng = Engine.load(src, quiet=True)
    assert torch.equal(eng.thinker.lm_head.weight, eng.thinker.model.embed_tokens.weight)
    m = load_model(src, with_talker=False)
    assert m.thinker.lm_head.weight is m.thinker.model.embed_tokens.weight

    data = make_dataset(tmp_path / "data", n=8)
    stage = Stage(name="t", trainable=["thinker.model.*"], batch_size=4, max_steps=2,
                  warmup_steps=1, lr=1e-2)
    train(stage, data, src, tmp_path / "out", verbose=False)
    out = read_tensors(tmp_path / "out")
    before = read_tensors(src)
    assert "thinker.lm_head.weight" not in out
    key = "thinker.model.embed_tokens.weight"
    assert not torch.equal(out[key], before[key])  # trained (the head's gradient reaches it)
    m2 = load_model(tmp_path / "out", with_talker=False)
    assert torch.equal(m2.thinker.lm_head.weight, out[key].float())


def test_mini_checkpoint_fits_the_budget(tmp_path):
    from omnistream.engine.session import Engine
    from omnistream.prompt import processor_options
    from omnistream.train.mini_model import (
        BUDGET_BYTES,
        budget,
        format_budget,
        init_mini,
        mini_config,
        ship,
    )

    cfg = mini_config()
    assert cfg["thinker_config"]["text_config"]["vocab_size"] == 151936
    assert cfg["token2wav_config"]["dit_config"]["num_embeds"] == 1000
    d = init_mini(tmp_path / "init")
    opts = processor_options(d)  # small media: the tasks' shapes need no more pixels
    assert (opts.image_max_pixels, opts.video_max_pixels) == (224 * 224, 112 * 112)
    b = budget(d)
    assert b["total"]["bytes"] <= BUDGET_BYTES, format_budget(b)
    (d / "resume.pt").write_bytes(b"a dense stage's heads")  # carried along by the stages
    (d / "resume.pt.tmp").write_bytes(b"half a state")  # a save that a kill cut short
    from omnistream.maketiny import GENERATION_CONFIG

    # an older run's file without the mini's decoding defaults: ship writes them
    (d / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    shipped = ship(d, tmp_path / "ship")
    assert not (shipped / "resume.pt").exists()  # a training record, not part of the model
    assert not (shipped / "resume.pt.tmp").exists()
    sb = budget(shipped, {})
    assert sb["total"]["bytes"] == b["total"]["bytes"]
    from omnistream.checkpoint import read_tensors

    stored = {k.split(".")[1] if k.startswith("token2wav.") else k.split(".")[0]: v.dtype
              for k, v in read_tensors(shipped)}  # the DiT in bf16, the vocoder in fp32
    assert stored["code2wav_dit_model"] == torch.bfloat16
    assert stored["code2wav_bigvgan_model"] == torch.float32
    assert stored["thinker"] == stored["talker"] == torch.bfloat16
    assert not (shipped / "RANDOM_WEIGHTS").exists()
    eng = Engine.load(shipped, quiet=True)
    assert eng.speakers == ["Joe"]
    assert eng.talker_sampling.greedy and eng.talker_sampling.repetition_penalty == 1.0
    from omnistream.tokenizer import TOKENIZER_FILES, Tokenizer

    assert not any((shipped / f).exists() for f in TOKENIZER_FILES)  # the built-in ones
    text = "Hello! I am omnistream.<|im_end|>"
    assert eng.tokenizer.encode(text) == Tokenizer.from_dir(d).encode(text)
    assert eng.talker.cfg.tts_codec_end_token_id == 8294  # the release's special codec ids
    std = float(eng.thinker.model.layers[0].mlp.up_proj.weight.detach().std())
    assert 0.015 < std < 0.025  # make-tiny's scale (N(0, 0.02))
    from omnistream.train.mini_model import EMBED_STD

    emb = eng.thinker.model.embed_tokens.weight.detach().float()  # the tied head too
    assert abs(float(emb.std()) - EMBED_STD) < 0.01 and abs(float(emb.mean())) < 0.01
    assert EMBED_STD >= 0.1  # a head whose logits can stand apart at width 128


# -- DPO ranking ----------------------------------------------------------------------------------


def test_pause_errors_and_ranking():
    from omnistream.train.dpo_pairs import pause_errors, pause_profile, rank

    sr = 24000
    word, gap = _tone(0.4, sr), np.zeros(int(0.3 * sr), np.float32)
    ref = np.concatenate([gap, word, gap, word, gap])
    p = pause_profile(ref, sr)
    assert len(p.pauses) == 1 and abs(p.lead_s - 0.3) < 0.05 and abs(p.speech_s - 1.1) < 0.05
    assert pause_errors(p, p) == 0
    long_gap = np.zeros(int(2.0 * sr), np.float32)
    stutter = np.concatenate([gap, word, long_gap, word, gap, word, gap])
    assert pause_errors(pause_profile(stutter, sr), p) >= 2  # one pause too many, one too long
    assert pause_errors(pause_profile(np.zeros(sr, np.float32), sr), p) >= 1  # silence
    assert rank([0.5, 0.1, 0.9]) == (1, 2)
    assert rank([0.30, 0.35]) is None
    # the same codes scored apart by code2wav's noise are one candidate: no pair from them
    assert rank([0.0, 0.25, 0.6], [[1, 2], [1, 2], [1, 2]]) is None
    # equal codes count by their mean (0.3), against the other codes' 0.1
    assert rank([0.0, 0.6, 0.1], [[1, 2], [1, 2], [1, 3]]) == (2, 0)


def test_sentence_voice_times_each_word_from_pipers_durations():
    """The Talker's targets: the reply spoken whole (the same samples as ``piper``, with silence
    at both ends), and ``speech_units`` from Piper's phoneme durations: every word in one unit,
    in order, words espeak joins ("There are") in one, each unit loud where it is said and the
    units of a reply in time order, across sentences too."""
    pytest.importorskip("piper", reason="the voice needs the data extra")
    pytest.importorskip("onnx", reason="Piper's alignments need the data extra")
    from omnistream.train.voices import _EDGE_S, _group_words, piper, piper_sentence

    assert _group_words([3, 2, 4, 5], [5, 4, 5]) == [2, 1, 1]
    assert _group_words([1, 1, 1], [1, 1, 1]) == [1, 1, 1]
    text = "There are three yellow shapes."
    pcm, sr, units = piper_sentence(text)
    plain, _ = piper(text)
    edge = round(_EDGE_S * sr)
    assert len(pcm) == len(plain) + 2 * edge and np.array_equal(pcm[edge:-edge], plain)
    assert [text[int(a):int(b)] for a, b, _, _ in units] == ["There are", "three", "yellow",
                                                             "shapes"]
    loud = np.abs(pcm) > 0.02 * np.abs(pcm).max()
    for _, _, t0, t1 in units:
        assert t1 > t0 and loud[round(t0 * sr): round(t1 * sr)].mean() > 0.3
    chat = "Hello! I am omnistream, a small model that can see, hear and talk."
    pcm, sr, units = piper_sentence(chat)
    words = [chat[int(a):int(b)] for a, b, _, _ in units]
    assert " ".join(words).split() == ["Hello", "I", "am", "omnistream", "a", "small", "model",
                                       "that", "can", "see", "hear", "and", "talk"]
    starts = [u[2] for u in units]
    assert starts == sorted(starts) and units[-1][3] <= len(pcm) / sr


def test_talker_records_carry_the_sentence_its_units_and_codes(tmp_path):
    """``mini_speech.add_speech``: each record gets its reply's recording (spoken once per distinct
    reply), ``speech_units`` that the data loader turns into codes and reply tokens, and
    ``codec_ids``: the codec's codes of exactly that recording (50 per second)."""
    pytest.importorskip("piper", reason="the voice needs the data extra")
    pytest.importorskip("onnx", reason="Piper's alignments need the data extra")
    from omnistream.codec.encoder import SpeechEncoder
    from omnistream.config import CodecEncoderConfig
    from omnistream.engine.codec import Codec
    from omnistream.media.audio import decode_audio
    from omnistream.train.mini_speech import add_speech

    torch.manual_seed(0)
    enc = SpeechEncoder(CodecEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2))
    codec = Codec(enc.eval(), token2wav=None, speakers={}, model_dir=Path("test"))
    calls = []

    def encode(pcm, sr):
        calls.append(len(pcm))
        return codec.encode(pcm, sample_rate=sr).tolist()

    replies = ["The circle is red.", "I hear four beeps.", "The circle is red."]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "Say it."}, {"role": "assistant", "content": r}]}) + "\n"
        for r in replies))
    assert add_speech(data, tmp_path / "talker.jsonl", encode=encode) == 2
    recs = [json.loads(line) for line in (tmp_path / "talker.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and recs[0]["speech"] == recs[2]["speech"] != recs[1]["speech"]
    for rec, reply in zip(recs, replies, strict=True):
        pcm, sr = decode_audio(str(tmp_path / rec["speech"]))
        assert rec["codec_ids"] == codec.encode(pcm, sample_rate=sr).tolist()
        assert abs(len(rec["codec_ids"]) - 50 * len(pcm) / sr) <= 2
        words = [reply[int(a):int(b)] for a, b, _, _ in rec["speech_units"]]
        assert " ".join(words).split() == reply.rstrip(".").split()


def test_recipe_refuses_seeds_that_reach_the_evaluation_cases(tmp_path):
    from omnistream.train.mini import FRESH_SEEDS, run
    from omnistream.train.tasks import EVAL_SEED_BASE

    with pytest.raises(ValueError, match="evaluation seeds start at"):
        run(tmp_path / "mini", None, seed=EVAL_SEED_BASE - max(FRESH_SEEDS))  # fresh: 1,000,000
    with pytest.raises(ValueError, match="no stage 'stage9'.*stage0_copy, stage0_text"):
        run(tmp_path / "mini", None, until="stage9")
    assert not (tmp_path / "mini").exists()  # refused before anything was written


def test_copy_lists_have_an_empty_system_prompt(tmp_path):
    """The first stage's lists: the records as they are but for the system prompt, which
    renders as an empty system block."""
    from omnistream import chat
    from omnistream.train.mini import copy_lists
    from omnistream.train.tasks import make_dataset

    lists = make_dataset(tmp_path / "rep", 3, 0, families=["repeat"])
    assert copy_lists(lists, tmp_path / "copy.jsonl") == 3
    before = [json.loads(x) for x in lists.read_text().splitlines()]
    after = [json.loads(x) for x in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert all(b["messages"][0]["content"] for b in before)  # the speech system prompt
    for b, a in zip(before, after, strict=True):
        assert a["messages"][0] == {"role": "system", "content": ""}
        assert a["messages"][1:] == b["messages"][1:] and a["family"] == b["family"] == "repeat"
        assert chat.render_chat(a["messages"], add_generation_prompt=False).startswith(
            "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": before[0]["messages"][1:]}) + "\n")
    with pytest.raises(ValueError, match="without a system turn"):
        copy_lists(bad, tmp_path / "out.jsonl")


def test_records_split_by_media(tmp_path):
    from omnistream.train.mini import split_records

    text = {"messages": [{"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello!"}]}
    media = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                          {"role": "assistant", "content": "I hear one beep."}]}
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in (text, media, text)))
    assert split_records(tmp_path / "data.jsonl") == {"text": 2, "media": 1}
    assert json.loads((tmp_path / "media.jsonl").read_text()) == media


def test_recipe_follows_the_papers_order():
    """Each stage starts from an earlier one, its config exists, and the tasks come in the
    paper's order: Thinker stages (text, the encoders' dense pretraining, encoder alignment,
    everything), Talker, Talker DPO."""
    from omnistream.train.mini import (
        BALANCED,
        COPY,
        MERGES,
        MOTION,
        REFRESHED,
        STAGE_DIR,
        STAGES,
        SUMS,
        SUMS_CASES,
        TALKER_REPEAT,
        THINKER,
    )
    from omnistream.train.stages import Stage

    assert STAGES[0][:3] == ("stage0_copy", "mini_0_copy.json", (COPY,))  # copying comes first
    assert f"{TALKER_REPEAT}/data.jsonl" in STAGES[1][2]  # then the lists with the system prompt
    for _, cfg, _, _ in STAGES[:2]:  # a rate at which a toy of the LLM's shape learnt to copy
        assert Stage.from_file(STAGE_DIR / cfg).lr <= 1e-3, cfg
    done, tasks = {"init"}, []
    for i, (name, cfg, data, src) in enumerate(STAGES):
        if src == REFRESHED:  # fresh rows for the tokens new to the LLM, before the alignment
            assert "stage0_hearing" in done and name == "stage1_align"
            done.add(REFRESHED)
        if src == BALANCED:  # the finished Thinker, rescaled for the Talker
            assert THINKER in done and Stage.from_file(STAGE_DIR / cfg).task == "talker"
            done.add(BALANCED)
        if src in MERGES and src not in done:  # a mean of finished stages
            parts = MERGES[src]
            assert len(parts) >= 2 and all(s in done for s, _ in parts), (src, parts)
            assert abs(sum(w for _, w in parts) - 1) < 1e-9, src
            done.add(src)
        assert src in done, (name, src)
        assert data and all(f.endswith(".jsonl") for f in data), name
        stage = Stage.from_file(STAGE_DIR / cfg)
        tasks.append(stage.task)
        if stage.task in ("vision", "hearing"):  # one encoder; later stages keep it slow (the
            # vision tower at most 0.3 of the rate: the last round teaches counting)
            enc = {"vision": "thinker.visual.*", "hearing": "thinker.audio_tower.*"}[stage.task]
            assert stage.trainable == [enc]
            later = [Stage.from_file(STAGE_DIR / c) for _, c, _, _ in STAGES[i + 1 :]]
            top = 0.3 if stage.task == "vision" else 0.1
            assert all(s.lr_scale.get(enc, 1.0) <= top for s in later if s.task == "thinker")
        if stage.task == "thinker":  # batches sorted by length would hold one family each
            assert stage.length_group == 1, f"{cfg}: batches should mix the families"
        done.add(name)
    assert tasks == (["thinker"] * 2 + ["vision", "hearing"] + ["thinker"] * 16
                     + ["talker", "talker_dpo"])
    assert set(MERGES) <= done  # every mean is used
    # the training-only families (colour-kind binding, spoken words) are in the Thinker's mixed
    # stages; the counting stages hold counting cases alone, and a mixed round comes after them
    assert all("aux/data.jsonl" in data for name, _, data, _ in STAGES
               if name.startswith("stage2") and not name.endswith(("count_only", "_motion")))
    assert all(all("count" in f for f in data) for name, _, data, _ in STAGES
               if name.endswith("count_only"))
    data = dict((n, d) for n, _, d, _ in STAGES)
    # the round with sums brings back those that the counting stages made it forget, and every
    # repair of the average holds that round
    assert "arithmetic" in SUMS_CASES
    assert data["stage2j_sums"].count(f"{SUMS}/data.jsonl") == 2
    assert all(set(data["stage2j_sums"]) <= set(d) for n, d in data.items()
               if n.startswith("stage2l_"))
    # the last Thinker stage: the motion clips, beside plain cases of every family
    assert f"{MOTION}/data.jsonl" in data[THINKER] and "data.jsonl" in data[THINKER]
    stage1 = Stage.from_file(STAGE_DIR / dict((n, c) for n, c, _, _ in STAGES)["stage1_align"])
    assert stage1.trainable == ["thinker.audio_tower.*", "thinker.visual.*"]  # LLM frozen


def test_average_mixes_every_float_tensor_and_checks_the_pair(tiny_dir, tmp_path):
    """``mini_model.average``: (1 - w) * a + w * b for every floating-point tensor, the other
    tensors and the config from ``a``; checkpoints of different shapes are refused; ``mix``
    weighs more than two."""
    from omnistream.checkpoint import read_tensors
    from omnistream.maketiny import make_tiny
    from omnistream.train.mini_model import _write_checkpoint, average, mix

    other = make_tiny(tmp_path / "other", seed=1)
    out = average(tiny_dir, other, 0.25, tmp_path / "avg")
    a, b, m = (dict(read_tensors(d)) for d in (tiny_dir, other, out))
    assert m.keys() == a.keys()
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert floats and any(not torch.equal(a[k], b[k]) for k in floats)
    for k, v in m.items():
        want = 0.75 * a[k].float() + 0.25 * b[k].float() if k in floats else a[k]
        assert v.dtype == a[k].dtype, k  # kept in a's dtype
        torch.testing.assert_close(v, want.to(v.dtype))
    assert (out / "config.json").read_text() == (Path(tiny_dir) / "config.json").read_text()
    cfg = json.loads((Path(tiny_dir) / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["intermediate_size"] *= 2
    wide = make_tiny(tmp_path / "wide", seed=1, config=cfg)
    with pytest.raises(ValueError, match="shape"):
        average(tiny_dir, wide, 0.5, tmp_path / "bad")
    less = _write_checkpoint(Path(tiny_dir), tmp_path / "less", dict(list(a.items())[1:]),
                             json.loads((Path(tiny_dir) / "config.json").read_text()))
    for x, y in ((tiny_dir, less), (less, tiny_dir)):  # a tensor missing on either side
        with pytest.raises(ValueError, match="has no tensor"):
            average(x, y, 0.5, tmp_path / "bad")
    with pytest.raises(ValueError, match="outside"):
        average(tiny_dir, other, 1.5, tmp_path / "bad")
    # more than two ("soups"): each weight times its checkpoint; weights that do not sum to 1
    # are refused
    third = make_tiny(tmp_path / "third", seed=2)
    c = dict(read_tensors(third))
    m = dict(read_tensors(mix([(tiny_dir, 0.5), (other, 0.3), (third, 0.2)], tmp_path / "soup")))
    for k in floats:
        want = 0.5 * a[k].float() + 0.3 * b[k].float() + 0.2 * c[k].float()
        torch.testing.assert_close(m[k], want.to(m[k].dtype))
    with pytest.raises(ValueError, match="sum to"):
        mix([(tiny_dir, 0.5), (other, 0.3)], tmp_path / "bad")


def test_recipe_trains_its_last_thinker_stage_from_the_mean_of_the_repairs(tiny_dir, tmp_path,
                                                                            monkeypatch):
    """Resumed with every stage before the last Thinker stage done, the recipe writes the mean
    of the four repairs (``MERGES``) and trains the last stage from it, on its data."""
    import shutil

    from omnistream.checkpoint import read_tensors
    from omnistream.maketiny import make_tiny
    from omnistream.train import mini
    from omnistream.train.loop import STAGE_FILE

    out = tmp_path / "run"
    record = json.dumps({"messages": [{"role": "user", "content": "Hi!"},
                                      {"role": "assistant", "content": "Hello!"}]})
    marks = {f for *_, d, _ in mini.STAGES for f in d} | {
        "media.jsonl", f"{mini.TALKER_REPEAT}/data.jsonl", f"{mini.ROUND}/text.jsonl",
        f"{mini.VISION}/vision.jsonl", f"{mini.HEARING}/hearing.jsonl"}
    for f in marks:  # every data step done
        (out / "data" / f).parent.mkdir(parents=True, exist_ok=True)
        (out / "data" / f).write_text(record + "\n")
    shutil.copytree(tiny_dir, out / "init")
    parts = mini.MERGES["stage2m_soup"]
    for i, (name, *_) in enumerate(mini.STAGES):
        if name == mini.THINKER:
            break
        (out / name).mkdir()
        if name in {s for s, _ in parts}:
            make_tiny(out / name, seed=10 + i)
        (out / name / STAGE_FILE).write_text("{}")
    ran = []

    def fake_train(cmd):
        ran.append(cmd)
        stage_out = Path(cmd[cmd.index("--out") + 1])
        assert json.loads((out / mini.RUNNING).read_text())["step"] == stage_out.name
        shutil.copytree(cmd[cmd.index("--model") + 1], stage_out)
        (stage_out / STAGE_FILE).write_text("{}")

    monkeypatch.setattr(mini, "_run", fake_train)
    assert mini.run(out, None, until=mini.THINKER) == out / mini.THINKER
    (cmd,) = ran
    assert not (out / mini.RUNNING).exists()  # the mark goes with the step that finished
    assert cmd[cmd.index("--model") + 1] == str(out / "stage2m_soup")
    data = cmd[cmd.index("--data") + 1:cmd.index("--model")]
    assert data == [str(out / "data" / f) for f in dict((n, d) for n, _, d, _ in mini.STAGES)[
        mini.THINKER]]
    srcs = [dict(read_tensors(out / s)) for s, _ in parts]
    for k, v in read_tensors(out / "stage2m_soup"):
        if v.is_floating_point():
            want = sum(w * t[k].float() for (_, w), t in zip(parts, srcs, strict=True))
            torch.testing.assert_close(v, want.to(v.dtype))


def test_refresh_draws_again_only_the_rows_of_new_tokens(tiny_dir, tmp_path):
    """``mini_model.refresh``: the embedding rows of the tokens that the new records hold and the
    seen ones do not are drawn again at the spread of the seen tokens' rows; every other tensor
    and row is kept."""
    from omnistream.checkpoint import read_tensors
    from omnistream.train.mini_model import EMBED, record_token_ids, refresh

    def write(name: str, user: str, reply: str) -> Path:
        rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": user}]},
                            {"role": "assistant", "content": reply}]}
        (tmp_path / name).write_text(json.dumps(rec) + "\n")
        return tmp_path / name

    seen = write("seen.jsonl", "What is three plus four?", "Three plus four is seven.")
    new = write("new.jsonl", "What is 3+4?", "Three plus four is seven.")
    tok = Tokenizer.qwen()
    assert record_token_ids([seen], ("assistant",)) == set(tok.encode("Three plus four is seven."))
    stale = record_token_ids([new]) - record_token_ids([seen])
    assert set(tok.encode("3+4")) <= stale and not set(tok.encode(" plus")) & stale
    out, n = refresh(tiny_dir, tmp_path / "out", [new], [seen], seed=1)
    assert n == len(stale)
    before, after = dict(read_tensors(tiny_dir)), dict(read_tensors(out))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k != EMBED)
    changed = (before[EMBED] != after[EMBED]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(stale)
    like = sorted(record_token_ids([seen]))
    spread = before[EMBED][like].float().std()
    drawn = after[EMBED][sorted(stale)].float()
    assert 0.5 * spread < drawn.std() < 2 * spread


def test_recipe_refreshes_the_rows_that_stage_0_never_saw(tiny_dir, tmp_path):
    """The recipe's refresh step reads stage 0's records (the lists and the text) as seen and the
    later Thinker stages' as new: a colour that only the media records or the last Thinker
    stage's say gets a fresh row; a word of stage 0's records, or one that only the Talker's
    records say, does not."""
    import shutil

    from omnistream.checkpoint import read_tensors
    from omnistream.train.mini import (
        COPY,
        FRESH,
        REFRESHED,
        ROUND,
        STAGES,
        TALKER_CLEAR,
        refresh_step,
    )
    from omnistream.train.mini_model import EMBED

    def rec(user: str, reply: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": reply}]})

    for f in {f for *_, d, _ in STAGES for f in d}:
        (tmp_path / "data" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f).write_text(rec("Say hello.", "Hello.") + "\n")
    (tmp_path / "data" / "media.jsonl").write_text(rec("Which color?", "Magenta.") + "\n")
    (tmp_path / "data" / FRESH / "data.jsonl").write_text(rec("Say hello.", "Turquoise.") + "\n")
    # the Talker's records: the Thinker is frozen there, its words need no fresh rows
    (tmp_path / "data" / TALKER_CLEAR).write_text(rec("Say hello.", "Crimson.") + "\n")
    (tmp_path / "data" / COPY).write_text(rec("Say hello.", "Olive.") + "\n")  # stage 0's
    (tmp_path / "data" / ROUND / "data.jsonl").write_text(rec("Say hello.", "Olive.") + "\n")
    shutil.copytree(tiny_dir, tmp_path / "stage0_hearing")
    assert refresh_step(tmp_path, seed=0) > 0
    before = dict(read_tensors(tiny_dir))[EMBED]
    after = dict(read_tensors(tmp_path / REFRESHED))[EMBED]
    tok = Tokenizer.qwen()
    new = set(tok.encode("Which color?")) | set(tok.encode("Magenta.")) | set(
        tok.encode("Turquoise."))
    new -= set(tok.encode("Say hello.")) | set(tok.encode("Hello."))
    assert set(tok.encode("Crimson.")) - set(tok.encode("Hello.")) - new  # a word only it says
    changed = (before != after).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(new)


def test_clear_speech_chooses_the_fewest_errors_then_the_natural_speed():
    from omnistream.train.clear_speech import choose

    assert choose({0.9: 3, 1.0: 2, 1.2: 0}) == 1.2
    assert choose({0.9: 1, 1.0: 1, 1.1: 1}) == 1.0  # a tie keeps the natural speed
    assert choose({0.9: 0, 1.1: 0, 1.3: 2}) == 1.1  # equally near: the slower


def test_clear_speech_takes_the_sums_from_the_true_answers_only(tmp_path):
    """The sums' replies are chosen where they are true answers (the first file), not from the
    counterfactual file's wrong ones; templated families from every file."""
    from omnistream.train.clear_speech import templated_replies

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"family": f, "messages": [
            {"role": "user", "content": "?"}, {"role": "assistant", "content": r}]}) + "\n"
            for f, r in rows))
        return path

    talker = write("talker.jsonl", [("arithmetic", "Two plus two is four."),
                                    ("repeat", "Red four."), ("beeps", "I hear one beep.")])
    counter = write("counter.jsonl", [("arithmetic", "Two plus two is five."),
                                      ("beeps", "I hear two beeps.")])
    assert templated_replies([talker, counter]) == [
        "Two plus two is four.", "I hear one beep.", "I hear two beeps."]
    assert templated_replies([talker, counter], answer_families=()) == [
        "I hear one beep.", "I hear two beeps."]


def test_clear_speech_retargets_the_chosen_replies_only(tmp_path):
    """``clear_speech.retarget``: records whose reply was chosen speak that rendering (its
    recording, Piper's word units at that speed, the codes of exactly that recording); other
    records and the other fields stay as they were."""
    pytest.importorskip("piper", reason="the voice needs the data extra")
    pytest.importorskip("onnx", reason="Piper's alignments need the data extra")
    from omnistream.codec.encoder import SpeechEncoder
    from omnistream.config import CodecEncoderConfig
    from omnistream.engine.codec import Codec
    from omnistream.media.audio import decode_audio
    from omnistream.train.clear_speech import retarget, templated_replies
    from omnistream.train.mini_speech import add_speech

    torch.manual_seed(0)
    enc = SpeechEncoder(CodecEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2))
    codec = Codec(enc.eval(), token2wav=None, speakers={}, model_dir=Path("test"))

    def encode(pcm, sr):
        return codec.encode(pcm, sample_rate=sr).tolist()

    replies = [("beeps", "I hear four beeps."), ("repeat", "Red four."),
               ("beeps", "I hear four beeps.")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"family": f, "messages": [
        {"role": "user", "content": "Say it."}, {"role": "assistant", "content": r}]}) + "\n"
        for f, r in replies))
    talker = tmp_path / "talker.jsonl"
    add_speech(data, talker, encode=encode)
    assert templated_replies([talker]) == ["I hear four beeps."]  # not the repeat family's
    assert retarget([talker], "_c", {"I hear four beeps.": 1.3}, encode) == {"talker_c.jsonl": 2}
    old = [json.loads(x) for x in talker.read_text().splitlines()]
    new = [json.loads(x) for x in (tmp_path / "talker_c.jsonl").read_text().splitlines()]
    assert new[1] == old[1]
    for o, n in ((old[0], new[0]), (old[2], new[2])):
        assert n["messages"] == o["messages"] and n["speech"].startswith("speech_c/")
        pcm, sr = decode_audio(str(tmp_path / n["speech"]))
        assert n["codec_ids"] == codec.encode(pcm, sample_rate=sr).tolist()
        # slower: every word ends later, and the recording is longer
        assert len(n["codec_ids"]) > len(o["codec_ids"]) + 5
        assert [u[:2] for u in n["speech_units"]] == [u[:2] for u in o["speech_units"]]
        assert n["speech_units"][-1][3] > o["speech_units"][-1][3]


def test_pace_reads_the_stages_last_run():
    """``make mini --status``'s pace: seconds per step from the logged ``elapsed_s`` of the
    stage's last run only (the clock starts again on resume), none before two of its steps."""
    from omnistream.train.mini import _pace

    log = [{"step": 10, "elapsed_s": 10.0}, {"step": 20, "elapsed_s": 20.0},
           {"step": 30, "elapsed_s": 4.0}, {"step": 40, "elapsed_s": 6.0}]  # resumed at 20
    assert _pace(log) == 0.2
    assert _pace(log[:2]) == 1.0
    assert _pace(log[:3]) is None and _pace(log[:1]) is None
    paused = log + [{"step": 50, "elapsed_s": 608.0}, {"step": 60, "elapsed_s": 610.0}]
    assert _pace(paused) == 0.2  # ten minutes stopped between steps 40 and 50 count once
    assert _pace([{"step": 5, "step_s": 0.1}, {"step": 6, "step_s": 0.1}]) is None  # no clock


def test_status_names_the_step_in_progress_and_one_whose_process_is_gone(tmp_path):
    """``--status`` during a data step (no training log yet) names it from ``run``'s mark, says
    a stage that is still loading its records is loading, and says a step whose process is
    gone stopped part-way; without a mark no step is in progress."""
    import os
    import subprocess
    import sys

    from omnistream.train.mini import RUNNING, STAGES, status

    (tmp_path / "timings.json").write_text(json.dumps({"data": 120.0}))
    assert "running" not in status(tmp_path) and "data             done      2.0 min" in \
        status(tmp_path)
    mark = {"step": "aux", "pid": os.getpid(), "since": 0.0}
    (tmp_path / RUNNING).write_text(json.dumps(mark))
    assert "  aux              running since" in status(tmp_path)
    stage = STAGES[0][0]
    (tmp_path / RUNNING).write_text(json.dumps(mark | {"step": stage}))
    line = next(x for x in status(tmp_path).splitlines() if x.strip().startswith(stage))
    assert "loading: running since" in line
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / RUNNING).write_text(json.dumps(mark | {"pid": int(gone.stdout)}))
    assert "  aux              stopped part-way" in status(tmp_path)
