"""Training data: record validation, labels on the assistant's text only, media placeholders,
padding, and media stored packed with every bit coming back.

On the tiny random checkpoint with the synthetic set of ``train.synth.make_dataset``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from omnistream.tokenizer import Tokenizer
from omnistream.train.data import IGNORE, Dataset, collate
from omnistream.train.synth import codes_for

# -- data ----------------------------------------------------------------------------------------


def test_bad_records_are_skipped_and_reported(tiny_dir, data, tmp_path):
    good = data.read_text().splitlines()[0]
    bad = [
        "{not json",
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),  # no reply
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok"},
                ],
                "codec_ids": [1, 99999],
            }
        ),
    ]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad.append(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        )
    )
    for f in data.parent.iterdir():
        if f.suffix in (".png", ".wav"):
            shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, *bad, good]) + "\n")
    tok = Tokenizer.from_dir(tiny_dir)
    from omnistream.config import OmniConfig

    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    logged = []
    ds = Dataset(path, tok, cfg, log=logged.append)
    assert len(ds) == 2
    lines = [int(e.split(":")[1]) for e in ds.errors]
    assert lines == [2, 3, 4, 5, 6, 7, 8], ds.errors
    assert all(e.startswith(str(path)) for e in ds.errors)
    assert (
        "invalid JSON" in ds.errors[0]
        and "not found" in ds.errors[3]
        and "[0, 8292)" in ds.errors[5]
    )
    assert "bad image" in ds.errors[6]
    assert len(logged) == 7 and logged[0] == {"event": "bad_record", "where": f"{path}:2",
                                             "error": ds.errors[0].split(": ", 1)[1]}
    # the talker task needs codes: records without them are reported, not fatal
    ds = Dataset(path, tok, cfg, task="talker", log=lambda _: None)
    assert len(ds) == 2


def test_loading_shows_progress_per_file(tiny_dir, data, capsys):
    from omnistream.config import OmniConfig

    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    n = len(data.read_text().splitlines())
    Dataset(data, Tokenizer.from_dir(tiny_dir), cfg, progress=True)
    err = capsys.readouterr().err
    assert f"loading {data.parent.name}/{data.name}" in err and f"{n}/{n}" in err
    Dataset(data, Tokenizer.from_dir(tiny_dir), cfg)  # quiet by default
    assert capsys.readouterr().err == ""


def test_labels_cover_assistant_text_only(tiny_dir, tmp_path):
    tok = Tokenizer.from_dir(tiny_dir)
    from omnistream.config import OmniConfig

    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    rec = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    ex = Dataset(tmp_path / "d.jsonl", tok, cfg).examples[0]
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye<|im_end|>\n"
    )
    assert ex.input_ids == tok.encode(text)
    # labels[t] is the target of position t: exactly the assistant tokens and their <|im_end|>
    targets = [ex.input_ids[t + 1] for t in range(len(ex.labels)) if ex.labels[t] != IGNORE]
    assert all(ex.labels[t] in (IGNORE, ex.input_ids[t + 1]) for t in range(len(ex.labels) - 1))
    im_end = tok.special.im_end
    assert targets == tok.encode("Hello there") + [im_end] + tok.encode("Goodbye") + [im_end]
    assert tok.decode(ex.input_ids[ex.reply_start : ex.reply_start + ex.reply_len]) == "Goodbye"


def test_media_records_expand_placeholders(tiny_dir, data):
    tok = Tokenizer.from_dir(tiny_dir)
    from omnistream.config import OmniConfig

    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    ds = Dataset(data, tok, cfg, task="talker")
    assert len(ds) == 16 and not ds.errors
    ex = ds.examples[1]  # image + spoken question
    kinds = [k for k, _ in ex.media]
    assert kinds == ["image", "audio"]
    for kind, item in ex.media:
        tid = {"image": tok.special.image, "audio": tok.special.audio}[kind]
        assert ex.input_ids.count(tid) == item.n_tokens > 0
    assert ex.position_ids.shape == (3, len(ex.input_ids))
    assert ex.codes == codes_for(
        tok.decode(ex.input_ids[ex.reply_start : ex.reply_start + ex.reply_len])
    )
    # records that show the same file (here: the same records twice): media processed once
    twice = Dataset([data, data], tok, cfg, task="talker")
    a, b = twice.examples[1], twice.examples[1 + len(ds)]
    assert a.media[0][1] is b.media[0][1] and a.input_ids == b.input_ids


def test_padded_batches_train_only_their_real_tokens(tiny_dir, data, monkeypatch):
    """A right-padded batch's ``lengths`` send only the real tokens through the LLM's
    projections and MLPs (``TextModel.forward(lengths=...)``): the loss and every gradient
    equal the padded computation's, and the padded outputs are zeros."""
    from omnistream.nn.text import Attention
    from omnistream.train.losses import thinker_loss, thinker_states
    from omnistream.train.model import load_model

    m = load_model(tiny_dir, with_talker=False)
    tok = Tokenizer.from_dir(tiny_dir)
    ds = Dataset(data, tok, m.cfg.thinker_config, log=lambda _: None)
    batch = collate(ds.examples[:6], tok.special.pad)
    lengths = batch["lengths"]
    assert lengths.tolist() == [len(e.input_ids) for e in ds.examples[:6]]
    assert lengths.min() < lengths.max()  # the batch has padding to skip
    calls = []
    real_fwd = Attention.forward_tokens
    monkeypatch.setattr(Attention, "forward_tokens",
                        lambda self, *a: calls.append(1) or real_fwd(self, *a))

    def run(b):
        m.zero_grad(set_to_none=True)
        loss, n = thinker_loss(m.thinker, b, media_rms_limit=0.3, media_std_floor=0.15)
        loss.backward()
        return float(loss), n, {k: p.grad.clone() for k, p in m.named_parameters()
                                if p.grad is not None}

    l1, n1, g1 = run(batch)
    assert len(calls) == len(m.thinker.model.layers)
    l0, n0, g0 = run({k: v for k, v in batch.items() if k != "lengths"})
    assert len(calls) == len(m.thinker.model.layers)  # no lengths: the padded path
    assert n1 == n0 and l1 == pytest.approx(l0, rel=1e-6)
    assert g1.keys() == g0.keys() and any(k.startswith("thinker.visual.") for k in g1)
    for k in g1:
        assert torch.allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7), k
    with torch.no_grad():
        hidden, _ = thinker_states(m.thinker, batch)
    pad = torch.arange(hidden.shape[1])[None] >= lengths[:, None]
    assert pad.any() and hidden[pad].abs().max() == 0


