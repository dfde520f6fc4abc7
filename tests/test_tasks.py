"""The omni-mini generator against ``../shared/mini/TASKS.md``, by independent measurement: shapes
counted as connected components of the decoded image, beeps by energy detection, motion from the
shape's centroid in frames decoded by ``omnistream.media``, the spoken number word located in the
video's own audio track; answers re-derived from those measurements and matched to the spec's
grammar (written out here, not imported)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from omnistream.train import tasks

ndimage = pytest.importorskip("scipy.ndimage")

NUM = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
       "fifteen sixteen seventeen eighteen nineteen twenty").split()
PURE = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220),
        "yellow": (235, 205, 30)}
SHAPE_WORDS = ("circle", "square", "triangle")
SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
          "perceiving auditory and visual inputs, as well as generating text and speech.")
C, S, N = "(red|green|blue|yellow)", "(circle|square|triangle)", "(" + "|".join(NUM) + ")"
GRAMMAR = {  # family -> (question, answer) full-match patterns; None: no text question
    "image-count": (r"How many shapes are there\?",
                    rf"There are {N} shapes\.|There is one shape\."),
    "image-count-color": (rf"How many {C} shapes are there\?",
                          rf"There are {N} {C} shapes\.|There is one {C} shape\."
                          rf"|There are no {C} shapes\."),
    "image-color": (rf"What color is the {S}\?", rf"The {S} is {C}\."),
    "image-shape": (rf"Which shape is {C}\?", rf"The {C} shape is a {S}\."),
    "arithmetic": (rf"What is {N} (plus|minus) {N}\?",
                   rf"({'|'.join(w.capitalize() for w in NUM)}) (plus|minus) {N} is {N}\."),
    "beeps": (r"How many beeps do you hear\?", rf"I hear {N} beeps\.|I hear one beep\."),
    "video-motion": (rf"Which way does the {C} {S} move\?",
                     r"It moves (to the left|to the right|up|down)\."),
    "audio-in-video": (r"What color was the shape when the voice spoke\?", rf"It was {C}\."),
    "chat": (r"Hello!|Hi!|Who are you\?",
             r"Hello! I am omnistream, a small model that can see, hear and talk\."),
    "repeat": (r"Repeat after me: .+", r"[A-Z].*\."),
}
# the spec's vocabulary (numbers, colors, shapes) and the words of its questions and answers
VOCAB = set(NUM) | set(PURE) | set(SHAPE_WORDS) | set(
    "how many shapes are there what color is the which shape a plus minus beeps do you hear i beep "
    "way does move it moves to left right up down was when voice spoke hello am omnistream small "
    "model that can see and talk one no".split())

def _need_speech():
    from omnistream.train.voices import MissingToolError, speak

    try:
        speak("one")
        speak("one", tasks.tm.Voice("espeak", 160))
    except MissingToolError as e:
        pytest.skip(str(e))


def _cases(family, n, seed=0):
    return [tasks.make_case(family, tasks.case_rng(seed, family, i)) for i in range(n)]


def _check_strings(case):
    sub = case.family in ("spoken-image", tasks.SIZED_FAMILY)  # a question of another family
    q, a = GRAMMAR[case.meta["image_family"] if sub else case.family]
    if case.question is not None:
        assert re.fullmatch(q, case.question), case.question
    assert re.fullmatch(a, case.answer), case.answer
    rec = case.record([f"m{k}" for k in range(len(case.media))])
    msgs = rec["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == SYSTEM and msgs[2]["content"] == case.answer
    kinds = [p["type"] for p in msgs[1]["content"]]
    assert kinds == [m.kind for m in case.media] + (["text"] if case.question else [])


# -- measurements ------------------------------------------------------------------------------


def _nearest(rgb, tol=25):
    name = min(PURE, key=lambda c: np.abs(np.subtract(rgb, PURE[c])).max())
    assert np.abs(np.subtract(rgb, PURE[name])).max() <= tol, (rgb, name)
    return name


def _kind(mask):
    """circle / square / triangle (apex up) from one component's mask."""
    ys, xs = np.nonzero(mask)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    fill = mask.sum() / (h * w)
    if fill > 0.93:
        return "square"
    if 0.70 < fill < 0.86:
        return "circle"
    assert 0.4 < fill < 0.62, fill
    rows = mask[ys.min() : ys.max() + 1].sum(1)
    assert rows[: len(rows) // 4].mean() < rows[-len(rows) // 4 :].mean()  # narrow on top
    return "triangle"


def measure_image(png: bytes):
    """Background and [(kind, color, size)] of each shape found in the picture."""
    from omnistream.media.image import load_image

    img = np.asarray(load_image(png).convert("RGB")).astype(int)
    h, w, _ = img.shape
    assert 160 <= w <= 448 and 160 <= h <= 448
    flat = img.reshape(-1, 3)
    vals, counts = np.unique(flat, axis=0, return_counts=True)
    bg = vals[counts.argmax()]
    assert (bg >= 215).all() and (bg <= 255).all()
    lab, n = ndimage.label(np.abs(img - bg).max(-1) > 0, structure=np.ones((3, 3)))
    assert 1 <= n <= 6
    out = []
    for k in range(1, n + 1):
        m = lab == k
        ys, xs = np.nonzero(m)
        hh, ww = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert 28 <= ww <= 80 and abs(int(hh) - int(ww)) <= 1, (ww, hh)
        colors = np.unique(img[m], axis=0)
        assert len(colors) == 1  # solid fill
        out.append((_kind(m), _nearest(colors[0]), int(ww)))
    return bg, out


def expected_image_answer(question: str, shapes) -> str:
    if question == "How many shapes are there?":
        n = len(shapes)
        return "There is one shape." if n == 1 else f"There are {NUM[n]} shapes."
    if m := re.fullmatch(rf"How many {C} shapes are there\?", question):
        c = m[1]
        k = sum(col == c for _, col, _ in shapes)
        return {0: f"There are no {c} shapes.", 1: f"There is one {c} shape."}.get(
            k, f"There are {NUM[k]} {c} shapes.")
    if m := re.fullmatch(rf"What color is the {S}\?", question):
        hits = [col for kind, col, _ in shapes if kind == m[1]]
        assert len(hits) == 1, "exactly one shape of the asked kind"
        return f"The {m[1]} is {hits[0]}."
    m = re.fullmatch(rf"Which shape is {C}\?", question)
    hits = [kind for kind, col, _ in shapes if col == m[1]]
    assert len(hits) == 1, "exactly one shape of the asked color"
    return f"The {m[1]} shape is a {hits[0]}."


def _rms_frames(x, sr, hop_s=0.01):
    hop = int(sr * hop_s)
    n = len(x) // hop
    return np.sqrt((x[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(1))


def _runs(on):
    """[start, end) frame index runs where ``on`` is true."""
    d = np.diff(np.concatenate([[0], on.astype(int), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True))


def measure_speech_wav(wav: bytes):
    from omnistream.media.audio import decode_audio

    x, sr = decode_audio(wav)
    assert sr >= 16000
    r = _rms_frames(x, sr)
    on = np.flatnonzero(r > r.max() * 10 ** (-20 / 20))
    lead, trail = on[0] * 0.01, (len(r) - on[-1] - 1) * 0.01
    assert lead <= 0.5 + 0.15 and trail <= 0.5 + 0.15, (lead, trail)
    return x, sr


def _shape_mask(frame, bg):
    return np.abs(frame.astype(int) - bg).max(-1) > 60


def _decoded(video: bytes, all_frames=False):
    from omnistream.media.video import decode_video

    d = decode_video(video)
    if all_frames:
        d = decode_video(video, fps=d.video_fps)
    frames = d.frames.permute(0, 2, 3, 1).numpy()
    seconds = d.total_frames / d.video_fps
    h, w = frames.shape[1:3]
    assert 2.0 - 1e-6 <= seconds <= 8.0 + 1e-6 and 2 <= d.video_fps <= 10
    assert 160 <= w <= 320 and 160 <= h <= 320
    corners = np.stack([frames[0, 0, 0], frames[0, 0, -1], frames[0, -1, 0], frames[0, -1, -1]])
    bg = np.median(corners, 0).astype(int)
    assert (bg >= 215 - 6).all()  # light (codec rounding aside)
    return d, frames, bg


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["image-count", "image-count-color", "image-color",
                                    "image-shape"])
def test_image_families(family):
    for case in _cases(family, 5):
        _check_strings(case)
        assert [m.kind for m in case.media] == ["image"]
        _, shapes = measure_image(case.media[0].data)
        assert case.answer == expected_image_answer(case.question, shapes)


def test_sized_counting_cases_have_shapes_of_one_size_band():
    """``image-count-sized``: counting questions whose shapes, measured in the picture, are all
    small or all large (the asked colour's area does not tell the count), both bands drawn."""
    bands = set()
    for case in _cases(tasks.SIZED_FAMILY, 12):
        _check_strings(case)
        assert case.meta["image_family"] in ("image-count", "image-count-color")
        _, shapes = measure_image(case.media[0].data)
        assert case.answer == expected_image_answer(case.question, shapes)
        sizes = [size for *_, size in shapes]
        band = next(b for b in tasks.SIZE_BANDS if b[0] - 1 <= min(sizes) <= b[1] + 1)
        assert band[0] - 1 <= max(sizes) <= band[1] + 1, (sizes, band)
        bands.add(band)
    assert bands == set(tasks.SIZE_BANDS)


def test_spoken_image():
    _need_speech()
    seen = set()
    for case in _cases("spoken-image", 6):
        _check_strings(case)
        assert case.question is None and [m.kind for m in case.media] == ["image", "audio"]
        _, shapes = measure_image(case.media[0].data)
        assert case.answer == expected_image_answer(case.meta["question"], shapes)
        x, sr = measure_speech_wav(case.media[1].data)
        sp = case.meta["speech"]
        lo, hi = (0.8, 1.25) if sp["engine"] == "piper" else (140, 190)
        assert lo <= sp["speed"] <= hi
        a, b = (int(t * sr) for t in sp["speech_s"])
        if sp["snr_db"] is None:  # the silence around the speech is silent
            assert not x[:a].any() and not x[b:].any()
        elif len(x) - b > sr // 20:  # noise floor from the tail
            snr = 10 * np.log10(np.mean(x[a:b] ** 2) / np.mean(x[b:] ** 2))
            assert snr >= 19.0, snr
        seen.add(sp["engine"])
    assert seen == {"piper", "espeak"}


def test_arithmetic():
    _need_speech()
    kinds = set()
    for case in _cases("arithmetic", 8):
        _check_strings(case)
        q = case.question if case.question is not None else case.meta["question"]
        m = re.fullmatch(rf"What is {N} (plus|minus) {N}\?", q)
        a, op, b = NUM.index(m[1]), m[2], NUM.index(m[3])
        c = a + b if op == "plus" else a - b
        assert 0 <= a <= 10 and 0 <= b <= 10 and 0 <= c <= 20
        assert case.answer == f"{NUM[a].capitalize()} {op} {NUM[b]} is {NUM[c]}."
        if case.question is None:
            assert [m.kind for m in case.media] == ["audio"]
            measure_speech_wav(case.media[0].data)
            kinds.add("spoken")
        else:
            assert case.media == []
            kinds.add("text")
    assert kinds == {"spoken", "text"}


def test_beeps():
    from omnistream.media.audio import decode_audio

    counts = set()
    for case in _cases("beeps", 8):
        _check_strings(case)
        x, sr = decode_audio(case.media[0].data)
        assert sr >= 16000 and 1.5 <= len(x) / sr <= 4.0
        r = _rms_frames(x, sr, 0.005)
        runs = _runs(r > 0.3 * r.max())
        n = len(runs)
        counts.add(n)
        assert 1 <= n <= 5
        assert case.answer == ("I hear one beep." if n == 1 else f"I hear {NUM[n]} beeps.")
        assert runs[0][0] * 0.005 <= 0.5 + 0.01
        for s, e in runs:
            assert 0.1 - 0.015 <= (e - s) * 0.005 <= 0.2 + 0.01
            seg = x[int(s * 0.005 * sr) : int(e * 0.005 * sr)]
            f = np.fft.rfftfreq(len(seg), 1 / sr)[np.abs(np.fft.rfft(seg)).argmax()]
            assert 900 - 15 <= f <= 1100 + 15, f
        for (_, e), (s, _) in zip(runs, runs[1:], strict=False):
            assert 0.2 - 0.01 <= (s - e) * 0.005 <= 0.5 + 0.015
    assert len(counts) > 2


def test_video_motion():
    dirs = set()
    for case in _cases("video-motion", 4):
        _check_strings(case)
        d, frames, bg = _decoded(case.media[0].data)
        h, w = frames.shape[1:3]
        cents = []
        for f in frames:
            ys, xs = np.nonzero(_shape_mask(f, bg))
            cents.append((xs.mean(), ys.mean()))
        cents = np.asarray(cents)
        dx, dy = cents[-1] - cents[0]
        if abs(dx) > abs(dy):
            assert abs(dx) >= 0.4 * w - 2 and abs(dy) <= 1.5
            direction = "to the right" if dx > 0 else "to the left"
        else:
            assert abs(dy) >= 0.4 * h - 2 and abs(dx) <= 1.5
            direction = "down" if dy > 0 else "up"
        assert case.answer == f"It moves {direction}."
        axis = 0 if direction.startswith("to") else 1
        steps = np.diff(cents[:, axis])
        assert (np.sign(steps) == np.sign(steps.sum())).all()  # one way, straight
        m = _shape_mask(frames[0], bg)
        color = _nearest(np.median(frames[0][m], 0), tol=32)
        ys, xs = np.nonzero(m)
        bbox = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert case.question == f"Which way does the {color} {_kind(bbox)} move?"
        dirs.add(direction)
    assert len(dirs) > 1


def test_audio_in_video():
    _need_speech()
    from omnistream.media.video import load_video_audio

    for case in _cases("audio-in-video", 4):
        _check_strings(case)
        assert case.use_audio_in_video and case.record(["v.mp4"])["use_audio_in_video"] is True
        d, frames, bg = _decoded(case.media[0].data, all_frames=True)
        ts = np.asarray(d.timestamps)
        colors = []
        for f in frames:
            m = _shape_mask(f, bg)
            assert m.sum() > 28 * 28 * 0.4
            colors.append(_nearest(np.median(f[m], 0), tol=32))
        seg_of = (ts // 2.0).astype(int)
        segs = [sorted({c for c, s in zip(colors, seg_of, strict=True) if s == j})
                for j in range(seg_of.max() + 1)]
        assert all(len(s) == 1 for s in segs), segs  # one color per 2 s segment
        segs = [s[0] for s in segs]
        assert 2 <= len(segs) <= 4 and all(a != b for a, b in zip(segs, segs[1:], strict=False))
        x = load_video_audio(io.BytesIO(case.media[0].data))  # 16 kHz
        r = _rms_frames(x, 16000)
        runs = _runs(r > r.max() * 0.1)
        t0, t1 = runs[0][0] * 0.01, runs[-1][1] * 0.01
        assert t1 - t0 < 1.2  # one word
        j = int(t0 // 2.0)
        assert t1 <= 2.0 * (j + 1), (t0, t1)  # fully inside one color segment
        assert case.answer == f"It was {segs[j]}."
        assert case.meta["word"] in NUM[1:10]


def test_chat_and_repeat():
    for case in _cases("chat", 6):
        _check_strings(case)
        assert case.media == [] and case.question in ("Hello!", "Hi!", "Who are you?")
    for case in _cases("repeat", 10):
        _check_strings(case)
        words = case.question.removeprefix("Repeat after me: ").split(" ")
        assert 3 <= len(words) <= 8 and {w.lower() for w in words} <= VOCAB
        text = " ".join(words)
        assert case.answer == text[0].upper() + text[1:] + "."


def test_spoken_repeat_is_training_only():
    """The auxiliary family: a spoken question of the families or a repeat list after the text
    "Repeat after me."; the reply writes what was said; evaluation never draws it."""
    _need_speech()
    assert "spoken-repeat" not in tasks.FAMILIES
    kinds = set()
    for case in _cases("spoken-repeat", 8):
        assert case.question == "Repeat after me." and [m.kind for m in case.media] == ["audio"]
        measure_speech_wav(case.media[0].data)
        text = case.meta["text"]
        if text.endswith("?"):  # a question of the families, written as spoken
            assert any(re.fullmatch(q, text) for q, _ in GRAMMAR.values() if q)
            assert case.answer == text
            kinds.add("question")
        else:
            assert {w.lower() for w in text.split()} <= VOCAB
            assert case.answer == text[0].upper() + text[1:] + "."
            kinds.add("words")
    assert kinds == {"question", "words"}


def test_image_describe_names_every_shape_left_to_right():
    """The auxiliary family: the answer names each shape found in the picture (colour and kind)
    in the order of their left edges; evaluation never draws it."""
    from omnistream.media.image import load_image

    assert "image-describe" not in tasks.FAMILIES
    for case in _cases("image-describe", 6):
        assert case.question == tasks.DESCRIBE_QUESTION
        img = np.asarray(load_image(case.media[0].data).convert("RGB")).astype(int)
        bg, _ = measure_image(case.media[0].data)
        lab, n = ndimage.label(np.abs(img - bg).max(-1) > 0, structure=np.ones((3, 3)))
        found = []
        for k in range(1, n + 1):
            m = lab == k
            ys, xs = np.nonzero(m)
            found.append((xs.min(), ys.min(), f"a {_nearest(img[m][0])} {_kind(m)}"))
        names = [name for *_, name in sorted(found)]
        want = names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        assert case.answer == want[0].upper() + want[1:] + "."


def test_typed_arithmetic_reads_digits_and_answers_in_words():
    """The auxiliary family: the question as people type it (digits or words, "+"/"-" or
    plus/minus); the answer, re-derived from the typed operands, is the arithmetic family's
    sentence in words; evaluation draws it only by name."""
    assert "typed-arithmetic" not in tasks.FAMILIES
    seen = set()
    for case in _cases("typed-arithmetic", 60):
        assert not case.media
        m = re.fullmatch(r"(?:What is |What's |How much is |what is )?([a-z0-9]+) ?"
                         r"(plus|minus|\+|-) ?([a-z0-9]+)(?: = )?\??", case.question)
        assert m, case.question
        a, b = (int(v) if v.isdigit() else NUM.index(v) for v in m.group(1, 3))
        plus = m.group(2) in ("plus", "+")
        c = a + b if plus else a - b
        assert 0 <= a <= 10 and 0 <= b <= 10 and 0 <= c <= 20
        op = "plus" if plus else "minus"
        assert case.answer == f"{NUM[a].capitalize()} {op} {NUM[b]} is {NUM[c]}."
        seen |= {"symbol" if m.group(2) in "+-" else "word op",
                 *("digits" if v.isdigit() else "word" for v in m.group(1, 3))}
    assert seen == {"symbol", "word op", "digits", "word"}


def test_image_paraphrase_asks_in_other_words_and_answers_from_the_picture():
    """The auxiliary family: an image question worded otherwise than TASKS.md's; the answer,
    re-derived from the picture for the question it means, is that family's."""
    assert "image-paraphrase" not in tasks.FAMILIES
    canonical = {r.pattern for r in map(re.compile, (q for q, _ in GRAMMAR.values() if q))}
    kinds = set()
    for case in _cases("image-paraphrase", 24):
        q = case.question
        assert not any(re.fullmatch(p, q) for p in canonical), q
        color = re.search(C, q)
        shape = re.search(S, q)
        if re.search(r"colou?r", q):
            meant = f"What color is the {shape[0]}?"
        elif color and re.search(r"shape is|kind of shape|is the \w+ shape", q):
            meant = f"Which shape is {color[0]}?"
        elif color:
            meant = f"How many {color[0]} shapes are there?"
        else:
            meant = "How many shapes are there?"
        _, shapes = measure_image(case.media[0].data)
        assert case.answer == expected_image_answer(meant, shapes), q
        kinds.add(meant.split(" ")[0] + (" color" if color else ""))
    assert kinds == {"What", "Which color", "How", "How color"}


def test_determinism_and_dataset(tmp_path):
    """Same seed -> same bytes; a case does not depend on n_per_family; seeds differ; records
    pass ``omnistream.train.data.validate``."""
    from omnistream.train.data import validate

    fams = ["image-count", "beeps", "video-motion", "repeat"]
    a = tasks.make_dataset(tmp_path / "a", 2, seed=7, families=fams, progress=False)
    b = tasks.make_dataset(tmp_path / "b", 2, seed=7, families=fams, progress=False)
    c = tasks.make_dataset(tmp_path / "c", 1, seed=7, families=fams, progress=False)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 3
    for f in files:
        assert (a.parent / f).read_bytes() == (b.parent / f).read_bytes(), f
    recs = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(recs) == 8 and [r["family"] for r in recs] == [f for f in fams for _ in (0, 1)]
    for r in recs:
        validate(r, a.parent)
    first = {json.loads(line)["case"][1]: line for line in c.read_text().splitlines()}
    assert all(first[r["family"]] == json.dumps(r) for r in recs if r["case"][2] == 0)
    other = tasks.make_case("image-count", tasks.case_rng(8, "image-count", 0))
    assert other.media[0].data != (a.parent / recs[0]["messages"][1]["content"][0]["image"]
                                   ).read_bytes()
    with pytest.raises(ValueError):
        tasks.make_dataset(tmp_path / "d", 1, seed=0, families=["nope"], progress=False)
    # a number per family: those families, each case as the same seed makes it
    e = tasks.make_dataset(tmp_path / "e", {"repeat": 2, "image-count": 1}, seed=7,
                           progress=False)
    lines = e.read_text().splitlines()
    assert [json.loads(x)["case"][1:] for x in lines] == [["repeat", 0], ["repeat", 1],
                                                          ["image-count", 0]]
    assert lines[2] == first["image-count"]
    with pytest.raises(ValueError, match="one or the other"):
        tasks.make_dataset(tmp_path / "f", {"repeat": 1}, seed=0, families=["beeps"],
                           progress=False)


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_make_case_is_deterministic(family):
    if family in ("spoken-image", "arithmetic", "audio-in-video"):
        _need_speech()
    x, y = (tasks.make_case(family, tasks.case_rng(3, family, 1)) for _ in range(2))
    assert (x.question, x.answer, x.meta) == (y.question, y.answer, y.meta)
    assert [m.data for m in x.media] == [m.data for m in y.media]
    _check_strings(x)


def test_counterfactual_answers_change_the_content_in_the_familys_grammar():
    """Talker training replies that contradict the media: the count, color, shape, direction or
    sum changes; the rest of the sentence, and its grammar, stay."""
    examples = {
        "image-count": ["There is one shape.", "There are six shapes."],
        "image-count-color": ["There are no red shapes.", "There is one blue shape.",
                              "There are four yellow shapes."],
        "image-color": ["The circle is yellow.", "The triangle is red."],
        "image-shape": ["The green shape is a triangle."],
        "arithmetic": ["Seven plus three is ten.", "Ten minus ten is zero."],
        "beeps": ["I hear one beep.", "I hear five beeps."],
        "video-motion": ["It moves to the left.", "It moves up."],
        "audio-in-video": ["It was blue."],
    }
    rng = np.random.default_rng(0)
    for family, answers in examples.items():
        for a in answers:
            for _ in range(5):
                cf = tasks.counterfactual_answer(a, rng)
                assert cf is not None and cf != a, (a, cf)
                assert re.fullmatch(GRAMMAR[family][1], cf), (family, cf)
                kept = {"image-color": a.split()[1], "image-shape": a.split()[1],
                        "image-count-color": re.search(C, a)[0] if re.search(C, a) else None,
                        "arithmetic": " ".join(a.split()[:3])}.get(family)
                assert kept is None or kept in cf, (a, cf)
    assert tasks.counterfactual_answer(tasks.CHAT_ANSWER, rng) is None


def test_unknown_families_are_named_in_the_error(tmp_path):
    """One check for the generator and the evaluation: task and training-only families pass,
    anything else is refused by name."""
    assert tasks.check_families(["beeps", "typed-arithmetic"]) == ("beeps", "typed-arithmetic")
    with pytest.raises(ValueError, match="'beep'"):
        tasks.make_dataset(tmp_path, 1, seed=0, families=["beep"], progress=False)
    from omnistream.eval.tasks import evaluate

    with pytest.raises(ValueError, match="'image-counts'"):
        evaluate("/nonexistent", n=1, families=["image-counts"], recognize=False)


def test_levels_vary_only_the_audio_and_by_the_recorded_gain(tmp_path):
    """``make_dataset(levels=True)`` (training only): the same cases as without it, each WAV at
    the gain its record names (measured on the tones) or through the gain control, images
    untouched, the same bytes on every run."""
    from omnistream.media.audio import decode_audio
    from omnistream.train import tasks_media as tm

    fams = ["beeps", "image-count"]
    plain = tasks.make_dataset(tmp_path / "a", 6, seed=5, families=fams, progress=False)
    lev = tasks.make_dataset(tmp_path / "b", 6, seed=5, families=fams, progress=False,
                             levels=True)
    again = tasks.make_dataset(tmp_path / "c", 6, seed=5, families=fams, progress=False,
                               levels=True)
    assert lev.read_text() == again.read_text()
    kinds = set()
    for p, r in zip(*([json.loads(x) for x in f.read_text().splitlines()] for f in (plain, lev)),
                    strict=True):
        assert p["messages"] == r["messages"] and "levels" not in p
        media = r["messages"][1]["content"][0]
        a, b, c = ((f.parent / media[media["type"]]).read_bytes() for f in (plain, lev, again))
        assert b == c
        if r["family"] == "image-count":
            assert a == b and r["levels"] == []
            continue
        (meta,) = r["levels"]
        assert tm.LEVEL_DB[0] <= meta["gain_db"] <= tm.LEVEL_DB[1]
        x, sr = decode_audio(a)
        y, _ = decode_audio(b)
        assert len(x) == len(y) and a != b
        kinds.add("gain" if meta["agc_rms"] is None else "agc")
        loud = np.abs(x) > 0.5 * np.abs(x).max()  # samples inside a tone
        if meta["agc_rms"] is None and np.abs(x).max() * 10 ** (meta["gain_db"] / 20) < 0.99:
            ratio = np.median(y[loud] / x[loud])  # not clipped: the plain gain
            assert ratio == pytest.approx(10 ** (meta["gain_db"] / 20), rel=0.01, abs=1e-3)
    assert kinds == {"gain", "agc"}


def test_gain_control_levels_speech_and_gates_the_quiet():
    """``tasks_media.vary_level``'s gain control: a quiet tone comes out near the drawn target
    RMS, a stretch 60 dB below it is gated, and no sample passes full scale."""
    from omnistream.train import tasks_media as tm

    sr = 16_000
    t = np.arange(sr // 2) / sr
    tone = 0.01 * np.sin(2 * np.pi * 440 * t)
    x = np.concatenate([tone, 1e-5 * np.sin(2 * np.pi * 300 * t), tone]).astype(np.float32)
    seen = 0
    for seed in range(12):
        y, meta = tm.vary_level(x, sr, np.random.default_rng(seed))
        assert np.abs(y).max() <= 1.0
        if meta["agc_rms"] is None:
            continue
        seen += 1
        g = 10 ** (meta["gain_db"] / 20)
        mid = slice(sr // 8, 3 * sr // 8)  # inside the first tone, away from the smoothing
        rms = np.sqrt(np.mean(y[mid].astype(np.float64) ** 2))
        want = np.clip(meta["agc_rms"], 0.01 * g / np.sqrt(2) * tm.AGC_GAIN[0],
                       0.01 * g / np.sqrt(2) * tm.AGC_GAIN[1])
        assert rms == pytest.approx(want, rel=0.02)
        gap = y[sr // 2 + sr // 8: sr - sr // 8]
        assert np.abs(gap).max() <= 1e-5 * g * tm.AGC_GATE_GAIN * 1.01
    assert seen >= 3
