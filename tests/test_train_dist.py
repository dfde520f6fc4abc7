"""Data-parallel training on PyTorch's own stack: ``torchrun --nproc_per_node 2`` (gloo, CPU)
running the training CLI gives the same losses as one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnistream.train.model import read_tensors
from omnistream.train.synth import make_dataset

CONFIGS = Path(__file__).parent.parent / "configs" / "train"


def run_cli(
    nproc: int,
    data: Path,
    model: Path,
    out: Path,
    batch_size: int,
    dist: str,
    steps: int = 3,
    stop_at: int | None = None,
):
    cli = [
        "-m",
        "omnistream.train.cli",
        "--config",
        str(CONFIGS / "full.json"),
        "--data",
        str(data),
        "--model",
        str(model),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--lr",
        "1e-2",
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "1",
        "--dtype",
        "float32",
        "--dist",
        dist,
    ]
    if stop_at is not None:
        cli += ["--stop-at", str(stop_at)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *cli,
        ]
    else:
        cmd = [sys.executable, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in log if "loss" in x], log


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Runs are cached per module (each torchrun start costs seconds): name -> (losses, log)."""
    base = tmp_path_factory.mktemp("dist")
    data = make_dataset(base / "data", n=8, media=True)
    cache: dict = {}

    def get(name: str, nproc: int, batch_size: int, dist: str, **kw):
        if name not in cache:
            cache[name] = run_cli(nproc, data, tiny_dir, base / name, batch_size, dist, **kw)
        return cache[name]

    get.base = base
    get.tiny_dir = tiny_dir
    return get


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, dist):
    one, _ = runs("one", 1, 4, "ddp")
    two, log = runs(f"two_{dist}", 2, 2, dist)
    assert next(x for x in log if x.get("event") == "model")["world"] == 2
    assert len(two) == len(one) == 3
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one, two)
    assert one[-1] < one[0]
    # and the saved checkpoints agree (bf16 on disk, so equal up to a rounding step)
    a, b = read_tensors(runs.base / "one"), read_tensors(runs.base / f"two_{dist}")
    assert a.keys() == b.keys()
    k = "thinker.model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-2, rtol=0)


def test_fsdp_sharded_checkpoint_resumes_exactly(runs):
    whole, _ = runs("two_fsdp", 2, 2, "fsdp")
    first, _ = runs("fsdp_resumed", 2, 2, "fsdp", stop_at=2)
    assert (runs.base / "fsdp_resumed" / "resume" / "dcp" / ".metadata").is_file()  # DCP shards
    assert first == whole[:2]
    second, _ = run_cli(
        2, runs.base / "data" / "train.jsonl", runs.tiny_dir, runs.base / "fsdp_resumed", 2, "fsdp"
    )
    assert second == whole  # the log holds both runs: 2 + 1 steps, equal to the uninterrupted run
