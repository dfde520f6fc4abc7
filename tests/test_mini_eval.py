"""``omnistream eval``: its table on the tiny random model, the accuracies' intervals, the
microphone levels, the recognizer's WER and its reference columns (the voice, the codec), and the
timing of each reply's first and gapless audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def test_eval_prints_the_table_on_the_tiny_model(tiny_dir, capsys):
    import shutil

    pytest.importorskip("piper", reason="spoken questions need the data extra")
    if shutil.which("espeak-ng") is None:
        pytest.skip("spoken questions need espeak-ng")
    from omnistream.cli import main
    from omnistream.train.tasks import FAMILIES

    rc = main(["eval", "--model", str(tiny_dir), "--n", "1", "--max-new-tokens", "3",
               "--speech-seconds", "0.3", "--no-recognizer", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for f in (*FAMILIES, "all"):
        assert f in rows, out
    assert rows["all"][1] == str(len(FAMILIES))


def test_eval_table_gives_each_accuracy_its_wilson_interval():
    """Fifty cases at 98% say little more than "90-100%" (twenty-ninth session: image-count 98%
    on 50 cases, 90.5% on 200), so the table prints each accuracy's 95% interval."""
    from omnistream.eval.tasks import format_table, wilson

    assert tuple(round(v, 3) for v in wilson(49, 50)) == (0.895, 0.996)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    case = {"wer_edits": None, "wer_words": None, "voice_edits": None, "voice_words": None,
            "ttfa_s": 0.2, "gapless_s": 0.4, "rtf": 0.5}
    cases = [case | {"family": "chat", "correct": i < 49} for i in range(50)]
    table = format_table({"model": "m", "seed": 1_000_000, "n": 50, "recognizer": False,
                          "recognizer_off": True, "levels": False, "cases": cases})
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert rows["family"][3:5] == ["95%", "CI"] and rows["chat"][2:4] == ["98.0%", "90-100"]
    assert table.endswith("WER not measured (--no-recognizer)")


def test_eval_levels_hear_the_training_generators_levels(tiny_dir, tmp_path, monkeypatch):
    """``evaluate(levels=True)`` gives the engine each case's audio exactly as
    ``make_dataset(levels=True)`` writes it for the same seed (and the plain audio without),
    and each case's result carries the rendering's ground truth."""
    from omnistream.eval import tasks as ev
    from omnistream.train.sentences import NUMBERS
    from omnistream.train.tasks import EVAL_SEED_BASE, make_dataset

    heard: list[bytes] = []

    def fake_respond(engine, messages, options):
        part = next(p for m in messages if isinstance(m["content"], list)
                    for p in m["content"] if p.get("type") == "audio")
        heard.append(Path(part["audio"]).read_bytes())
        return ev.Reply("", np.zeros(0, np.float32), [], {"wall_s": 0.0}, "stop")

    monkeypatch.setattr(ev, "respond", fake_respond)
    for levels in (False, True):
        heard.clear()
        res = ev.evaluate(tiny_dir, n=3, families=["beeps"], recognize=False, levels=levels)
        assert res["levels"] is levels
        assert ("random microphone levels" in ev.format_table(res)) is levels
        data = make_dataset(tmp_path / str(levels), 3, EVAL_SEED_BASE, ["beeps"], False, levels)
        recs = [json.loads(x) for x in data.read_text().splitlines()]
        want = [(data.parent / r["messages"][1]["content"][0]["audio"]).read_bytes() for r in recs]
        assert heard == want
        for c, r in zip(res["cases"], recs, strict=True):  # ground truth and levels ride along
            assert NUMBERS[len(c["truth"]["beeps_s"])] == c["answer"].split()[2], c
            assert c["levels"] == r.get("levels") and (c["levels"] is not None) is levels
    assert heard[0] != (tmp_path / "False" / "media/beeps/000000_0.wav").read_bytes()


