"""Seeded English sentences for speech data: general sentences from a small grammar, and the
vocabulary and answer forms of the omni-mini tasks (``../shared/mini/TASKS.md``).

Deterministic for a seed. Held-out sets use their own seeds and exclude every training sentence.
"""

from __future__ import annotations

import random

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty").split()
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("to the left", "to the right", "up", "down")

_PEOPLE = ("the teacher", "my brother", "our neighbor", "a young girl", "the old man", "the doctor",
           "my friend", "the farmer", "a small boy", "the captain", "her mother", "the driver",
           "his sister", "the baker", "a tall woman", "the pilot", "my uncle", "the children",
           "the student", "a stranger", "the king", "the nurse", "our guide", "the artist")
_NAMES = ("Anna", "Peter", "Maria", "David", "Laura", "James", "Sofia", "Thomas", "Emma", "Lucas",
          "Olivia", "Daniel", "Grace", "Henry", "Chloe", "Samuel", "Ruby", "Oscar", "Alice", "Jack")
_VERBS_T = ("found", "painted", "carried", "opened", "cleaned", "bought", "sold", "fixed",
            "watched", "followed", "dropped", "lifted", "washed", "counted", "borrowed", "pushed",
            "pulled", "visited", "remembered", "described", "noticed", "packed", "wrapped", "built")
_THINGS = ("a wooden box", "the heavy door", "an old letter", "the broken chair",
           "a glass of water", "the morning paper", "a basket of apples", "the garden gate",
           "a silver key", "the kitchen window", "a paper kite", "the music box", "a bag of rice",
           "the blue bicycle", "a warm blanket", "the village map", "a loaf of bread",
           "the golden ring", "a small boat", "the empty bottle", "a pair of shoes",
           "the birthday cake", "a stack of books", "the lost umbrella", "a cup of tea",
           "the yellow lamp", "a piece of chalk")
_PLACES = ("in the park", "near the river", "at the station", "behind the house", "on the hill",
           "in the kitchen", "at the market", "by the lake", "in the library", "under the bridge",
           "at school", "in the garden", "on the beach", "in the forest", "at the office",
           "in the city", "on the farm", "at the harbor", "in the museum", "near the church")
_TIMES = ("yesterday", "this morning", "last night", "on Sunday", "after lunch", "before dinner",
          "every day", "in the spring", "at noon", "last summer", "early today", "in the evening",
          "on Monday", "once again", "last week", "at midnight")
_ADJS = ("quiet", "bright", "cold", "busy", "strange", "beautiful", "dark", "warm", "crowded",
         "peaceful", "windy", "sunny", "noisy", "clean", "lovely", "empty", "huge", "tiny")
_NOUNS = ("room", "street", "morning", "garden", "kitchen", "city", "river", "road", "sky", "town",
          "house", "valley", "market", "forest", "school", "window", "night", "field")
_VERBS_I = ("laughed", "smiled", "waited", "slept", "sang", "danced", "worked", "listened",
            "walked home", "stayed inside", "came back", "ran away", "sat down", "stood up")
_WEATHER = ("It is raining", "The wind is strong", "The sun is shining", "It is very cold",
            "The sky is clear", "It might snow", "The air feels warm", "Clouds are moving fast")
_QUESTIONS = ("Where did you put", "Have you seen", "Who bought", "Why did you move",
              "When will you clean", "Can you carry", "Could you open", "Did anyone find")
