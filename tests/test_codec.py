"""The speech codec: features, FSQ, streaming encode = offline, the Codec API's input checks, the
CLI, training stages, and (with the shipped model) the round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from omnistream.codec.encoder import FSQ, SpeechEncoder, StreamingEncoder
from omnistream.codec.features import StreamingSpeechMel, frames_for, speech_mel
from omnistream.config import CodecEncoderConfig
from omnistream.engine.codec import Codec
from omnistream.media.errors import MediaError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "codec"


def _speechlike(seconds: float, seed: int = 0, sr: int = 24000) -> np.ndarray:
    """A voiced, syllable-modulated signal (harmonics of a gliding pitch)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * x * env + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def _encoder(seed: int = 0) -> SpeechEncoder:
    torch.manual_seed(seed)
    return SpeechEncoder(CodecEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2))


def test_mel_shape_and_streaming_equals_offline():
    x = _speechlike(1.37)
    ref = speech_mel(x)
    assert ref.shape == (80, frames_for(x.size)) and ref.shape[1] == 2 * math.ceil(x.size / 480)
    rng = np.random.default_rng(1)
    sm, parts, i = StreamingSpeechMel(), [], 0
    while i < x.size:
        n = int(rng.integers(1, 3000))
        parts.append(sm.push(x[i:i + n]))
        i += n
    parts.append(sm.flush())
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=0, atol=1e-5)


def test_fsq_codes_cover_the_grid():
    fsq = FSQ([8, 5, 5, 5])
    grid = fsq.grid()
    assert grid.shape == (1000, 4)
    assert torch.equal(fsq.to_codes(grid), torch.arange(1000))
    q, codes = fsq(torch.randn(64, 4) * 3)
    assert codes.min() >= 0 and codes.max() < 1000
    assert torch.equal(fsq.to_codes(q), codes)
    # straight-through: gradient reaches the latents
    z = torch.randn(5, 4, requires_grad=True)
    fsq(z)[0].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_streaming_encode_equals_offline():
    enc = _encoder().eval()
    x = _speechlike(3.1, seed=2)
    offline = enc.encode(x)
    assert offline.shape == (math.ceil(x.size / 480),)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        st, parts, i = StreamingEncoder(enc), [], 0
        while i < x.size:
            n = int(rng.integers(100, 5000))
            parts.append(st.push(x[i:i + n]))
            i += n
        parts.append(st.flush())
        assert torch.equal(torch.cat(parts), offline)
    # the window kept is bounded (the stream does not keep the whole utterance)
    assert st.frames.shape[1] <= enc.receptive_frames + 64


def _codec(enc: SpeechEncoder | None) -> Codec:
    return Codec(enc, token2wav=None, speakers={}, model_dir=Path("test"))


def test_bad_input_is_refused_with_its_reason(tmp_path):
    c = _codec(_encoder())
    with pytest.raises(MediaError, match="0.100 s long"):
        c.encode(np.full(2400, 0.1, np.float32), 24000)
    with pytest.raises(MediaError, match="silent"):
        c.encode(np.zeros(24000, np.float32), 24000)
    with pytest.raises(MediaError, match="mono"):
        c.encode(np.zeros((2, 24000), np.float32), 24000)
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    with pytest.raises(MediaError, match="notes.wav"):
        c.encode(str(bad))
    codec = _codec(_encoder())
    for codes, why in (([[1, 2]], "1-D"), ([], "1-D"), ([1.5], "integers"), ([3, 1000], "outside")):
        with pytest.raises(ValueError, match=why):
            codec.check_codes(codes)
    with pytest.raises(ValueError, match="no speech encoder"):
        _codec(None).encode(_speechlike(1.0), 24000)
    from omnistream.train.codec import read_wav
    from omnistream.train.voices import write_wav

    write_wav(tmp_path / "piper.wav", _speechlike(0.5), 22050)  # a training clip not resampled
    with pytest.raises(ValueError, match="piper.wav: expected 24000 Hz, got 22050"):
        read_wav(tmp_path / "piper.wav")


