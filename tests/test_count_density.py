"""The count-density loss (``count_weight``): each image token's share of each shape, by colour,
adds up to the image's counts; a Thinker stage trains a training-only readout of it, resumes it
exactly and never saves it in the checkpoint."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from omnistream.train.dense import COLORS, count_density
from omnistream.train.loop import train
from omnistream.train.model import read_tensors
from omnistream.train.stages import Stage
from omnistream.train.tasks import case_rng, make_case, make_dataset


@pytest.mark.parametrize("grid", [(16, 16), (12, 20), (8, 6)])
def test_count_density_adds_up_to_each_colour_count(grid):
    """Whatever the size the encoder sees the image at, its tokens' densities sum to the count
    of each colour, and a shape's share lies on the token that holds its centre."""
    for i in range(8):
        case = make_case("image-count-color", case_rng(3, "image-count-color", i))
        truth = case.record(["x.png"])["image_truth"]
        d = count_density(truth, *grid)  # [tokens, colours]
        assert d.shape == (grid[0] * grid[1] // 4, len(COLORS)) and d.min() >= 0
        counts = Counter(s["color"] for s in truth["shapes"])
        want = torch.tensor([float(counts[c]) for c in COLORS])
        assert torch.allclose(d.sum(0), want, atol=1e-5)
        (w, h), gx = truth["size"], grid[1] // 2
        for s in truth["shapes"]:  # the centre's token shows part of its shape
            cx = int((s["x"] + s["size"] / 2) * grid[1] * 14 / w // 28)
            cy = int((s["y"] + s["size"] / 2) * grid[0] * 14 / h // 28)
            assert d[cy * gx + cx, COLORS.index(s["color"])] > 0


@pytest.fixture(scope="module")
def count_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("count_data")
    return make_dataset(out, {"image-count-color": 6, "spoken-image": 2, "arithmetic": 2},
                        seed=5, progress=False)


def test_count_weight_trains_a_readout_that_resumes_and_is_not_saved(tiny_dir, count_data,
                                                                     tmp_path):
    st = Stage(name="count", trainable=["thinker.*"], batch_size=4, lr=1e-3, warmup_steps=1,
               max_steps=4, length_group=1, count_weight=1.0)
    whole = train(st, count_data, tiny_dir, tmp_path / "whole", verbose=False)
    first = train(st, count_data, tiny_dir, tmp_path / "resumed", stop_at=2, verbose=False)
    second = train(st, count_data, tiny_dir, tmp_path / "resumed", verbose=False)
    # the readout is restored with the rest: a fresh one would change steps 3 and 4
    assert first["losses"] + second["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    plain = train(st.replace(count_weight=0.0), count_data, tiny_dir, tmp_path / "plain",
                  verbose=False)
    assert whole["losses"][0] > plain["losses"][0]  # the count term is in the loss
    assert read_tensors(tmp_path / "whole").keys() == read_tensors(tiny_dir).keys()
