"""``omnistream bench``: the parts that must keep working (no timings are checked here)."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from omnistream.cli import main


def test_bench_without_transformers_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a plain install
    assert main(["bench", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'omnistream[test]'" in err and "Traceback" not in err


def test_answer_checkpoint_is_045b():
    from omnistream.bench.answer import answer_config
    from omnistream.checkpoint import build_component
    from omnistream.config import OmniConfig

    cfg = answer_config()
    thinker = build_component("thinker", OmniConfig.from_dict(cfg))
    n = sum(p.numel() for p in thinker.parameters())
    assert 0.44e9 < n < 0.46e9 and not cfg["enable_audio_output"]


def test_answer_probes_give_the_same_reply(tiny_dir, monkeypatch, capsys):
    """The two whole-process probes render the same prompt and produce the same greedy reply
    (ours in a fresh process as the bench runs it; the reference's script in this process, where
    transformers is already imported)."""
    import json

    from omnistream.bench.answer import OURS, PROMPT, REF, SYSTEM, run_process

    args = [str(tiny_dir), "5", SYSTEM, PROMPT]
    _, peak, ours = run_process(OURS, args)
    monkeypatch.setattr(sys, "argv", ["-c", *args])
    exec(compile(REF, "<reference probe>", "exec"), {"__name__": "__main__"})
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["tokens"] == ref["tokens"] == 5 and ours["prompt"] == ref["prompt"]
    assert ours["text"] == ref["text"]
    assert peak > 0 and ref["peak"] > 0


def test_features_row():
    from omnistream.bench.common import Bench

    args = argparse.Namespace(features_seconds=1.0, repeats=1, quiet=True)
    b = Bench(args, torch.device("cpu"), torch.float32)
    from omnistream.bench.features import bench_features, bench_stored_image

    bench_features(b, "features")
    bench_stored_image(b, "features")  # raises if the uint8 path stores other pixels
    features, image = b.rows
    assert features.ours > 0 and features.ref > 0 and "max |diff|" in features.note
    assert image.ours > 0 and image.ref > 0


def test_serve_load_test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--help"])
    assert e.value.code == 0 and "--clients" in capsys.readouterr().out