def test_voice_reference_wer():
    """The eval's reference column: the recognizer on the Piper voice reading an answer."""
    pytest.importorskip("piper", reason="the voice needs the data extra")
    from omnistream.eval import recognizer
    from omnistream.eval.tasks import _voice_floor, summarize

    if not recognizer.available():
        pytest.skip("no recognizer (eval extra)")
    floor = _voice_floor(recognizer)
    # (since the 2026-12-03 package set the recognizer hears Piper's "There are
    # three yellow shapes." as "... shades": the floor is a measurement, not a given)
    assert floor("It moves to the left.") == (0, 5)
    cases = [{"correct": True, "ttfa_s": None, "rtf": None, "wer_edits": 2, "wer_words": 5,
              "voice_edits": e, "voice_words": 5, "codec_edits": 1, "codec_words": 5}
             for e in (0, 1)]
    s = summarize(cases)
    assert s["wer"] == 0.4 and s["voice_wer"] == 0.1 and s["codec_wer"] == 0.2


def test_codec_reference_wer_needs_a_speech_encoder(tiny_dir, monkeypatch):
    """``--codec-wer``: the voice's recording of an answer through the checkpoint's own codec
    (the Talker's target as the codec says it); a checkpoint without a speech encoder (the
    release's layout, the tiny model) is refused by name; the table shows the column only when
    it was measured."""
    from omnistream.eval import recognizer
    from omnistream.eval.tasks import _codec_floor, format_table
    from omnistream.models import REPO_ROOT

    case = {"family": "chat", "correct": True, "wer_edits": 2, "wer_words": 5, "voice_edits": 0,
            "voice_words": 5, "codec_edits": 1, "codec_words": 5, "ttfa_s": 0.2,
            "gapless_s": 0.4, "rtf": 0.5}
    res = {"model": "m", "seed": 1_000_000, "n": 1, "recognizer": True, "recognizer_off": False,
           "levels": False, "cases": [case]}
    assert "codec WER" not in format_table(res)
    table = format_table(res | {"codec_wer": True})
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines()}
    assert rows["chat"][4:7] == ["40.0%", "0.0%", "20.0%"]  # WER, voice WER, codec WER
    with pytest.raises(ValueError, match="no speech encoder"):
        _codec_floor(recognizer, tiny_dir)
    pytest.importorskip("piper", reason="the voice needs the data extra")
    mini = (REPO_ROOT or Path.cwd()) / "models" / "omni-mini"
    if not recognizer.available() or not (mini / "model.safetensors").is_file():
        pytest.skip("no recognizer (eval extra) or no omni-mini")
    from omnistream.engine.codec import Codec

    decoded = []
    decode = Codec.decode

    def spy(self, codes, *args, **kwargs):
        decoded.append(len(codes))
        return decode(self, codes, *args, **kwargs)

    monkeypatch.setattr(Codec, "decode", spy)
    floor = _codec_floor(recognizer, mini)
    edits, words = floor("It moves to the left.")
    assert words == 5 and edits <= 1  # omni-mini's codec says its motion replies clearly
    assert len(decoded) == 1 and decoded[0] > 25  # the voice's codes went through the decoder
    assert floor("It moves to the left.") == (edits, words) and len(decoded) == 1  # once per answer


def test_word_errors_read_a_digit_string_as_the_reference_says_it():
    """Whisper writes number words said in a row as one digit string ("seventeen twelve nine"
    heard right is written "1712 9"); the WER reads each string the way closest to the
    reference, so formatting costs nothing and a misheard number still counts."""
    from omnistream.eval.recognizer import edit_distance, normalize, readings, wer, word_errors

    assert word_errors("Seventeen twelve nine yellow shapes.", "1712 9 yellow shapes") == (0, 5)
    assert word_errors("Eight nineteen zero you up.", "819-0 up.") == (1, 5)  # "you" is lost
    assert word_errors("There are three shapes.", "There are 3 shapes.") == (0, 4)
    assert word_errors("one hundred five", "105") == (0, 3)  # the cardinal stays a reading
    assert word_errors("Fourteen red am two.", "40 red, am 2.") == (1, 4)  # forty is not fourteen
    assert word_errors("Down seventeen six way", "Down 1766 way") == (1, 4)  # an extra sixty
    assert wer(["Seventeen twelve nine"], ["1,712 9"]) == 0.0
    # without digits it is the plain word edit distance of the normalised texts
    ref, hyp = "Hello! I am omnistream, a small model.", "Below, I am Amistreen, the small model."
    assert word_errors(ref, hyp) == (edit_distance(normalize(ref), normalize(hyp)), 7) == (3, 7)
    assert readings("12") == [["twelve"], ["one", "two"]]
    assert ["seventeen", "twelve"] in readings("1712") and len(readings("1" * 9)) == 1


