"""The omni-mini task generator: ``../shared/mini/TASKS.md`` implemented exactly, deterministic
for a seed.

``make_case(family, rng)`` draws one conversation of a family (its media as encoded bytes, the
question, the exact answer string, and the ground truth it rendered); ``make_dataset`` writes
``n_per_family`` cases of each family under a folder as ChatML JSONL (``omnistream.train.data``'s
record format)::

    python -m omnistream.train.tasks OUT --n-per-family 100 --seed 0

Records: the release's speech system prompt, one user turn (media parts first, then the text part
if any), the assistant's reply (the answer string; its speech codes are made later by the codec).
Extra keys: ``family``, ``case`` (the seed words of the case), and ``use_audio_in_video: true``
for audio-in-video (the engine's ``SessionOptions.use_audio_in_video``: the video's audio track is
an input too).

Seeds: case ``i`` of family ``f`` is drawn from ``numpy.random.default_rng([seed, f, i])``, so a
case does not depend on ``n_per_family`` or on which families are made. Training data uses seeds
below ``EVAL_SEED_BASE``; evaluation cases use seeds from ``EVAL_SEED_BASE`` up, so the two never
share a random stream.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnistream.chat import SPEECH_SYSTEM_PROMPT
from omnistream.train import tasks_media as tm
from omnistream.train.sentences import COLORS, NUMBERS, SHAPES, repeat_vocabulary

FAMILIES = (
    "image-count",
    "image-count-color",
    "image-color",
    "image-shape",
    "spoken-image",
    "arithmetic",
    "beeps",
    "video-motion",
    "audio-in-video",
    "chat",
    "repeat",
)
# Training-only families (not in TASKS.md, never evaluated): ``spoken-repeat`` speaks a question
# of the families or a repeat list as the spoken questions are spoken (voices, silence, noise),
# after the text "Repeat after me.", and the reply writes it: the audio encoder learns the tasks'
# words, which the spoken questions (spoken-image, spoken arithmetic) need. ``image-describe``
# names every shape of an image (colour and kind) from left to right: the LLM learns to read
# each shape's kind and colour together, which the image families need and only hint at.
# ``typed-arithmetic`` asks the arithmetic question as people type it (digits, "+" and "-",
# "What's", no question mark) and answers in the family's words: TASKS.md writes its numbers
# as words, and a model that never saw a digit answered "What is 3 plus 4?" with nonsense.
# ``image-paraphrase`` asks the image families' questions in other words ("How many shapes?",
# "Count the red shapes."), with the families' answers.
AUX_FAMILIES = ("spoken-repeat", "image-describe", "typed-arithmetic", "image-paraphrase")
# ``image-count-sized``, training-only too but only in the counting stages: image-count or
# image-count-color with every shape small or every shape large (``SIZE_BANDS``, inside TASKS.md's
# 28-80 px), so that the asked colour's area says little of the count: the Thinker had learnt to
# estimate counts from area (forty-third session, docs/MINI.md).
SIZED_FAMILY = "image-count-sized"
SIZE_BANDS = ((28, 44), (60, 80))
TRAINING_FAMILIES = (*AUX_FAMILIES, SIZED_FAMILY)
DESCRIBE_QUESTION = "Describe the shapes from left to right."
EVAL_SEED_BASE = 1_000_000  # training seeds are below, evaluation seeds at or above
CHAT_QUESTIONS = ("Hello!", "Hi!", "Who are you?")
CHAT_ANSWER = "Hello! I am omnistream, a small model that can see, hear and talk."
REPEAT_WORDS = (3, 8)
# the tasks' vocabulary and the words of all answers ("omnistream" is in the chat answer)
REPEAT_VOCABULARY = tuple(sorted(set(repeat_vocabulary()) | {"omnistream"}))
SPOKEN_P = 0.5  # arithmetic: the question is spoken (audio only) this often
MOTION_ANSWERS = {"left": "It moves to the left.", "right": "It moves to the right.",
                  "up": "It moves up.", "down": "It moves down."}


@dataclass
class Media:
    """One encoded media item: ``kind`` audio | image | video, file extension, bytes."""

    kind: str
    ext: str
    data: bytes


@dataclass
class Case:
    """One conversation: media (prompt order), the text question (None when it is spoken or
    the input is media only), the answer string, and the ground truth of the rendering."""

    family: str
    media: list[Media]
    question: str | None
    answer: str
    meta: dict = field(default_factory=dict)
    use_audio_in_video: bool = False

    def record(self, paths: list[str]) -> dict:
        """The ChatML JSONL record, with the media at ``paths`` (relative to the JSONL file)."""
        content: list[dict] = [{"type": m.kind, m.kind: p}
                               for m, p in zip(self.media, paths, strict=True)]
        if self.question is not None:
            content.append({"type": "text", "text": self.question})
        rec = {"messages": [{"role": "system", "content": SPEECH_SYSTEM_PROMPT},
                            {"role": "user", "content": content},
                            {"role": "assistant", "content": self.answer}],
               "family": self.family}
        if self.use_audio_in_video:
            rec["use_audio_in_video"] = True
        return rec


# -- strings ---------------------------------------------------------------------------------


def cap(s: str) -> str:
    """First letter upper-cased."""
    return s[:1].upper() + s[1:]


def count_answer(n: int, color: str | None = None) -> str:
    """There are N [color] shapes. / There is one [color] shape. / There are no color shapes."""
    c = f"{color} " if color else ""
    if n == 1:
        return f"There is one {c}shape."
    if n == 0:
        if color is None:
            raise ValueError("an image always has a shape")
        return f"There are no {c}shapes."
    return f"There are {NUMBERS[n]} {c}shapes."


def counterfactual_answer(answer: str, rng: np.random.Generator) -> str | None:
    """``answer`` with its content (the count, a color, a shape, the direction or a sum's result)
    changed to another of its kind, in the family's grammar; None for answers without one.

    Talker training data: the Thinker's hidden states tell the reply it expects from the media,
    and a Talker trained only on true replies learns to say that instead of the token it is
    given (docs/MINI.md); replies that contradict the media make it read the tokens."""
    m = re.fullmatch(r"There (?:is|are) (\w+) (?:(red|green|blue|yellow) )?shapes?\.", answer)
    if m:
        n = 0 if m[1] == "no" else NUMBERS.index(m[1])
        lo = 0 if m[2] else 1
        n2 = _choice(rng, [k for k in range(lo, tm.MAX_SHAPES + 1) if k != n])
        return count_answer(n2, m[2])
    m = re.fullmatch(r"I hear (\w+) beeps?\.", answer)
    if m:
        n2 = _choice(rng, [k for k in range(1, 6) if NUMBERS[k] != m[1]])
        return "I hear one beep." if n2 == 1 else f"I hear {NUMBERS[n2]} beeps."
    m = re.fullmatch(r"(\w+) (plus|minus) (\w+) is (\w+)\.", answer)
    if m:
        c2 = _choice(rng, [k for k in range(21) if NUMBERS[k] != m[4]])
        return f"{m[1]} {m[2]} {m[3]} is {NUMBERS[c2]}."
    if answer in MOTION_ANSWERS.values():
        return _choice(rng, [a for a in MOTION_ANSWERS.values() if a != answer])
    words = answer[:-1].split(" ")
    for i in reversed(range(len(words))):  # the answer's content comes last
        w = words[i]
        for kind in (COLORS, SHAPES):
            if w in kind:
                words[i] = _choice(rng, [x for x in kind if x != w])
                return " ".join(words) + answer[-1]
    return None


# -- families ----------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, xs):
    return xs[int(rng.integers(len(xs)))]


def _image_count(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str]:
    n = int(rng.integers(1, tm.MAX_SHAPES + 1))
    specs = [(_choice(rng, SHAPES), _choice(rng, COLORS)) for _ in range(n)]
    return specs, "How many shapes are there?", count_answer(n)


def _image_count_color(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str]:
    color = _choice(rng, COLORS)
    k = int(rng.integers(0, tm.MAX_SHAPES + 1))  # shapes of that color
    n = int(rng.integers(max(k, 1), tm.MAX_SHAPES + 1))
    others = [c for c in COLORS if c != color]
    specs = [(_choice(rng, SHAPES), color) for _ in range(k)]
    specs += [(_choice(rng, SHAPES), _choice(rng, others)) for _ in range(n - k)]
    return specs, f"How many {color} shapes are there?", count_answer(k, color)


def _image_color(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str]:
    shape, color = _choice(rng, SHAPES), _choice(rng, COLORS)
    n = int(rng.integers(1, tm.MAX_SHAPES + 1))
    others = [s for s in SHAPES if s != shape]
    specs = [(shape, color)] + [(_choice(rng, others), _choice(rng, COLORS))
                                for _ in range(n - 1)]
    return specs, f"What color is the {shape}?", f"The {shape} is {color}."


def _image_shape(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str]:
    shape, color = _choice(rng, SHAPES), _choice(rng, COLORS)
    n = int(rng.integers(1, tm.MAX_SHAPES + 1))
    others = [c for c in COLORS if c != color]
    specs = [(shape, color)] + [(_choice(rng, SHAPES), _choice(rng, others))
                                for _ in range(n - 1)]
    return specs, f"Which shape is {color}?", f"The {color} shape is a {shape}."


IMAGE_FAMILIES = {"image-count": _image_count, "image-count-color": _image_count_color,
                  "image-color": _image_color, "image-shape": _image_shape}


PARAPHRASES = {
    "image-count": ("How many shapes?", "How many shapes do you see?", "Count the shapes.",
                    "How many shapes are in the picture?", "how many shapes are there",
                    "What is the number of shapes?", "How many shapes can you see?"),
    "image-count-color": ("How many {color} shapes?", "How many {color} shapes do you see?",
                          "Count the {color} shapes.", "How many shapes are {color}?",
                          "How many {color} shapes are in the picture?",
                          "how many {color} shapes are there"),
    "image-color": ("What colour is the {shape}?", "What is the color of the {shape}?",
                    "Which color is the {shape}?", "what color is the {shape}",
                    "Tell me the color of the {shape}."),
    "image-shape": ("What shape is {color}?", "Which shape is the {color} one?",
                    "What is the {color} shape?", "which shape is {color}",
                    "What kind of shape is {color}?"),
}


def _image_paraphrase(rng: np.random.Generator) -> Case:
    """Auxiliary: an image family's question in other words (``PARAPHRASES``), its answer."""
    sub = _choice(rng, tuple(IMAGE_FAMILIES))
    case = _image_case("image-paraphrase", sub, rng, spoken=False)
    words = case.question[:-1].split(" ")
    color = next((w for w in words if w in COLORS), "")
    shape = next((w for w in words if w in SHAPES), "")
    case.question = _choice(rng, PARAPHRASES[sub]).format(color=color, shape=shape)
    case.meta["question"] = case.question
    return case


def _image_case(family: str, sub: str, rng: np.random.Generator, spoken: bool,
                shape_px: tuple[int, int] = tm.SHAPE_PX) -> Case:
    specs, q, a = IMAGE_FAMILIES[sub](rng)
    png, meta = tm.render_image(specs, rng, shape_px)
    media = [Media("image", "png", png)]
    meta |= {"image_family": sub, "question": q}
    if spoken:
        wav, meta["speech"] = tm.spoken_question(q, rng)
        media.append(Media("audio", "wav", wav))
    return Case(family, media, None if spoken else q, a, meta)


def _sum(rng: np.random.Generator) -> tuple[str, str, dict]:
    """An arithmetic question, its answer, and its operands."""
    plus = bool(rng.random() < 0.5)
    a, b = (int(v) for v in rng.integers(0, 11, 2))
    if not plus and a < b:
        a, b = b, a
    op, c = ("plus", a + b) if plus else ("minus", a - b)
    q = f"What is {NUMBERS[a]} {op} {NUMBERS[b]}?"
    ans = f"{cap(NUMBERS[a])} {op} {NUMBERS[b]} is {NUMBERS[c]}."
    return q, ans, {"a": a, "b": b, "op": op, "question": q}


def _arithmetic(rng: np.random.Generator) -> Case:
    q, ans, meta = _sum(rng)
    if rng.random() < SPOKEN_P:
        wav, meta["speech"] = tm.spoken_question(q, rng)
        return Case("arithmetic", [Media("audio", "wav", wav)], None, ans, meta)
    return Case("arithmetic", [], q, ans, meta)


TYPED_FORMS = ("What is {a} {op} {b}?", "What is {a} {sym} {b}?", "What is {a}{sym}{b}?",
               "What's {a} {op} {b}?", "{a} {sym} {b} = ?", "{a} {op} {b}?", "what is {a} {op} {b}",
               "How much is {a} {op} {b}?")
TYPED_DIGIT_P = 0.8  # each operand is typed as digits this often, else as its word


def _typed_arithmetic(rng: np.random.Generator) -> Case:
    """Auxiliary: an arithmetic question typed with digits or symbols; the answer in words."""
    _, ans, meta = _sum(rng)
    form = _choice(rng, TYPED_FORMS)
    a, b = (str(v) if rng.random() < TYPED_DIGIT_P else NUMBERS[v] for v in (meta["a"], meta["b"]))
    q = form.format(a=a, b=b, op=meta["op"], sym="+" if meta["op"] == "plus" else "-")
    return Case("typed-arithmetic", [], q, ans, meta | {"question": q})


def _beeps(rng: np.random.Generator) -> Case:
    n = int(rng.integers(1, 6))
    wav, meta = tm.beeps(n, rng)
    ans = "I hear one beep." if n == 1 else f"I hear {NUMBERS[n]} beeps."
    return Case("beeps", [Media("audio", "wav", wav)], "How many beeps do you hear?", ans,
                meta | {"n": n})


def _video_motion(rng: np.random.Generator) -> Case:
    kind, color = _choice(rng, SHAPES), _choice(rng, COLORS)
    direction = _choice(rng, tuple(tm.DIRECTIONS))
    mp4, meta = tm.motion_video(kind, color, direction, rng)
    return Case("video-motion", [Media("video", "mp4", mp4)],
                f"Which way does the {color} {kind} move?", MOTION_ANSWERS[direction],
                meta | {"shape": kind, "color": color, "direction": direction})


def _audio_in_video(rng: np.random.Generator) -> Case:
    word = NUMBERS[int(rng.integers(1, 10))]
    mp4, color, meta = tm.color_change_video(word, rng)
    return Case("audio-in-video", [Media("video", "mp4", mp4)],
                "What color was the shape when the voice spoke?", f"It was {color}.", meta,
                use_audio_in_video=True)


def _repeat(rng: np.random.Generator) -> Case:
    n = int(rng.integers(REPEAT_WORDS[0], REPEAT_WORDS[1] + 1))
    words = [_choice(rng, REPEAT_VOCABULARY) for _ in range(n)]
    words = ["I" if w == "i" else w for w in words]
    text = " ".join(words)
    return Case("repeat", [], f"Repeat after me: {text}", cap(text) + ".", {"words": words})


def _spoken_repeat(rng: np.random.Generator) -> Case:
    """Auxiliary: a spoken question of the families or a spoken repeat list, to be written."""
    if rng.random() < 0.5:
        words = _repeat(rng)
        text, answer = " ".join(words.meta["words"]), words.answer
    else:
        sub = _choice(rng, (*IMAGE_FAMILIES, "arithmetic"))
        text = answer = _sum(rng)[0] if sub == "arithmetic" else IMAGE_FAMILIES[sub](rng)[1]
    wav, meta = tm.spoken_question(text, rng)
    return Case("spoken-repeat", [Media("audio", "wav", wav)], "Repeat after me.", answer,
                {"speech": meta, "text": text})


def _image_describe(rng: np.random.Generator) -> Case:
    """Auxiliary: 1-6 shapes, the answer names each (colour and kind) by its left edge."""
    n = int(rng.integers(1, tm.MAX_SHAPES + 1))
    png, meta = tm.render_image([(_choice(rng, SHAPES), _choice(rng, COLORS)) for _ in range(n)],
                                rng)
    names = [f"a {s['color']} {s['kind']}"
             for s in sorted(meta["shapes"], key=lambda s: (s["x"], s["y"]))]
    text = names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return Case("image-describe", [Media("image", "png", png)], DESCRIBE_QUESTION,
                cap(text) + ".", meta)


def make_case(family: str, rng: np.random.Generator) -> Case:
    """One case of ``family`` (one of FAMILIES or TRAINING_FAMILIES), all randomness from
    ``rng``."""
    if family in IMAGE_FAMILIES:
        return _image_case(family, family, rng, spoken=False)
    if family == "spoken-image":
        return _image_case(family, _choice(rng, tuple(IMAGE_FAMILIES)), rng, spoken=True)
    if family == "arithmetic":
        return _arithmetic(rng)
    if family == "beeps":
        return _beeps(rng)
    if family == "video-motion":
        return _video_motion(rng)
    if family == "audio-in-video":
        return _audio_in_video(rng)
    if family == "chat":
        return Case("chat", [], _choice(rng, CHAT_QUESTIONS), CHAT_ANSWER)
    if family == "repeat":
        return _repeat(rng)
    if family == "spoken-repeat":
        return _spoken_repeat(rng)
    if family == "image-describe":
        return _image_describe(rng)
    if family == "typed-arithmetic":
        return _typed_arithmetic(rng)
    if family == "image-paraphrase":
        return _image_paraphrase(rng)
    if family == SIZED_FAMILY:
        band = SIZE_BANDS[int(rng.integers(len(SIZE_BANDS)))]
        return _image_case(family, _choice(rng, ("image-count", "image-count-color")), rng,
                           spoken=False, shape_px=band)
    raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")


def check_families(families: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``families`` as a tuple, or a ValueError naming the first that is neither a task family
    nor a training-only one."""
    for f in families:
        if f not in FAMILIES + TRAINING_FAMILIES:
            raise ValueError(f"unknown family {f!r} (one of {', '.join(FAMILIES)}; "
                             f"training-only: {', '.join(TRAINING_FAMILIES)})")
    return tuple(families)


def case_rng(seed: int, family: str, i: int) -> np.random.Generator:
    """The random stream of case ``i`` of ``family`` for ``seed``."""
    return np.random.default_rng([seed, (*FAMILIES, *TRAINING_FAMILIES).index(family), i])


# -- dataset -----------------------------------------------------------------------------------


def vary_levels(case: Case, rng: np.random.Generator) -> list[dict]:
    """Training only: every WAV of ``case`` at a random level, sometimes through a gain control
    (``tasks_media.vary_level``), in place; returns each one's meta."""
    from omnistream.media.audio import decode_audio

    metas = []
    for m in case.media:
        if m.ext == "wav":
            pcm, sr = decode_audio(m.data)
            pcm, meta = tm.vary_level(pcm, sr, rng)
            m.data = tm.wav_bytes(pcm, sr)
            metas.append(meta)
    return metas


def render_case(seed: int, family: str, i: int, levels: bool = False
                ) -> tuple[Case, list[dict] | None]:
    """Case ``i`` of ``family`` for ``seed`` and, with ``levels``, its WAVs then drawn at random
    levels from the same stream (``vary_levels``' metas; None without): what the generator
    writes and the evaluation plays."""
    rng = case_rng(seed, family, i)
    case = make_case(family, rng)
    return case, vary_levels(case, rng) if levels else None


def make_dataset(out_dir: str | Path, n_per_family: int | dict[str, int], seed: int,
                 families: list[str] | tuple[str, ...] | None = None,
                 progress: bool = True, levels: bool = False) -> Path:
    """``n_per_family`` cases of each family (default: all; a dict: its families, each with its
    own number) written under ``out_dir``: media in
    ``out_dir/media/{family}/``, records in ``out_dir/data.jsonl`` (family by family, case by
    case). ``levels``: the same cases with their WAVs at random levels (``vary_levels``; for
    training only: TASKS.md's renderings keep the voices' level). The same arguments write the
    same bytes. Returns the JSONL path."""
    from tqdm import tqdm

    if isinstance(n_per_family, dict):
        if families is not None:
            raise ValueError("families come from n_per_family's keys: give one or the other")
        families = list(n_per_family)
    families = check_families(FAMILIES if families is None else families)
    counts = (n_per_family if isinstance(n_per_family, dict)
              else dict.fromkeys(families, n_per_family))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f, i) for f in families for i in range(counts[f])]
    lines = []
    for f, i in tqdm(jobs, desc="omni-mini cases", disable=not progress, unit="case"):
        case, level = render_case(seed, f, i, levels)
        paths = []
        for k, m in enumerate(case.media):
            rel = f"media/{f}/{i:06d}_{k}.{m.ext}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(m.data)
            paths.append(rel)
        rec = case.record(paths) | {"case": [seed, f, i]}
        if level is not None:
            rec["levels"] = level
        lines.append(json.dumps(rec, ensure_ascii=False))
    from omnistream.train.model import write_lines

    path = out / "data.jsonl"  # whole or not at all: `make mini` takes it as the step's mark
    write_lines(path, lines)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m omnistream.train.tasks OUT --n-per-family N --seed S [--families a,b]``."""
    p = argparse.ArgumentParser(prog="python -m omnistream.train.tasks",
                                description="Write omni-mini task cases (TASKS.md) as JSONL.")
    p.add_argument("out", type=Path)
    p.add_argument("--n-per-family", type=int, default=100)
    p.add_argument("--seed", type=int, default=0,
                   help=f"training: < {EVAL_SEED_BASE}; evaluation: >= {EVAL_SEED_BASE}")
    p.add_argument("--families", default=None, help="comma-separated (default: all)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--levels", action="store_true",
                   help="training only: audio at random levels, sometimes through a gain control")
    a = p.parse_args(argv)
    fams = a.families.split(",") if a.families else None
    print(make_dataset(a.out, a.n_per_family, a.seed, fams, progress=not a.no_progress,
                       levels=a.levels))


if __name__ == "__main__":
    main()