def _codec_dir(tmp_path: Path) -> Path:
    """A small codec checkpoint config (the shipped layout, tiny widths)."""
    cfg = json.loads((REPO / "configs" / "codec" / "config.json").read_text())
    dit = cfg["token2wav_config"]["dit_config"]
    dit.update(hidden_size=64, num_hidden_layers=4, num_attention_heads=1, emb_dim=32)
    cfg["token2wav_config"]["bigvgan_config"]["upsample_initial_channel"] = 32
    cfg["codec_encoder_config"].update(hidden_size=32, intermediate_size=64, num_layers=2)
    d = tmp_path / "codec_cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _corpus(tmp_path: Path, n: int = 3) -> Path:
    from omnistream.train.voices import write_wav

    d = tmp_path / "corpus"
    (d / "clips").mkdir(parents=True)
    lines = []
    for i in range(n):
        write_wav(d / "clips" / f"{i}.wav", _speechlike(1.2 + 0.3 * i, seed=i), 24000)
        text = f"clip {('one', 'two', 'three', 'four')[i % 4]}"
        lines.append(json.dumps({"audio": f"clips/{i}.wav", "text": text}))
    (d / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return d / "corpus.jsonl"


def test_a_corpus_is_found_by_its_folder_and_a_missing_one_is_named(tmp_path):
    from omnistream.train.speech_corpus import load_corpus

    manifest = _corpus(tmp_path, 2)
    assert load_corpus(manifest.parent) == load_corpus(manifest)
    assert Path(load_corpus(manifest)[1]["audio"]) == (manifest.parent / "clips/1.wav").resolve()
    with pytest.raises(FileNotFoundError, match="no speech corpus manifest at .*elsewhere"):
        load_corpus(tmp_path / "elsewhere")
    from omnistream.train.codec import SpeechSet

    by_folder = SpeechSet([manifest.parent], progress=False)  # its mel cache beside the manifest
    assert (manifest.parent / "mel_cache.pt").is_file() and not (tmp_path / "mel_cache.pt").exists()
    assert len(by_folder.mels) == 2 and by_folder.texts == ["clip one", "clip two"]


def test_codec_stages_train_save_resume_and_load_in_the_engine_layout(tmp_path):
    from omnistream.nn.bigvgan import _aa_filter
    from omnistream.train.codec import train_codec
    from omnistream.train.stages import Stage

    _aa_filter.cache_clear()  # as after an inference run: training must not inherit its tensors
    with torch.inference_mode():
        _aa_filter(torch.device("cpu"))
    cfg_dir, data = _codec_dir(tmp_path), _corpus(tmp_path)
    voc = Stage(name="v", task="vocoder", batch_size=2, segment_frames=16, lr=1e-3,
                warmup_steps=1, max_steps=4, log_every=1)
    r = train_codec(voc, [data], cfg_dir, tmp_path / "voc", verbose=False)
    assert len(r["losses"]) == 4 and all(math.isfinite(v) for v in r["losses"])
    st = Stage(name="c", task="codec", batch_size=2, segment_frames=48, lr=1e-3,
               warmup_steps=1, max_steps=6, log_every=1)
    # interrupted after 3 steps, then resumed: the same losses as one run
    full = train_codec(st, [data], tmp_path / "voc", tmp_path / "c_full", verbose=False)
    train_codec(st, [data], tmp_path / "voc", tmp_path / "c_int", stop_at=3, verbose=False)
    resumed = train_codec(st, [data], tmp_path / "voc", tmp_path / "c_int", verbose=False)
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5, abs=1e-6)
    assert full["losses"][-1] < full["losses"][0]
    log_file = tmp_path / "c_full" / "train_log.jsonl"
    log = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert {"fm", "mel_l1", "code_usage"} <= set(log[-1])
    # stages run side by side merge into one codec: c_full's encoder + DiT, voc's vocoder
    from omnistream.checkpoint import read_tensors
    from omnistream.train.codec import merge_vocoder

    merged = merge_vocoder(tmp_path / "c_full", tmp_path / "voc", tmp_path / "merged")
    got = dict(read_tensors(merged))
    for src, prefix in ((tmp_path / "voc", "token2wav.code2wav_bigvgan_model."),
                        (tmp_path / "c_full", "token2wav.code2wav_dit_model."),
                        (tmp_path / "c_full", "codec_encoder.")):
        want = dict(read_tensors(src, prefix=prefix))
        assert want and all(torch.equal(got[k], v) for k, v in want.items())
    # the output loads as a codec, and the encoder trained against the frozen decoder
    codec = Codec.load(tmp_path / "c_full")
    codes = codec.encode(_speechlike(0.9), 24000)
    pcm = codec.decode(codes, steps=2, solver="euler")
    assert pcm.shape == (codes.numel() * 480,) and np.isfinite(pcm).all()
    frozen = Stage(name="e", task="codec_encoder", batch_size=2, segment_frames=48,
                   warmup_steps=1, max_steps=2, log_every=1)
    before = dict(codec.token2wav.state_dict())
    train_codec(frozen, [data], tmp_path / "c_full", tmp_path / "e", verbose=False)
    after = Codec.load(tmp_path / "e").token2wav.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # codec_dit: the DiT alone; the encoder (every code) and the vocoder stay as they were
    dit_only = Stage(name="d", task="codec_dit", batch_size=2, segment_frames=48,
                     warmup_steps=1, max_steps=2, log_every=1)
    train_codec(dit_only, [data], tmp_path / "c_full", tmp_path / "d", verbose=False)
    new = Codec.load(tmp_path / "d")
    assert torch.equal(new.encode(_speechlike(0.9), 24000), codes)
    changed = {k.split(".")[0] for k, v in new.token2wav.state_dict().items()
               if not torch.equal(before[k], v)}
    assert changed == {"code2wav_dit_model"}, changed
    # a deeper DiT starts as the identity of its new blocks: the same audio, then codec_dit
    # trains the new blocks too
    from omnistream.train.codec import grow_dit

    with pytest.raises(ValueError, match="already has 4 layers"):
        grow_dit(tmp_path / "c_full", tmp_path / "g", 4)
    grown = Codec.load(grow_dit(tmp_path / "c_full", tmp_path / "g", 6))
    assert len(grown.token2wav.code2wav_dit_model.transformer_blocks) == 6
    want = codec.decode(codes, steps=2, solver="euler", seed=5)
    # to float rounding: with OMP_NUM_THREADS=1 the audio differs by about 1e-5 though the new
    # blocks' gates are exactly zero (the same model decodes bit for bit twice); a new block
    # that was not the identity would move it by far more
    np.testing.assert_allclose(grown.decode(codes, steps=2, solver="euler", seed=5), want,
                               rtol=0, atol=1e-4)
    train_codec(dit_only, [data], tmp_path / "g", tmp_path / "gd", verbose=False)
    gate = "code2wav_dit_model.transformer_blocks.5.attn_norm.linear.weight"
    assert Codec.load(tmp_path / "gd").token2wav.state_dict()[gate].abs().sum() > 0
    # richer codes: the encoder's trunk stays, 5 FSQ dims give codes past the old 1,000, and
    # the codec stage trains encoder and DiT on them
    from omnistream.train.codec import relevel

    with pytest.raises(ValueError, match="8,192"):
        relevel(tmp_path / "c_full", tmp_path / "r", [16, 16, 16, 16])
    rl = relevel(tmp_path / "c_full", tmp_path / "r", [8, 8, 8, 4, 4])
    rich = Codec.load(rl)
    assert rich.token2wav.code2wav_dit_model.text_embed.codec_embed.num_embeddings == 8193
    old_trunk = dict(read_tensors(tmp_path / "c_full", prefix="codec_encoder.blocks."))
    assert old_trunk and all(torch.equal(rich.encoder.state_dict()[k[len("codec_encoder."):]], v)
                             for k, v in old_trunk.items())
    train_codec(st, [data], rl, tmp_path / "rt", verbose=False)
    rc = Codec.load(tmp_path / "rt").encode(_speechlike(0.9), 24000)
    assert rc.shape == codes.shape and int(rc.max()) < 8192


