"""Dense encoder pretraining (train/dense.py): each merged image token's ground truth, spoken
words for the audio encoder, stages that learn them, and resuming them."""

from __future__ import annotations

import json

import pytest
import torch

from omnistream.train.dense import (
    COLORS,
    IGNORE,
    KINDS,
    MOTIONS,
    DenseSet,
    evaluate_dense,
    make_hearing_data,
    make_vision_data,
    token_targets,
    train_dense,
)
from omnistream.train.stages import Stage


def test_token_targets_mark_the_tokens_each_shape_covers():
    """A 112 x 112 image seen at its own size: 4 x 4 merged tokens of 28 px. A red square over
    token (0, 1) exactly, a blue circle of 56 px centred on the corner of tokens (2..3, 2..3)."""
    meta = {"size": [112, 112],
            "shapes": [{"kind": "square", "color": "red", "x": 28, "y": 0, "size": 28},
                       {"kind": "circle", "color": "blue", "x": 56, "y": 56, "size": 56}]}
    t = token_targets(meta, 8, 8).reshape(4, 4, 4)
    sq, circ = 1 + KINDS.index("square"), 1 + KINDS.index("circle")
    red, blue = 1 + COLORS.index("red"), 1 + COLORS.index("blue")
    assert t[0, 1].tolist() == [sq, red, 1, IGNORE]  # covered whole, holds the centre (42, 14)
    for r, c in ((2, 2), (2, 3), (3, 2), (3, 3)):
        assert t[r, c, :2].tolist() == [circ, blue]
    assert t[3, 3, 2] == 1 and t[2, 2, 2] == 0  # the centre (84, 84) is in token (3, 3)
    assert int((t[..., 0] > 0).sum()) == 5 and int(t[..., 2].sum()) == 2
    assert (t[..., 3] == IGNORE).all()  # an image has no motion to learn
    # the encoder saw the image at half size: the same shapes on 2 x 2 tokens
    half = token_targets(meta, 4, 4).reshape(2, 2, 4)
    assert half[0, 0, 0] == sq and half[1, 1].tolist() == [circ, blue, 1, IGNORE]


def test_vision_data_is_seeded(tmp_path):
    a = make_vision_data(tmp_path / "a", 5, seed=3, progress=False)
    b = make_vision_data(tmp_path / "b", 5, seed=3, progress=False)
    assert a.read_text() == b.read_text()
    recs = [json.loads(x) for x in a.read_text().splitlines()]
    assert (a.parent / recs[4]["media"]).read_bytes() == (b.parent / recs[4]["media"]).read_bytes()
    assert {r["case"][1] for r in recs} == {"image-count", "image-count-color", "image-color",
                                            "image-shape", "video-motion"}
    assert recs[4]["media"].endswith(".mp4") and recs[4]["motion"] in MOTIONS


