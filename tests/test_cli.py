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


# -- issue 15: causes named, defaults that work from anywhere ------------------------------------


def _wav(path, seconds=1.0):
    import numpy as np

    from omnistream.engine.wav import wav_bytes

    t = np.arange(int(24000 * seconds)) / 24000
    path.write_bytes(wav_bytes((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)))
    return path


def test_spoken_question_without_prompt(tiny_dir, tmp_path, capsys):
    q = _wav(tmp_path / "question.wav")
    rc = main(["generate", "--model", str(tiny_dir), "--audio", str(q), "--no-audio",
               "--max-new-tokens", "2", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 151646 in res["prompt_ids"]  # <|AUDIO|>
    assert main(["generate", "--model", str(tiny_dir)]) == 2
    assert "give --prompt, --audio, --image or --video" in capsys.readouterr().err


def test_play_without_sounddevice_fails_before_any_output(tiny_dir, tmp_path, monkeypatch,
                                                          capsys):
    import sys

    out = tmp_path / "r.wav"
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--play", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'omnistream[audio]'" in err and "Traceback" not in err
    assert not out.exists()

    fake = _FakeSoundDevice(devices=False)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--play", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "no audio output device" in err and "Error querying device -1" in err
    assert not out.exists()


def test_play_streams_what_the_wav_holds(tiny_dir, tmp_path, monkeypatch, capsys):
    import sys

    import numpy as np

    fake = _FakeSoundDevice()
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    out = tmp_path / "r.wav"
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--play", "--out",
               str(out), "--max-new-tokens", "4", "--talker-max-new-tokens", "30", "--seed", "0"])
    assert rc == 0, capsys.readouterr().err
    from omnistream.engine.wav import pcm16

    with wave.open(str(out)) as w:
        wav = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    # as PCM16, with the silence of underruns (the fake device never waits) left out
    played = np.frombuffer(pcm16(np.concatenate(fake.played)[:, 0]), "<i2")
    assert fake.closed and np.count_nonzero(wav) > 0
    assert np.array_equal(played[played != 0], wav[wav != 0])


class _FakeSoundDevice:
    """The parts of ``sounddevice`` the player uses; plays into ``played`` on a thread."""

    class PortAudioError(Exception):
        pass

    class CallbackStop(Exception):  # noqa: N818 - sounddevice's name
        pass

    def __init__(self, devices: bool = True):
        self.devices = devices
        self.played: list = []
        self.closed = False

    def check_output_settings(self, **kw):
        if not self.devices:
            raise self.PortAudioError("Error querying device -1")

    def OutputStream(self, samplerate, channels, dtype, callback, finished_callback):  # noqa: N802
        import threading

        import numpy as np

        fake = self

        class Stream:
            def start(self):
                def run():
                    import time

                    while True:
                        buf = np.full((512, channels), np.nan, dtype=np.float32)
                        try:
                            callback(buf, 512, None, None)
                        except fake.CallbackStop:
                            fake.played.append(buf)
                            break
                        if buf.any():  # underruns (all silence) are not kept: bounded memory
                            fake.played.append(buf)
                        time.sleep(0.005)  # about 4x real time, as a device paces its callbacks
                    finished_callback()

                self.t = threading.Thread(target=run, daemon=True)
                self.t.start()

            def close(self):
                fake.closed = True

        return Stream()