def test_recognizer_falls_back_when_greedy_decoding_loops():
    """v10's spoken "I hear four beeps." (the eval's beeps case 23, 1.5 s, stored as the
    recognizer's 16 kHz float input): greedy Whisper alone heard it as "I'll give it a few
    more." 22 times over (132 edits, a third of that eval's WER); a looping transcript is
    decoded again with beam search, which hears a short sentence, the same way every time."""
    from types import SimpleNamespace

    from omnistream.eval import recognizer

    assert recognizer.compression_ratio("I'll give it a few more. " * 22) > recognizer.LOOP_RATIO
    assert recognizer.compression_ratio("I hear four beeps.") < recognizer.LOOP_RATIO

    class Model:  # greedy loops, the beam does not (whether the real clip loops greedily
        # depends on the machine's thread count: it does on 2 threads, not on 1)
        def __init__(self, greedy: str):
            self.greedy, self.beams = greedy, []

        def transcribe(self, x, beam_size, **kw):
            self.beams.append(beam_size)
            text = self.greedy if beam_size == 1 else "I care for beats."
            return [SimpleNamespace(text=text)], None

    looping = Model("I'll give it a few more. " * 22)
    assert recognizer._recognize(looping, None) == "I care for beats." and looping.beams == [1, 5]
    fine = Model("I hear four beeps.")
    assert recognizer._recognize(fine, None) == "I hear four beeps." and fine.beams == [1]
    if not recognizer.available():
        pytest.skip("no recognizer (eval extra)")
    x = np.load(Path(__file__).parent / "data" / "whisper_loop_16k.npy")
    heard = [recognizer.transcribe(x, 16000) for _ in range(2)]
    assert heard[0] == heard[1]
    # a sentence of about the reply's length, not a loop (the beam hears "I care for beats."
    # on 2 threads, "I'll get it for beats." on 1: its words vary with the thread count)
    assert len(recognizer.normalize(heard[0])) <= 8, heard


def test_gapless_start_waits_for_the_chunk_that_comes_late():
    """A 40 ms first chunk at 0.1 s, the next at 0.5 s: playback started before 0.46 s would
    run dry; a chunk ahead of its playback time changes nothing."""
    from omnistream.eval.tasks import gapless_start, summarize

    assert gapless_start([]) is None
    assert gapless_start([(0.1, 0), (0.5, 960), (0.6, 24000)]) == pytest.approx(0.46)
    cases = [{"correct": True, "ttfa_s": 0.1, "rtf": 0.5, "gapless_s": g} for g in (0.3, None)]
    assert summarize(cases)["gapless_s"] == 0.3


def test_respond_times_each_chunk_with_the_samples_before_it(monkeypatch):
    """``eval.tasks.respond`` on a reply whose chunks come at known times (a fake clock): 40 ms
    at 0.1 s, 1 s at 0.5 s: gapless start 0.46 s, and the reply's audio joined."""
    from omnistream.engine.events import AudioChunk, Done
    from omnistream.eval import tasks as ev

    clock = iter([0.0, 0.1, 0.5, 0.7])  # t0, the two chunks, the end

    class Session:
        def respond(self, messages):
            yield AudioChunk(np.full(960, 0.1, np.float32), 0)
            yield AudioChunk(np.zeros(24_000, np.float32), 1)
            yield Done("Hi.", "stop", timings={"ttfa_s": 0.1})

    class Engine:
        def session(self, options):
            return Session()

    monkeypatch.setattr(ev.time, "perf_counter", lambda: next(clock))
    r = ev.respond(Engine(), [], None)
    assert r.timings == {"ttfa_s": 0.1, "wall_s": 0.7, "gapless_s": pytest.approx(0.46)}
    assert r.pcm.shape == (24_960,) and r.pcm[959] == np.float32(0.1) and r.pcm[960] == 0


def test_eval_refuses_training_seeds(tiny_dir):
    from omnistream.eval.tasks import evaluate, normalize_answer

    assert normalize_answer("There are no red shapes.") == "there are no red shapes"
    assert normalize_answer(" Hello!  I am omnistream, a ") == "hello i am omnistream a"
    with pytest.raises(ValueError, match="evaluation seeds"):
        evaluate(tiny_dir, n=1, seed=5)