def test_a_motion_clip_gives_its_direction_to_the_tokens_that_show_its_shape(tmp_path):
    """The merged tokens that show the shape in a frame pair carry the clip's direction; the
    background and the image heads have no ground truth there."""
    data = make_vision_data(tmp_path, 5, seed=3, progress=False)
    ds = DenseSet("vision", [data], tmp_path)
    px, grid, tgt = ds.batch([3, 4], 2)  # an image, then the clip
    assert grid[1, 0] >= 2  # the clip: two or more frame pairs
    n_img = int(grid[0].prod()) // 4
    clip = tgt[n_img:]
    assert len(clip) == int(grid[1].prod()) // 4
    want = 1 + MOTIONS.index(ds.items[4][1]["motion"])
    assert set(clip[:, 3].tolist()) == {IGNORE, want} and (clip[:, :3] == IGNORE).all()
    per_pair = clip[:, 3].reshape(int(grid[1, 0]), -1)  # one small shape on a plain ground
    moving = (per_pair > 0).sum(1)
    assert (moving >= 1).all() and (moving <= per_pair.shape[1] // 4).all(), moving
    assert (tgt[:n_img, 3] == IGNORE).all() and (tgt[:n_img, :3] >= 0).all()


@pytest.fixture(scope="module")
def vision_data(tmp_path_factory):
    return make_vision_data(tmp_path_factory.mktemp("vision"), 8, seed=0, progress=False)


def _stage(**kw) -> Stage:
    return Stage.from_dict({"name": "v", "task": "vision", "trainable": ["thinker.visual.*"],
                            "batch_size": 4, "lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0,
                            "max_steps": 40, "save_every": 0, "log_every": 1} | kw)


def test_vision_stage_learns_the_tokens_and_saves_only_the_encoder(tiny_dir, vision_data,
                                                                   tmp_path):
    """40 steps on 8 images: the heads read the shapes' kinds off the encoder's tokens far
    better than at the start; the checkpoint changes ``thinker.visual.*`` and nothing else."""
    from omnistream.checkpoint import read_tensors

    out = tmp_path / "v"
    train_dense(_stage(), [vision_data], tiny_dir, out, verbose=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["acc_kind"] > first["acc_kind"] + 0.3  # on the tokens that show a shape
    src, new = dict(read_tensors(tiny_dir)), dict(read_tensors(out))
    assert set(src) == set(new)
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert changed and all(k.startswith("thinker.visual.") for k in changed)
    # read back: the saved encoder with the resume state's heads, on all 8 images
    acc = evaluate_dense(out, [vision_data])
    assert acc["kind_shape"] > first["acc_kind"] + 0.3
    assert 0 <= acc["motion_shape"] <= 1  # the clip among the 8 was scored


def test_vision_stage_resumes_where_it_stopped(tiny_dir, vision_data, tmp_path):
    """3 steps, stop, 3 more (from resume.pt) equal 6 steps in one go. Only the finished stage
    leaves the mark `make mini` skips it for; `make mini --status` tells the two apart."""
    from omnistream.checkpoint import read_tensors
    from omnistream.train.mini import status

    s = _stage(max_steps=6)
    a_dir = tmp_path / "run" / "stage0_vision"  # where `make mini` trains it
    train_dense(s, [vision_data], tiny_dir, a_dir, stop_at=3, verbose=False)
    (tmp_path / "run" / "timings.json").write_text('{"data": 90.0, "stage0_text": 30.0}')
    assert not (a_dir / "train_stage.json").exists()
    said = status(tmp_path / "run").splitlines()
    part_way = [x for x in said if "stage0_vision" in x][0]
    assert part_way.split()[:5] == ["stage0_vision", "step", "3", "of", "6"]
    assert " s a step, about " in part_way and part_way.endswith(" min left)")  # its pace
    assert any(x.split() == ["stage0_hearing", "not", "started"] for x in said)
    assert ["data", "done", "1.5", "min"] in [x.split() for x in said]  # from timings.json
    # a stage is done by its mark, not by a timing
    assert ["stage0_text", "not", "started"] in [x.split() for x in said]
    train_dense(s, [vision_data], tiny_dir, a_dir, verbose=False)
    assert (a_dir / "train_stage.json").exists()
    said = status(tmp_path / "run").splitlines()
    assert any(x.split() == ["stage0_vision", "done"] for x in said)
    train_dense(s, [vision_data], tiny_dir, tmp_path / "b", verbose=False)
    a, b = dict(read_tensors(a_dir)), dict(read_tensors(tmp_path / "b"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_vision_stage_keeps_the_tokens_scale_under_the_rms_limit(tiny_dir, vision_data,
                                                                 tmp_path):
    """With ``media_rms_limit`` the tokens are pulled towards the limit (the Thinker's stages'
    scale) while the heads still learn; without it they drift above. (8 images, no clip: a
    clip adds the motion head's pull, which 40 steps do not settle.)"""
    ten = make_vision_data(tmp_path / "ten", 10, seed=0, progress=False)
    vision_data = ten.with_name("images.jsonl")
    vision_data.write_text("".join(x + "\n" for x in ten.read_text().splitlines() if ".png" in x))
    runs = {}
    for limit in (0.0, 0.05):
        out = tmp_path / f"v{limit}"
        train_dense(_stage(media_rms_limit=limit), [vision_data], tiny_dir, out, verbose=False)
        runs[limit] = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert "rms" not in runs[0.0][-1] and runs[0.05][-1]["rms"] < 2 * 0.05
    assert runs[0.05][-1]["acc_kind"] > runs[0.05][0]["acc_kind"] + 0.2
    from omnistream.train.model import load_model

    scale = {}
    for limit in runs:
        m = load_model(tmp_path / f"v{limit}", with_talker=False)
        px, grid, _ = DenseSet("vision", [vision_data], tiny_dir).batch([0, 1], 2)
        with torch.no_grad():
            scale[limit] = m.thinker.visual(px, grid).pow(2).mean(-1).sqrt().mean().item()
    assert scale[0.05] < 0.7 * scale[0.0], scale


def test_greedy_words_collapse_repeats_and_blanks():
    from omnistream.train.dense import HEARING_WORDS, greedy_words

    ids = {w: i + 1 for i, w in enumerate(HEARING_WORDS)}
    path = [0, ids["three"], ids["three"], 0, ids["three"], ids["plus"], 0, 0, ids["two"]]
    logp = torch.full((len(path), len(HEARING_WORDS) + 2), -9.0)
    logp[torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy_words(logp) == ["three", "three", "plus", "two"]
    assert {"how", "many", "yellow", "triangle", "seventeen", "minus"} <= set(HEARING_WORDS)


@pytest.fixture(scope="module")
def hearing_data(tmp_path_factory):
    pytest.importorskip("piper", reason="spoken utterances need the data extra")
    return make_hearing_data(tmp_path_factory.mktemp("hearing"), 8, seed=0, progress=False)


def test_hearing_stage_learns_the_words_and_saves_only_the_audio_encoder(tiny_dir, hearing_data,
                                                                         tmp_path):
    """The seeded utterances are the task generator's spoken word lists and questions; 40 CTC
    steps on 8 of them cut the loss per word by more than half and change only
    ``thinker.audio_tower.*``."""
    from omnistream.checkpoint import read_tensors

    recs = [json.loads(x) for x in hearing_data.read_text().splitlines()]
    again = make_hearing_data(tmp_path / "again", 8, seed=0, progress=False)
    assert again.read_text() == hearing_data.read_text() and all(r["text"] for r in recs)
    out = tmp_path / "h"
    stage = _stage(task="hearing", trainable=["thinker.audio_tower.*"], media_rms_limit=0.3)
    train_dense(stage, [hearing_data], tiny_dir, out, verbose=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], (log[0], log[-1])
    src, new = dict(read_tensors(tiny_dir)), dict(read_tensors(out))
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert changed and all(k.startswith("thinker.audio_tower.") for k in changed)
    assert set(evaluate_dense(out, [hearing_data])) == {"wer"}


def test_dense_stage_refuses_records_of_the_other_task(tiny_dir, vision_data):
    with pytest.raises(ValueError, match="hearing record needs 'media' and 'text'"):
        DenseSet("hearing", [vision_data], tiny_dir)


def test_dense_stage_trains_only_its_encoder(tiny_dir, vision_data, tmp_path):
    with pytest.raises(ValueError, match=r"trains thinker\.visual\.\*"):
        train_dense(_stage(trainable=["thinker.*"]), [vision_data], tiny_dir, tmp_path / "x",
                    verbose=False)
    assert not (tmp_path / "x").exists()