_CONNECT = ("because", "while", "although", "before", "after", "so")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def general_sentence(rng: random.Random) -> str:
    """One sentence from the grammar (statements, questions, exclamations, numbers)."""
    p, q = rng.choice(_PEOPLE + _NAMES), rng.choice(_PEOPLE + _NAMES)
    kind = rng.randrange(9)
    if kind == 0:
        s = f"{p} {rng.choice(_VERBS_T)} {rng.choice(_THINGS)} {rng.choice(_PLACES)}."
    elif kind == 1:
        s = f"{rng.choice(_TIMES)}, {p} {rng.choice(_VERBS_I)} {rng.choice(_PLACES)}."
    elif kind == 2:
        s = f"The {rng.choice(_NOUNS)} was {rng.choice(_ADJS)} and {rng.choice(_ADJS)}."
    elif kind == 3:
        s = f"{rng.choice(_QUESTIONS)} {rng.choice(_THINGS)}?"
    elif kind == 4:
        s = f"{rng.choice(_WEATHER)}, {rng.choice(_CONNECT)} {q} {rng.choice(_VERBS_I)}."
    elif kind == 5:
        n = rng.choice(NUMBERS[2:])
        s = f"{p} {rng.choice(_VERBS_T)} {n} {rng.choice(_COUNTABLE)} {rng.choice(_TIMES)}."
    elif kind == 6:
        s = (f"{p} {rng.choice(_VERBS_I)} {rng.choice(_CONNECT)} {q} "
             f"{rng.choice(_VERBS_T)} {rng.choice(_THINGS)}.")
    elif kind == 7:
        s = f"What a {rng.choice(_ADJS)} {rng.choice(_NOUNS)} this is!"
    else:
        s = f"I think {q} {rng.choice(_VERBS_T)} {rng.choice(_THINGS)} {rng.choice(_TIMES)}."
    return _cap(s)


_COUNTABLE = ("apples", "letters", "chairs", "books", "birds", "boxes", "cups", "stones", "coins",
              "shirts", "candles", "flowers")


def task_sentence(rng: random.Random) -> str:
    """A sentence in the form of an omni-mini answer or question (task vocabulary)."""
    c, s, n = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(NUMBERS[2:7])
    a, b = rng.randrange(11), rng.randrange(11)
    kind = rng.randrange(12)
    if kind == 0:
        return f"There are {n} shapes." if rng.random() < 0.8 else "There is one shape."
    if kind == 1:
        return rng.choice((f"There are {n} {c} shapes.", f"There is one {c} shape.",
                           f"There are no {c} shapes."))
    if kind == 2:
        return f"The {s} is {c}."
    if kind == 3:
        return f"The {c} shape is a {s}."
    if kind == 4:
        a, b = max(a, b), min(a, b)
        return f"{_cap(NUMBERS[a])} minus {NUMBERS[b]} is {NUMBERS[a - b]}."
    if kind == 5:
        return f"{_cap(NUMBERS[a])} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    if kind == 6:
        return f"I hear {n} beeps." if rng.random() < 0.8 else "I hear one beep."
    if kind == 7:
        return f"It moves {rng.choice(DIRECTIONS)}."
    if kind == 8:
        return f"It was {c}."
    if kind == 9:
        return "Hello! I am omnistream, a small model that can see, hear and talk."
    if kind == 10:
        return rng.choice(("How many shapes are there?", f"How many {c} shapes are there?",
                           f"What color is the {s}?", f"Which shape is {c}?",
                           f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                           "How many beeps do you hear?", f"Which way does the {c} {s} move?",
                           "What color was the shape when the voice spoke?", "Who are you?"))
    words = repeat_vocabulary()
    return _cap(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))) + "."


def repeat_vocabulary() -> list[str]:
    """Words for the repeat task: the tasks' vocabulary and the words of their answers."""
    w = set(NUMBERS) | set(COLORS) | set(SHAPES) | {"shapes", "beeps", "beep", "shape"}
    w |= set("there are is one no the a plus minus hear moves to left right up down it was "
             "hello i am small model that can see and talk color which way does move how many "
             "what you do voice spoke when".split())
    return sorted(w)


def sentences(n: int, seed: int, task_fraction: float = 0.3,
              exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct sentences (``task_fraction`` of them in task form), none in ``exclude``."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct sentences (got {len(out)})")
        s = task_sentence(rng) if rng.random() < task_fraction else general_sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