def test_ctc_supervision_reaches_the_encoder_and_resumes(tmp_path):
    """``ctc_weight``: a character CTC head reads whole clips' codes; its loss falls, its
    gradient changes the encoder, and a resumed run repeats the uninterrupted one."""
    from omnistream.checkpoint import read_tensors
    from omnistream.train.codec import ctc_targets, train_codec
    from omnistream.train.stages import Stage

    ids, lens = ctc_targets(["Red, two!", "a  b"])
    assert lens.tolist() == [7, 3] and ids[:4].tolist() == [19, 6, 5, 1]  # r e d ␣
    with pytest.raises(ValueError, match="no text"):
        ctc_targets(["12."])
    cfg_dir, data = _codec_dir(tmp_path), _corpus(tmp_path)
    base = dict(name="c", task="codec", batch_size=2, segment_frames=48, lr=3e-3,
                warmup_steps=1, max_steps=8, log_every=1)
    full = train_codec(Stage(**base, ctc_weight=1.0), [data], cfg_dir, tmp_path / "ctc",
                       verbose=False)
    log = [json.loads(x) for x in (tmp_path / "ctc" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["ctc"] < log[0]["ctc"]
    train_codec(Stage(**base, ctc_weight=1.0), [data], cfg_dir, tmp_path / "int", stop_at=4,
                verbose=False)
    resumed = train_codec(Stage(**base, ctc_weight=1.0), [data], cfg_dir, tmp_path / "int",
                          verbose=False)
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5, abs=1e-6)
    one = dict(base, max_steps=1)
    train_codec(Stage(**one, ctc_weight=1.0), [data], cfg_dir, tmp_path / "a", verbose=False)
    train_codec(Stage(**one), [data], cfg_dir, tmp_path / "b", verbose=False)
    a, b = (dict(read_tensors(tmp_path / d, prefix="codec_encoder.")) for d in ("a", "b"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="ctc_weight"):
        train_codec(Stage(name="v", task="vocoder", ctc_weight=1.0), [data], cfg_dir,
                    tmp_path / "v", verbose=False)
    with pytest.raises(ValueError, match="frozen Token2Wav"):  # with or without CTC
        train_codec(Stage(name="e", task="codec_encoder"), [data], cfg_dir, tmp_path / "e",
                    verbose=False)


def test_vocoder_learns_from_the_checkpoints_decoded_mel(tmp_path):
    """``vocoder_input: "decoded"``: BigVGAN trains on each clip's round trip (the encoder's
    codes through the DiT, the checkpoint's ODE settings), cut to the recording's frames and
    cached; only the vocoder changes, and a resumed run repeats the uninterrupted one."""
    from omnistream.checkpoint import read_tensors
    from omnistream.train.codec import SpeechSet, train_codec
    from omnistream.train.stages import Stage

    cfg_dir, data = _codec_dir(tmp_path), _corpus(tmp_path)
    with pytest.raises(ValueError, match="vocoder_input 'decoded' needs"):  # nothing trained
        train_codec(Stage(name="v", task="vocoder", vocoder_input="decoded"), [data], cfg_dir,
                    tmp_path / "x", verbose=False)
    base = dict(name="c", task="codec", batch_size=2, segment_frames=48, warmup_steps=1,
                max_steps=2)
    train_codec(Stage(**base), [data], cfg_dir, tmp_path / "c", verbose=False)
    with pytest.raises(ValueError, match="vocoder_input 'decoded' needs"):
        train_codec(Stage(**base, vocoder_input="decoded"), [data], tmp_path / "c",
                    tmp_path / "x", verbose=False)
    with pytest.raises(ValueError, match="vocoder_input must be"):
        train_codec(Stage(name="v", task="vocoder", vocoder_input="mels"), [data],
                    tmp_path / "c", tmp_path / "x", verbose=False)
    voc = Stage(name="v", task="vocoder", vocoder_input="decoded", batch_size=2,
                segment_frames=16, lr=1e-3, warmup_steps=1, max_steps=4, log_every=1, seed=3)
    full = train_codec(voc, [data], tmp_path / "c", tmp_path / "v", verbose=False)
    assert all(math.isfinite(v) for v in full["losses"])
    # the cache holds what the checkpoint decodes: clip 1's codes, the DiT, noise seeded per clip
    cached = torch.load(tmp_path / "v" / "decoded_mels.pt")
    clips = SpeechSet([data], progress=False)
    codec = Codec.load(tmp_path / "c")
    voice = codec.voice()
    codes = codec.encoder.encode(clips.wavs[1])[None]
    want = codec.token2wav.sample(codes, voice.cond, voice.ref_mel, *codec.config.decode_options(),
                                  generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))[0]
    assert [m.shape for m in cached] == [m.shape for m in clips.mels]
    torch.testing.assert_close(cached[1], want[:, :clips.mels[1].shape[1]])
    assert (cached[1] - clips.mels[1]).abs().mean() > 0.1  # not the recording's mel
    train_codec(voc, [data], tmp_path / "c", tmp_path / "vi", stop_at=2, verbose=False)
    resumed = train_codec(voc, [data], tmp_path / "c", tmp_path / "vi", verbose=False)
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5, abs=1e-6)
    before, after = (dict(read_tensors(d)) for d in (tmp_path / "c", tmp_path / "v"))
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"code2wav_bigvgan_model"}, changed


