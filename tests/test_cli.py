"""The ``omnistream`` command on a tiny checkpoint: the WAV it writes decodes with a standard
reader at 24 kHz with 480 samples per codec token, and it says its weights are random."""

import json
import wave

from omnistream.cli import main


def test_generate_writes_a_24khz_wav(tiny_dir, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Say hello.", "--out", str(out),
               "--max-new-tokens", "8", "--talker-max-new-tokens", "60", "--seed", "0",
               "--json"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "RANDOM weights" in cap.err
    res = json.loads(cap.out.strip().splitlines()[-1])
    n_codes = len(res["codec_ids"])
    assert n_codes > 0 and res["text_ids"]
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() == 480 * n_codes


def test_generate_text_only(tiny_dir, tmp_path, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--no-audio",
               "--max-new-tokens", "4", "--json", "--out", str(tmp_path / "x.wav")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["codec_ids"] == [] and len(res["text_ids"]) <= 4
    assert not (tmp_path / "x.wav").exists()


def test_bench_options_pass_through(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out


def test_chat_keeps_the_conversation(tiny_dir, tmp_path, monkeypatch, capsys):
    lines = iter(["Hello", "/image /no/such/file.png", "And again?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    rc = main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4",
               "--talker-max-new-tokens", "30", "--out-dir", str(tmp_path)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "no such file: /no/such/file.png" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turn000.wav", "turn001.wav"]


def test_generate_quantized(tiny_dir, tmp_path, capsys):
    from omnistream.engine.quant import Int8Linear

    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--quantize", "int8",
               "--max-new-tokens", "4", "--talker-max-new-tokens", "30", "--json",
               "--out", str(tmp_path / "q.wav")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["text_ids"]) >= 1 and (tmp_path / "q.wav").exists()

    from omnistream.engine.session import Engine

    eng = Engine.load(tiny_dir, quiet=True, quantize="int8")
    assert isinstance(eng.thinker.lm_head, Int8Linear) and isinstance(eng.talker.codec_head,
                                                                        Int8Linear)


def test_bad_input_is_one_line_and_leaves_no_file(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    out = tmp_path / "r.wav"
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--video", str(bad),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {bad}" in err and "Traceback" not in err
    assert not out.exists()
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--voice", "Bob"])
    assert rc == 2 and "available: Chelsie, Ethan" in capsys.readouterr().err