def test_missing_extra_names_the_module_and_the_extra(monkeypatch, capsys):
    import sys

    import omnistream

    monkeypatch.setattr(omnistream, "serve", getattr(omnistream, "serve", None), raising=False)
    for name in [m for m in sys.modules if m.startswith("omnistream.serve")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "fastapi" in err and "pip install 'omnistream[serve]'" in err

    monkeypatch.setitem(sys.modules, "omnistream.train.cli", None)
    assert main(["train", "--config", "x"]) == 2
    assert "cannot import omnistream.train.cli" in capsys.readouterr().err


def test_default_model_resolution(tiny_dir, tmp_path, monkeypatch, capsys):
    import pytest

    from omnistream import models
    from omnistream.checkpoint import CheckpointError

    # the repository's tiny/, else nothing (models/omni-mini first when it exists)
    repo = tmp_path / "repo"
    monkeypatch.setattr(models, "REPO_ROOT", repo)
    monkeypatch.delenv(models.ENV_VAR, raising=False)
    with pytest.raises(CheckpointError, match=r"omnistream make-tiny .*repo/tiny.*make demo"):
        models.default_model()
    for d in ("tiny", "models/omni-mini"):
        (repo / d).mkdir(parents=True)
        (repo / d / "config.json").write_text("{}")
        assert models.default_model() == str(repo / d)
    monkeypatch.setenv(models.ENV_VAR, str(tiny_dir))
    assert models.default_model() == str(tiny_dir)
    assert models.resolve_model("elsewhere") == "elsewhere"

    # generate without --model, from another directory
    monkeypatch.chdir(tmp_path)
    rc = main(["generate", "--prompt", "Hi", "--no-audio", "--max-new-tokens", "2", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text_ids"]
    monkeypatch.delenv(models.ENV_VAR)
    (repo / "models/omni-mini/config.json").unlink()
    (repo / "tiny/config.json").unlink()
    assert main(["chat"]) == 2
    assert "no default model found" in capsys.readouterr().err


def test_trained_checkpoint_drops_the_random_weights_marker(tiny_dir, tmp_path):
    from omnistream.engine.session import Engine
    from omnistream.models import RANDOM_WEIGHTS_MARKER
    from omnistream.train.model import read_tensors, save_released

    assert (tiny_dir / RANDOM_WEIGHTS_MARKER).exists()
    out = tmp_path / "trained"
    out.mkdir()
    (out / RANDOM_WEIGHTS_MARKER).write_text("stale")  # even one left in the output folder
    k = "thinker.lm_head.weight"
    save_released(out, tiny_dir, {k: read_tensors(tiny_dir, (k,))[k] + 1})
    assert not (out / RANDOM_WEIGHTS_MARKER).exists()
    assert not Engine.load(out, quiet=True, audio_output=False).random_weights


def test_trained_checkpoint_keeps_its_own_training_log(tiny_dir, tmp_path):
    # a stage trained from a previous stage's output: saving must not copy that stage's log
    import shutil

    from omnistream.train.model import read_tensors, save_released

    src = tmp_path / "prev"
    shutil.copytree(tiny_dir, src)
    (src / "train_log.jsonl").write_text('{"stage": "previous"}\n')
    (src / "train_stage.json").write_text('{"name": "previous"}\n')
    out = tmp_path / "next"
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"stage": "next"}\n')
    k = "thinker.lm_head.weight"
    save_released(out, src, {k: read_tensors(src, (k,))[k]})
    assert (out / "train_log.jsonl").read_text() == '{"stage": "next"}\n'
    assert not (out / "train_stage.json").exists() and (out / "config.json").is_file()


def test_media_parts_keep_the_command_line_order():
    """``--image A --audio B`` asks about A in the words of B: the prompt holds the parts in the
    order given (the tasks' spoken-image questions put the image first)."""
    from omnistream.cli import _build_parser, _messages

    args = _build_parser().parse_args(["generate", "--image", "a.png", "--audio", "q.wav",
                                       "--video", "v.mp4", "--image", "b.png", "--prompt", "?"])
    assert _messages(args)[-1]["content"] == [
        {"type": "image", "image": "a.png"}, {"type": "audio", "audio": "q.wav"},
        {"type": "video", "video": "v.mp4"}, {"type": "image", "image": "b.png"},
        {"type": "text", "text": "?"}]
    args = _build_parser().parse_args(["generate", "--prompt", "hi"])
    assert _messages(args)[-1]["content"] == [{"type": "text", "text": "hi"}]