def test_cli_encode_decode_and_errors_write_nothing(tmp_path, capsys):
    from omnistream.cli import main
    from omnistream.train.codec import train_codec
    from omnistream.train.stages import Stage
    from omnistream.train.voices import write_wav

    cfg_dir, data = _codec_dir(tmp_path), _corpus(tmp_path, 2)
    st = Stage(name="c", task="codec", batch_size=1, segment_frames=48, warmup_steps=1,
               max_steps=1)
    train_codec(st, [data], cfg_dir, tmp_path / "m", verbose=False)
    wav = tmp_path / "in.wav"
    write_wav(wav, _speechlike(1.1), 24000)
    assert main(["codec", "encode", str(wav), "--model", str(tmp_path / "m"), "-o",
                 str(tmp_path / "c.json")]) == 0
    codes = json.loads((tmp_path / "c.json").read_text())["codes"]
    assert len(codes) == math.ceil(int(1.1 * 24000) / 480)
    out = tmp_path / "out.wav"
    assert main(["codec", "decode", str(tmp_path / "c.json"), "--model", str(tmp_path / "m"),
                 "-o", str(out)]) == 0
    import wave

    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == len(codes) * 480
    (tmp_path / "bad.json").write_text(json.dumps({"codes": [1, 5000]}))
    bad_out = tmp_path / "bad.wav"
    assert main(["codec", "decode", str(tmp_path / "bad.json"), "--model",
                 str(tmp_path / "m"), "-o", str(bad_out)]) == 2
    assert "outside" in capsys.readouterr().err and not bad_out.exists()
    write_wav(tmp_path / "short.wav", _speechlike(0.1), 24000)
    assert main(["codec", "encode", str(tmp_path / "short.wav"), "--model", str(tmp_path / "m"),
                 "-o", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model")
def test_shipped_codec_round_trip():
    """Encode -> decode speech of the shipped voice: spectrally close always, and intelligible
    to the independent recognizer where the eval extra is installed."""
    from omnistream.eval import recognizer
    from omnistream.eval.codec import mcd
    from omnistream.train.voices import MissingToolError, piper

    codec = Codec.load(SHIPPED)
    text = "There are three green shapes."
    try:
        pcm, sr = piper(text)
    except MissingToolError:
        pytest.skip("piper (data extra) not installed")
    from omnistream.media.audio import resample

    x = resample(pcm, sr, 24000)
    y = codec.decode(codec.encode(x, 24000))  # its own decode settings (token2wav_config)
    d = mcd(x, y)
    print(f"shipped codec round trip: MCD {d:.2f} dB")
    assert d < 3.0  # 1.6 dB over 100 held-out sentences; noise or a broken codec gives > 6
    if recognizer.available():
        heard = recognizer.transcribe(y, 24000)
        print(f"recognizer: {heard!r}")
        # the shipped v1 codec's round-trip WER is about 20% over 100 held-out sentences (docs)
        assert recognizer.wer([text], [heard]) <= 0.4


def test_talker_records_give_speech_as_audio(tmp_path, tiny_dir):
    """A talker record's ``speech`` file becomes its codec targets through the codec; a bad one
    is a reported bad record, and without a codec the record names what is missing."""
    from omnistream.checkpoint import load_config
    from omnistream.tokenizer import Tokenizer
    from omnistream.train.data import Dataset
    from omnistream.train.voices import write_wav

    codec = _codec(_encoder().eval())
    x = _speechlike(0.8, seed=3)
    write_wav(tmp_path / "reply.wav", x, 24000)
    write_wav(tmp_path / "short.wav", x[:1000], 24000)
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    (tmp_path / "d.jsonl").write_text("\n".join(
        json.dumps({"messages": msgs, "speech": s}) for s in ("reply.wav", "short.wav")) + "\n")
    tok, cfg = Tokenizer.from_dir(tiny_dir), load_config(tiny_dir).thinker_config
    ds = Dataset(tmp_path / "d.jsonl", tok, cfg, "talker", log=lambda _: None,
                 speech_codes=lambda p: codec.encode(p).tolist())
    assert len(ds) == 1 and ds.examples[0].codes == codec.encode(x, 24000).tolist()
    assert len(ds.errors) == 1 and "short.wav" in ds.errors[0]
    with pytest.raises(ValueError, match="no usable records"):
        Dataset(tmp_path / "d.jsonl", tok, cfg, "talker", log=lambda _: None)


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model")
def test_codec_eval_draws_a_new_noise_for_each_clip(tmp_path, monkeypatch):
    """Clip i of ``codec eval --seed S`` is decoded from seed S + i (the engine draws one per
    session), so the figure averages over noises instead of resting on one draw."""
    pytest.importorskip("piper", reason="held-out clips need the data extra")
    from omnistream.eval.codec import evaluate_codec

    seeds: list[int] = []
    decode_stream = Codec.decode_stream

    def spy(self, codes, voice=None, **kw):
        seeds.append(kw["seed"])
        return decode_stream(self, codes, voice, **kw)

    monkeypatch.setattr(Codec, "decode_stream", spy)
    res = evaluate_codec(SHIPPED, n=3, cache=tmp_path / "clips", recognize=False,
                         progress=False, seed=40)
    assert seeds == [40, 41, 42] and res["seed"] == 40


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model")
def test_codec_eval_splits_the_error_between_vocoder_and_codes(tmp_path):
    """``codec eval --vocoder-wer`` also scores the vocoder on each clip's own mel: on the
    shipped codec that is near the original's WER, while a vocoder of random weights is not."""
    pytest.importorskip("piper", reason="held-out clips need the data extra")
    from omnistream.eval import recognizer
    from omnistream.eval.codec import evaluate_codec

    if not recognizer.available():
        pytest.skip("the recognizer (eval extra) is not installed")
    kw = dict(n=3, cache=tmp_path / "clips", progress=False, vocoder_wer=True)
    res = evaluate_codec(SHIPPED, **kw)
    assert res["wer_vocoder"] <= res["wer_original"] + 0.15
    broken = tmp_path / "broken"
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(SHIPPED, broken)
    sd = load_file(broken / "model.safetensors")
    voc = "token2wav.code2wav_bigvgan_model."
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05 if k.startswith(voc) and v.dim() > 1
              else v) for k, v in sd.items()}
    save_file(sd, str(broken / "model.safetensors"))
    assert evaluate_codec(broken, **kw)["wer_vocoder"] >= 0.5