def test_stored_media_come_back_with_the_same_bits(tiny_dir, data):
    """Images are kept packed (uint8 indices per colour channel) and a batch gets exactly the
    processor's float32 patches back."""
    from omnistream.config import OmniConfig
    from omnistream.train.data import PackedPixels, collate_media, encode, validate

    tok = Tokenizer.from_dir(tiny_dir)
    cfg = OmniConfig.from_file(tiny_dir / "config.json").thinker_config
    ds = Dataset(data, tok, cfg)
    lines = data.read_text().splitlines()
    n_images = 0
    for ex in ds.examples:
        if not ex.media:
            continue
        rec = json.loads(lines[int(ex.where.rsplit(":", 1)[1]) - 1])
        fresh = collate_media(encode(validate(rec, data.parent), tok, cfg, data.parent).media)
        kept, batch = collate_media(ex.media), collate([ex], tok.special.pad)["media"]
        for kind in ("image", "video", "audio"):
            for k, a, b in zip(kept[kind], batch[kind], fresh[kind], strict=True):
                if kind == "audio":
                    assert torch.equal(a.features, b.features)
                    continue
                if kind == "image":
                    n_images += 1
                    assert isinstance(k.pixel_values, PackedPixels)
                    assert 4 * k.pixel_values.index.nbytes == b.pixel_values.nbytes
                assert a.pixel_values.dtype == torch.float32
                assert torch.equal(a.pixel_values, b.pixel_values), (kind, ex.where)
    assert n_images > 0


def test_pixels_pack_only_when_every_bit_comes_back():
    from omnistream.media.image import normalize, patchify
    from omnistream.train.data import PackedPixels, pack_pixels

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 28, 56), dtype=torch.uint8, generator=g)
    x, _ = patchify(normalize(frames))  # [8, 1176], as the processor makes them
    packed = pack_pixels(x)
    assert isinstance(packed, PackedPixels) and packed.index.dtype == torch.uint8
    assert torch.equal(packed.unpack().view(torch.int32), x.view(torch.int32))
    every = (torch.arange(2 * 28 * 56) % 256).to(torch.uint8).reshape(2, 1, 28, 56)  # each level
    every = every.expand(2, 3, 28, 56)
    assert isinstance(pack_pixels(patchify(normalize(every))[0]), PackedPixels)
    lo, hi = normalize(torch.tensor([0, 1], dtype=torch.uint8).view(1, 1, 1, 2).expand(
        1, 3, 1, 2))[0, 0, 0]  # channel 0's two lowest levels
    top = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))[0, 0, 0, 0]
    for bad in ((lo + hi) / 2, top + 1):  # between two levels; past the highest (its index
        # would be 256, clamped to 255)
        y = x.clone()
        y[3, 5] = bad  # a channel-0 column
        assert pack_pixels(y) is y