def test_an_encoder_trained_for_a_release_checkpoint_is_attached_to_it(tiny_dir, tmp_path):
    """The release's users: ``codec_encoder`` trains a speech encoder against a checkpoint
    that has none (the tiny model, released layout), its Token2Wav frozen; ``attach`` joins it
    to that checkpoint in a new folder (the model's files linked, the model left as it was), so
    the training loader encodes recordings with it. An encoder trained against another
    Token2Wav is refused."""
    from omnistream.checkpoint import load_config, read_tensors
    from omnistream.train.codec import attach, train_codec
    from omnistream.train.loop import _speech_codes
    from omnistream.train.stages import Stage

    data = _corpus(tmp_path)
    stage = Stage(name="e", task="codec_encoder", batch_size=2, segment_frames=48,
                  warmup_steps=1, max_steps=2, log_every=1)
    assert load_config(tiny_dir).codec_encoder_config is None
    train_codec(stage, [data], tiny_dir, tmp_path / "enc", verbose=False)
    dit = "token2wav.code2wav_dit_model."
    before, after = (dict(read_tensors(d, prefix=dit)) for d in (tiny_dir, tmp_path / "enc"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].float(), after[k]) for k in before)
    out = attach(tmp_path / "enc", tiny_dir, tmp_path / "att")
    assert load_config(tiny_dir).codec_encoder_config is None  # the model is unchanged
    cfg = load_config(out)
    assert cfg.codec_encoder_config == CodecEncoderConfig()
    assert cfg.thinker_config == load_config(tiny_dir).thinker_config
    assert (out / "spk_dict.pt").is_symlink() and (out / "tokenizer.json").is_symlink()
    x = _speechlike(1.0)
    want = Codec.load(tmp_path / "enc").encode(x, 24000)
    assert torch.equal(Codec.load(out).encode(x, 24000), want)
    tiny_talker, out_talker = (dict(read_tensors(d, prefix="talker.")) for d in (tiny_dir, out))
    assert out_talker.keys() == tiny_talker.keys()
    assert all(torch.equal(v, tiny_talker[k]) for k, v in out_talker.items())
    from omnistream.train.voices import write_wav

    write_wav(tmp_path / "reply.wav", x, 24000)
    assert _speech_codes(out, cfg)(tmp_path / "reply.wav") == want.tolist()
    other = _codec_dir(tmp_path)
    train_codec(Stage(name="c", task="codec", batch_size=2, segment_frames=48, warmup_steps=1,
                      max_steps=1), [data], other, tmp_path / "other", verbose=False)
    with pytest.raises(ValueError, match="another Token2Wav"):
        attach(tmp_path / "other", tiny_dir, tmp_path / "att2")
