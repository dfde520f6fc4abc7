"""omni-mini from scratch in one command, resumable: data, the paper's stages, the shipped model.

    python -m omnistream.train.mini --out artifacts/mini --codec DIR [--ship models/omni-mini]

(``make mini CODEC=DIR``). Every step leaves a finished mark and is skipped when the command is
run again; a stage that was interrupted resumes from its last checkpoint (``save_every`` in its
config). Steps, in order (``OUT/...``):

1. ``data/``: ``--n-per-family`` cases of every task family (``train.tasks``, seed 0), split into
   ``text.jsonl`` (no media), ``media.jsonl`` (with media) and ``data.jsonl`` (all);
   ``talker_repeat/data.jsonl``: ``--talker-repeat`` more ``repeat`` cases (word lists to copy),
   and ``copy.jsonl``, the same with an empty system prompt; the later stages' cases (below).
   When the Talker's stage comes, its targets: ``talker.jsonl``: the records with ``speech``,
   the reply spoken whole in the Piper voice at length_scale 1.0
   (``train.voices.piper_sentence``), ``speech_units`` (where each word is, from Piper's
   phoneme durations, for the Talker's guided attention) and ``codec_ids``, the codec's codes
   of that recording.
   ``talker_repeat/talker.jsonl``: the word lists spoken the same way (the Talker's many
   distinct replies).
   ``talker_counter.jsonl``: the task records again with the reply's content word changed
   (``add_counterfactuals``), so the Talker learns to say the tokens it is given.
   ``talker_c.jsonl`` and ``talker_counter_c.jsonl``: the same, each templated reply and each
   true sum spoken at the Piper speed whose codec round trip the recognizer hears best
   (``train.clear_speech``).
2. ``init/``: the from-scratch checkpoint (``mini_model.init_mini``: random Thinker and Talker,
   the codec's Token2Wav, speech encoder and voice; that Token2Wav was trained on this voice's
   sentences and renders the Talker's codes as it is).
3. Stages through ``omnistream train`` (``configs/train/mini_*.json``), each from the previous
   one's output: ``stage0_copy`` (the LLM learns to copy: ``copy.jsonl``), ``stage0_text`` (the
   LLM on the text families and the lists: it stands in for the pretrained Qwen2.5 LLM the paper
   starts from), ``stage0_vision`` and ``stage0_hearing`` (the
   encoders told what each image token shows and which words a clip says: ``train/dense.py``,
   on ``data/vision/`` and ``data/hearing/``), ``stage0_refreshed`` (its token-embedding rows
   drawn again for the tokens that stage 0 never saw: ``mini_model.refresh``),
   ``stage1_align`` (encoders aligned with the LLM frozen),
   ``stage2_all`` (everything on all families and the training-only ones in ``data/aux/``,
   in batches that mix the families),
   ``stage2b_all`` (the same, continued with a warm restart), ``stage2c_fresh`` (the same
   again with fresh cases, most of them of the families the Thinker answers worst:
   ``data/fresh/``, ``data/fresh_rest/``, and audio at random microphone levels:
   ``data/levels/``), ``stage2e_round`` (a round on new cases of every family, the image and
   training-only ones weighted, ``data/round/``: the shipped Thinker's eighth round),
   ``stage2d_count`` (the same as 2c again with 7,000 fresh counting cases,
   ``data/count/``, the vision tower at 0.3 of the rate: counting was the weakest skill),
   ``stage2f_count`` (2d once more, with 7,000 other counting cases, ``data/count2/``),
   ``stage2g_count_only`` and ``stage2h_count_only`` (counting cases alone: ``data/count*/``,
   with ``data/count_sized/``, shapes all small or all large), ``stage2i_round`` (2d's round
   again, with ``data/count3/``, so that the other families come back), ``stage2j_sums``
   (the same round once more, with spoken and typed sums twice, ``data/sums/``),
   ``stage2k_average`` (0.7 of 2j and 0.3 of 2h, tensor by tensor: ``mini_model.mix``),
   ``stage2l_repair400``, ``stage2l_repair700``, ``stage2l_repair1000`` and
   ``stage2l_motion700`` (2j's round from that average for 400 to 1,000 steps, the last with
   new motion clips, ``data/motion/``), ``stage2m_soup`` (their mean), ``stage2n_motion``
   (200 steps on the motion clips, the plain cases and ``data/count3/``),
   ``stage2b_balanced`` (the same
   model with its token embeddings stronger in the Talker's text track, the Thinker's outputs
   unchanged: ``mini_model.balance``), ``stage3_talker`` (the Talker).
4. ``data/dpo.jsonl``: preference pairs of sampled speech ranked by the recognizer's WER and by
   pause errors (``train.dpo_pairs``), then ``stage4_dpo`` (Talker DPO).
5. The shipped copy (``--ship``, default ``models/omni-mini``: bf16 Thinker/Talker,
   ``mini_model.ship``) and its evaluation on fresh cases (``omnistream eval``), kept in
   ``OUT/eval.txt``.

``--until STAGE`` stops after that stage (``--until stage2n_motion``: the Thinker alone). Time on
the 2-core CPU this was sized on: see ``docs/MINI.md``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omnistream.models import REPO_ROOT
from omnistream.train.loop import LOG_FILE, STAGE_FILE
from omnistream.train.mini_speech import add_counterfactuals, add_speech, codec_encoder
from omnistream.train.model import write_lines

_ROOT = REPO_ROOT or Path.cwd()
STAGE_DIR = _ROOT / "configs" / "train"
RUNNING = "running.json"  # the step in progress: its name, process id and start time
# The task families have about a thousand distinct replies, which the Talker learns by heart and
# cannot say when they are new (the unseen word lists of ``repeat``, new sums). Repeat cases are
# text only and cheap to speak: thousands of random word lists over the tasks' vocabulary teach it
# the words instead of the sentences.
TALKER_REPEAT = "talker_repeat"
# The same lists, the Thinker's first lesson (``stage0_copy``): written with an empty system
# prompt. A constant prefix as long as the speech system prompt kept a toy of the LLM's shape from
# learning to copy in 1,000 steps, and lists shown without it first carried over to the prefixed
# ones in 100 steps (docs/MINI.md, thirty-fourth session); ``stage0_text`` then shows them with it.
COPY = "copy.jsonl"
# Replies that contradict their media (``add_counterfactuals``): trained on true replies only, the
# Talker says what the Thinker's hidden states expect rather than the token it is given.
TALKER_COUNTER = "talker_counter.jsonl"
# The two files again with each templated reply spoken in its clearest rendering (the Talker
# learns those replies by heart: ``train.clear_speech``, fifteenth session).
TALKER_CLEAR, TALKER_COUNTER_CLEAR = "talker_c.jsonl", "talker_counter_c.jsonl"
VISION = "vision"  # images with their shapes, motion clips with their direction (dense vision)
VISION_IMAGES = 6000  # items: every fifth a video-motion clip (dense.VISION_FAMILIES)
HEARING = "hearing"  # spoken word lists and questions with their text, for the hearing stage
HEARING_CLIPS = 4000
# Training-only families beside the tasks in stages 2 and 2b (``tasks.AUX_FAMILIES``):
# ``image-describe`` names every shape's colour and kind, which teaches the LLM to bind the two
# (the seventh session: 58.2% -> 67.3% on fresh cases with it); ``spoken-repeat`` writes down
# spoken word lists, the words the spoken questions use; ``typed-arithmetic`` and
# ``image-paraphrase`` ask sums with digits and symbols and the image questions in other words,
# as users type them (nineteenth session).
AUX = "aux"
BASE_CASES = 800  # cases per family; the other counts here are for this many
AUX_CASES = 3000
# Fresh cases for a last Thinker round (``stage2c_fresh``): the omni-mini Thinker kept gaining
# from rounds on cases it had not seen (fifteenth and sixteenth sessions: 88.9% -> 93.5% ->
# 94.9% on 550 fresh cases, docs/MINI.md), most from the families it answered worst (listed
# twice), with a few of each other family so that none is forgotten.
FRESH, FRESH_REST = "fresh", "fresh_rest"
# added to the recipe's seed: cases the earlier stages never saw
FRESH_SEEDS = (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
FRESH_FAMILIES = ("image-count-color", "spoken-image", "image-color", "image-count", "arithmetic")
FRESH_CASES, FRESH_REST_CASES = 1500, 600
# With them, cases whose audio comes at random microphone levels, sometimes levelled by a gain
# control (``tasks.make_dataset(levels=True)``): trained at the voices' own level, omni-mini
# misheard quiet, loud and browser-levelled questions (twenty-first session, docs/MINI.md).
LEVELS = "levels"
LEVEL_FAMILIES = ("arithmetic", "spoken-image", "spoken-repeat", "beeps")
LEVEL_CASES = 1000
# Then a round on new cases of every family (``stage2e_round``; omni-mini v8's, twentieth and
# twenty-first sessions: 95.1% -> 96.0% on 550 fresh cases, typed sums 6% -> 92%): from a
# from-scratch recipe run, whose Thinker had only stages 2c and 2d of this kind, came 80.7%
# against the shipped 96.0% (image-color 72%, image-shape 68%; twenty-eighth session), and every
# round of new cases had gained on the shipped line (v4 88.9% -> v5 93.5% -> v6 94.9%). The mix
# is v8's: every family, the image and training-only families weighted, text records twice.
ROUND = "round"
ROUND_CASES = {"image-count-color": 2000, "spoken-image": 1500, "repeat": 1000,
               "typed-arithmetic": 2500, "image-paraphrase": 2000, "image-describe": 1500,
               "spoken-repeat": 1000}  # the other task families: BASE_CASES each
# Then a counting round (``stage2d_count``; omni-mini v9, twenty-second session: image-count-color
# 82% -> 86%, spoken-image 86% -> 88% on 50 fresh cases each): every miscount of v8 was a count
# off by one, and the vision tower learns at 0.3 of the rate instead of 0.1.
COUNT = "count"
COUNT_CASES = {"image-count-color": 3000, "spoken-image": 2500, "image-count": 1500}
# Then the same round once more on new counting cases (``stage2f_count``; thirty-seventh
# session): the shipped line went through more rounds than the recipe (v5, v6, v8, v9), and the
# third run's Thinker still counted worse than v10 after 2d. On 600 fresh counting questions it
# took that Thinker from 86.2% to 88.3% (v10 89.8%); a third such round gained nothing more.
COUNT2 = "count2"
# Then two stages on counting cases alone and a round on every family (``stage2g_count_only``,
# ``stage2h_count_only``, ``stage2i_round``; forty-fourth session): in the mixed rounds the Thinker
# estimated counts from the asked colour's area and gained nothing from more of them; 33,000
# counting cases alone at a higher rate (3e-4), a third of them with shapes all small or all
# large (``tasks.SIZED_FAMILY``), then 14,000 more with them (2e-4), took v10's Thinker from
# 89.8% to 95.8% on 600 fresh counting questions; they make it forget every other family, and
# the mixed round after them brings those back (the 550 at 97.1%) and keeps 93.8%. That round
# sees the cases at microphone levels twice: once, it left spoken sums at a quiet or loud level
# misheard (5 and 6 of 10 right; a further 1,000 steps with them twice: 8 and 7).
COUNT3, SIZED, COUNT4 = "count3", "count_sized", "count4"
SIZED_CASES = 12000
COUNT4_CASES = {"image-count-color": 8000, "image-count": 4000, "spoken-image": 2000}
_COUNT_ONLY = tuple(f"{d}/data.jsonl" for d in (COUNT, COUNT2, COUNT3, SIZED))
# Then the round once more at half its rate, with sums twice (``stage2j_sums``; forty-sixth
# session): after the counting stages the round brought the sums back only to 92% (v10 99.3% on
# 300 fresh ones), most misses a result off by one ("Ten plus ten is nineteen."); this stage
# brings them to 98.3% and keeps the counting.
SUMS = "sums"
SUMS_CASES = {"arithmetic": 4000, "typed-arithmetic": 1000}
# Then an average, repairs of it, their mean and a motion stage (``stage2k_average`` to
# ``stage2n_motion``; omni-mini v12, forty-seventh to fiftieth sessions): 2h, which has just
# counted alone, counts best and has forgotten the rest; 0.3 of it and 0.7 of 2j count 96.8% on
# 600 fresh counting questions (2j 94.5%) but copy few lists. Short rounds of 2j's data bring the
# lists back, each length trading some counting for the rest; the mean of four of them keeps the
# counting and the other families (the 600 96.3%, the 550 98.4%) but sees motion two points
# worse, and 200 steps at a low rate on new motion clips (``data/motion/``) bring it back.
MOTION = "motion"
MOTION_CASES = {"video-motion": 2000}
MERGES = {  # a checkpoint that is a weighted mean of finished stages: {name: ((stage, weight),)}
    "stage2k_average": (("stage2j_sums", 0.7), ("stage2h_count_only", 0.3)),
    "stage2m_soup": tuple((f"stage2l_{r}", 0.25)
                          for r in ("repair400", "repair700", "repair1000", "motion700")),
}
THINKER = "stage2n_motion"  # the finished Thinker, balanced for the Talker
# The Thinker's hidden states drown its token embeddings in the Talker's text track (norms about
# 21 and 1 in v3-v10): ``mini_model.balance`` rescales the finished Thinker (outputs unchanged) so
# that the Talker reads each token alpha**2 times louder (docs/MINI.md, fourteenth session: alpha 8
# read better than 4). alpha is sized from the finished Thinker's own norms on the spoken lists,
# to bring their ratio to TEXT_TRACK_RATIO, v10's (hidden 2.74 against embedding 8.59 after its
# alpha 8): the thirty-fifth session's larger embedding init leaves a ratio near 5, not 21.
BALANCED = "stage2b_balanced"
TEXT_TRACK_RATIO = 0.32
# The encoders' dense stages' checkpoint with fresh token-embedding rows for the tokens that the
# later stages' records hold and stage 0's never did (the colours and shapes of the media
# families' replies, the digits of typed sums): stage 0 pushed those rows, all alike, down its
# tied head (``mini_model.refresh_rows``; nineteenth session), and stage 1, with the LLM frozen,
# could not make it tell one such word from another.
REFRESHED = "stage0_refreshed"
# (output folder, stage config, training data in OUT/data, source: "init" or a previous stage).
# Stage 2 sees the text records twice: they are short (cheap) and teach the copying that the
# answers of most families need (operands, repeated words, the asked color or shape). Stage 2b
# goes on from it with a warm restart of the learning rate: at the end of stage 2's schedule the
# Thinker was still learning (docs/MINI.md).
# Stage 0 starts with the copy (``COPY``) and keeps the lists beside the text records: the LLM
# that had never learnt to copy answered no unseen list in the end (the second run, repeat 0%).
# Stages 0v and 0h teach the encoders what every token shows or says (``train/dense.py``): from
# the answers alone the vision encoder learns the shapes' colours but hardly their kinds, and the
# audio encoder a question's template but hardly its words. Later stages train the encoders at a
# tenth of the rate (``lr_scale``), which keeps what these stages taught.
# The counting rounds' data besides their own counting cases (2c's, without its second copy of
# the fresh cases).
_COUNT_ROUND = ("data.jsonl", "text.jsonl", f"{AUX}/data.jsonl", f"{FRESH}/data.jsonl",
                f"{FRESH_REST}/data.jsonl", f"{LEVELS}/data.jsonl")
_ROUND_I = (*_COUNT_ROUND, f"{LEVELS}/data.jsonl", f"{COUNT3}/data.jsonl")
_SUMS_ROUND = (*_ROUND_I, f"{SUMS}/data.jsonl", f"{SUMS}/data.jsonl")
_REPAIR = (*_SUMS_ROUND, "text.jsonl")
STAGES = (
    ("stage0_copy", "mini_0_copy.json", (COPY,), "init"),
    ("stage0_text", "mini_0_text.json", ("text.jsonl", f"{TALKER_REPEAT}/data.jsonl"),
     "stage0_copy"),
    ("stage0_vision", "mini_vision.json", (f"{VISION}/vision.jsonl",), "stage0_text"),
    ("stage0_hearing", "mini_hearing.json", (f"{HEARING}/hearing.jsonl",), "stage0_vision"),
    ("stage1_align", "mini_1_align.json", ("media.jsonl",), REFRESHED),
    ("stage2_all", "mini_2_all.json", ("data.jsonl", "text.jsonl", f"{AUX}/data.jsonl"),
     "stage1_align"),
    ("stage2b_all", "mini_2b_all.json", ("data.jsonl", "text.jsonl", f"{AUX}/data.jsonl"),
     "stage2_all"),
    ("stage2c_fresh", "mini_2c_fresh.json", ("data.jsonl", "text.jsonl", f"{AUX}/data.jsonl",
                                             f"{FRESH}/data.jsonl", f"{FRESH}/data.jsonl",
                                             f"{FRESH_REST}/data.jsonl", f"{LEVELS}/data.jsonl"),
     "stage2b_all"),
    ("stage2e_round", "mini_2e_round.json", (f"{ROUND}/data.jsonl", f"{ROUND}/text.jsonl",
                                             f"{AUX}/data.jsonl", f"{LEVELS}/data.jsonl"),
     "stage2c_fresh"),
    ("stage2d_count", "mini_2d_count.json", (*_COUNT_ROUND, f"{COUNT}/data.jsonl"),
     "stage2e_round"),
    ("stage2f_count", "mini_2d_count.json", (*_COUNT_ROUND, f"{COUNT2}/data.jsonl"),
     "stage2d_count"),
    ("stage2g_count_only", "mini_2g_count_only.json", _COUNT_ONLY, "stage2f_count"),
    ("stage2h_count_only", "mini_2h_count_only.json", (f"{COUNT4}/data.jsonl", *_COUNT_ONLY),
     "stage2g_count_only"),
    ("stage2i_round", "mini_2d_count.json", _ROUND_I, "stage2h_count_only"),
    ("stage2j_sums", "mini_2j_sums.json", _SUMS_ROUND, "stage2i_round"),
    ("stage2l_repair400", "mini_2l_repair400.json", _REPAIR, "stage2k_average"),
    ("stage2l_repair700", "mini_2l_repair700.json", _REPAIR, "stage2k_average"),
    ("stage2l_repair1000", "mini_2l_repair1000.json", _REPAIR, "stage2k_average"),
    ("stage2l_motion700", "mini_2l_repair700.json", (*_REPAIR, f"{MOTION}/data.jsonl"),
     "stage2k_average"),
    (THINKER, "mini_2n_motion.json",
     (f"{MOTION}/data.jsonl", "data.jsonl", "text.jsonl", f"{COUNT3}/data.jsonl"), "stage2m_soup"),
    ("stage3_talker", "mini_3_talker.json",
     (TALKER_CLEAR, f"{TALKER_REPEAT}/talker.jsonl", TALKER_COUNTER_CLEAR), BALANCED),
    ("stage4_dpo", "mini_4_dpo.json", ("dpo.jsonl",), "stage3_talker"),
)


def log(msg: str) -> None:
    print(f"[mini {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ----------------------------------------------------------------------------------------


def split_records(data: Path) -> dict[str, int]:
    """Write ``text.jsonl`` (records without media) and ``media.jsonl`` (with media) beside
    ``data`` (the whole set); returns the counts."""
    text, media = [], []
    for line in data.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        has_media = any(isinstance(m["content"], list)
                        and any(p.get("type") != "text" for p in m["content"])
                        for m in rec["messages"])
        (media if has_media else text).append(line)
    for name, lines in (("text.jsonl", text), ("media.jsonl", media)):
        write_lines(data.parent / name, lines)
    return {"text": len(text), "media": len(media)}


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# -- steps ---------------------------------------------------------------------------------------


def _done(path: Path, what: str) -> bool:
    if path.exists():
        log(f"{what}: done ({path})")
        return True
    log(f"{what}: running")
    return False


def _run(cmd: list[str]) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def refresh_step(out: Path, seed: int) -> int:
    """``OUT/stage0_refreshed``: the encoders' dense stages' checkpoint with fresh embedding rows
    for the tokens of the later Thinker stages' records that stage 0's never held
    (``mini_model.refresh``); returns how many rows were drawn."""
    from omnistream.train.mini_model import refresh
    from omnistream.train.stages import Stage

    names = [n for n, *_ in STAGES]
    first = next(i for i, (*_, src) in enumerate(STAGES) if src == REFRESHED)
    # new: the Thinker stages from the first on fresh rows; seen: the records of stage 0's
    # Thinker stages (the copy and the text; the dense stages' records hold no messages)
    later = sorted({f for *_, d, _ in STAGES[first:names.index(THINKER) + 1] for f in d})
    seen = sorted({f for _, cfg, d, _ in STAGES[:first] for f in d
                   if Stage.from_file(STAGE_DIR / cfg).task == "thinker"})
    _, k = refresh(out / names[first - 1], out / REFRESHED, [out / "data" / f for f in later],
                   [out / "data" / f for f in seen], seed)
    return k


def copy_lists(lists: Path, out: Path) -> int:
    """``out``: the records of ``lists`` with an empty system prompt (``COPY``); returns the
    record count."""
    lines = []
    for line in lists.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["messages"][0]["role"] != "system":
            raise ValueError(f"{lists}: a record without a system turn")
        rec["messages"][0]["content"] = ""
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_lines(out, lines)
    return len(lines)


def last_seed() -> int:
    """The largest training seed whose cases (``seed + FRESH_SEEDS`` too) stay below the
    evaluation seeds."""
    from omnistream.train.tasks import EVAL_SEED_BASE

    return EVAL_SEED_BASE - max(FRESH_SEEDS) - 1


def run(out: str | Path, codec: str | Path | None, n_per_family: int = BASE_CASES, seed: int = 0,
        ship_dir: str | Path | None = None, eval_n: int = 10, dpo_prompts: int = 22,
        dpo_samples: int = 4, max_steps_scale: float = 1.0, talker_repeat_n: int = 10000,
        until: str | None = None) -> Path:
    """Run every step not yet done (see the module docstring); returns the shipped directory,
    or with ``until`` (a stage's name) that stage's, the run stopped after it."""
    from omnistream.train.tasks import EVAL_SEED_BASE

    if not 0 <= seed <= last_seed():  # never train on evaluation cases
        raise ValueError(f"training seed {seed}: use 0 .. {last_seed()}"
                         f" (evaluation seeds start at {EVAL_SEED_BASE})")
    if until is not None and until not in {n for n, *_ in STAGES}:
        raise ValueError(f"no stage {until!r}: the stages are {', '.join(n for n, *_ in STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    t_start = time.time()
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def scaled(n: int, least: int = 1) -> int:  # a count written for BASE_CASES per family
        return max(n * n_per_family // BASE_CASES, least)

    def timed(name: str, fn) -> None:
        t = time.time()
        # --status names the step in progress (a data step has no log of its own); a step
        # that fails or is killed leaves the mark, with a process that is gone
        (out / RUNNING).write_text(json.dumps({"step": name, "pid": os.getpid(), "since": t}))
        fn()
        timings[name] = round(timings.get(name, 0.0) + time.time() - t, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        (out / RUNNING).unlink()

    init = out / "init"
    if not (init / "config.json").is_file() and (
            codec is None or not (Path(codec) / "model.safetensors").is_file()):
        raise SystemExit(f"no trained speech codec at {codec}: train one (configs/train/"
                         "codec*.json) and pass --codec DIR (make mini CODEC=DIR)")

    # 1. data (the Talker's targets through the codec's encoder, loaded by the first step that
    # speaks)
    encoder = functools.cache(lambda: codec_encoder(codec if codec is not None else init))
    data_dir = out / "data"
    data = data_dir / "data.jsonl"
    if not _done(data, "data"):
        from omnistream.train.tasks import make_dataset

        timed("data", lambda: make_dataset(data_dir, n_per_family, seed))
    if not _done(data_dir / "media.jsonl", "split"):
        log(f"split: {split_records(data)}")
    repeat_dir = data_dir / TALKER_REPEAT
    if not _done(repeat_dir / "data.jsonl", "copying lists"):
        from omnistream.train.tasks import make_dataset

        timed("copy_lists", lambda: make_dataset(repeat_dir, talker_repeat_n, seed,
                                                 families=["repeat"]))
    if not _done(data_dir / COPY, "lists without the system prompt"):
        log(f"{COPY}: {copy_lists(repeat_dir / 'data.jsonl', data_dir / COPY)} records")
    if not _done(data_dir / AUX / "data.jsonl", "auxiliary cases"):
        from omnistream.train.tasks import AUX_FAMILIES, make_dataset

        n_aux = scaled(AUX_CASES)
        timed("aux", lambda: make_dataset(data_dir / AUX, n_aux, seed, families=AUX_FAMILIES))
    if not _done(data_dir / FRESH_REST / "data.jsonl", "fresh cases"):
        from omnistream.train.tasks import FAMILIES, make_dataset

        def fresh() -> None:
            make_dataset(data_dir / FRESH, scaled(FRESH_CASES),
                         seed + FRESH_SEEDS[0], families=FRESH_FAMILIES)
            make_dataset(data_dir / FRESH_REST, scaled(FRESH_REST_CASES),
                         seed + FRESH_SEEDS[1],
                         families=[f for f in FAMILIES if f not in FRESH_FAMILIES])

        timed("fresh", fresh)
    if not _done(data_dir / LEVELS / "data.jsonl", "cases at microphone levels"):
        from omnistream.train.tasks import make_dataset

        timed("levels", lambda: make_dataset(
            data_dir / LEVELS, scaled(LEVEL_CASES), seed + FRESH_SEEDS[2],
            families=LEVEL_FAMILIES, levels=True))
    from omnistream.train.tasks import SIZED_FAMILY

    for name, cases, fresh_seed in ((COUNT, COUNT_CASES, FRESH_SEEDS[3]),
                                    (COUNT2, COUNT_CASES, FRESH_SEEDS[5]),
                                    (COUNT3, COUNT_CASES, FRESH_SEEDS[6]),
                                    (SIZED, {SIZED_FAMILY: SIZED_CASES}, FRESH_SEEDS[7]),
                                    (COUNT4, COUNT4_CASES, FRESH_SEEDS[8]),
                                    (SUMS, SUMS_CASES, FRESH_SEEDS[9]),
                                    (MOTION, MOTION_CASES, FRESH_SEEDS[10])):
        if not _done(data_dir / name / "data.jsonl", f"{name} cases"):
            from omnistream.train.tasks import make_dataset

            timed(name, lambda name=name, cases=cases, k=fresh_seed: make_dataset(
                data_dir / name, {f: scaled(n) for f, n in cases.items()}, seed + k))
    if not _done(data_dir / ROUND / "text.jsonl", "round cases"):
        from omnistream.train.tasks import AUX_FAMILIES, FAMILIES, make_dataset

        def round_cases() -> None:
            counts = {f: scaled(ROUND_CASES.get(f, BASE_CASES)) for f in FAMILIES}
            counts |= {f: scaled(ROUND_CASES[f]) for f in AUX_FAMILIES}
            made = make_dataset(data_dir / ROUND, counts, seed + FRESH_SEEDS[4])
            log(f"round: {split_records(made)}")

        timed("round", round_cases)
    if not _done(data_dir / VISION / "vision.jsonl", "vision images"):
        from omnistream.train.dense import make_vision_data

        timed("vision_images", lambda: make_vision_data(
            data_dir / VISION, scaled(VISION_IMAGES, 8), seed))
    if not _done(data_dir / HEARING / "hearing.jsonl", "hearing clips"):
        from omnistream.train.dense import make_hearing_data

        timed("hearing_clips", lambda: make_hearing_data(
            data_dir / HEARING, scaled(HEARING_CLIPS, 8), seed))

    def spoken_data() -> None:  # the Talker's targets: made when its stage comes
        if not _done(data_dir / "talker.jsonl", "speech"):
            timed("speech", lambda: log(
                f"speech: {add_speech(data, data_dir / 'talker.jsonl', encode=encoder())} "
                "replies spoken"))
        if not _done(repeat_dir / "talker.jsonl", "talker repeat"):
            timed("talker_repeat", lambda: log("talker repeat: " + str(add_speech(
                repeat_dir / "data.jsonl", repeat_dir / "talker.jsonl", encode=encoder()))
                + " replies spoken"))
        counter = data_dir / TALKER_COUNTER
        if not _done(counter, "counterfactual replies"):
            timed("talker_counter", lambda: log("counterfactual replies: " + str(
                add_counterfactuals(data_dir / "talker.jsonl", counter, seed, encode=encoder()))
                + " records"))
        if not _done(data_dir / TALKER_COUNTER_CLEAR, "clearest renderings"):
            timed("clear_speech", lambda: _run(py + [
                "omnistream.train.clear_speech", str(data_dir), "--codec",
                str(codec if codec is not None else init), "--files", "talker.jsonl",
                TALKER_COUNTER, "--suffix", "_c"]))

    # 2. the from-scratch checkpoint, with the codec's Token2Wav and voice
    if not _done(init / "config.json", "init"):
        from omnistream.train.mini_model import budget, format_budget, init_mini

        def make_init() -> None:
            tmp = out / "init.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            init_mini(tmp, codec, seed)
            print(format_budget(budget(tmp)), flush=True)
            tmp.replace(init)

        timed("init", make_init)

    # 3.-4. stages (DPO pairs before the DPO stage)
    final = out / STAGES[-1][0]
    for name, cfg, train_data, src in STAGES:
        stage_out = out / name
        if _done(stage_out / STAGE_FILE, name):
            if name == until:
                return stage_out
            continue  # its source (DPO pairs, fresh rows, balanced Thinker) is not needed again
        if src == BALANCED:
            spoken_data()
        if name == "stage4_dpo" and not _done(data_dir / "dpo.jsonl", "dpo pairs"):
            timed("dpo_pairs", lambda src=src: _run(py + [
                "omnistream.train.dpo_pairs", "--model", str(out / src),
                "--data", str(data_dir / "talker.jsonl"), "--out", str(data_dir / "dpo.jsonl"),
                "--prompts", str(dpo_prompts), "--samples", str(dpo_samples),
                "--seed", str(seed)]))
        if src in MERGES and not _done(out / src / "config.json", src):
            from omnistream.train.mini_model import mix

            timed(src, lambda src=src: log(
                f"{src}: {mix([(out / s, w) for s, w in MERGES[src]], out / src)}"))
        if src == REFRESHED and not _done(out / REFRESHED / "config.json", "refresh"):
            timed("refresh", lambda: log(f"refresh: {refresh_step(out, seed)} token rows drawn "
                                         "again"))
        if src == BALANCED and not _done(out / BALANCED / "config.json", "balance"):
            from omnistream.train.mini_model import balance, balance_alpha, text_track_norms

            def _balance() -> None:
                hidden, embed = text_track_norms(out / THINKER,
                                                 data_dir / TALKER_REPEAT / "data.jsonl")
                alpha = balance_alpha(hidden, embed, TEXT_TRACK_RATIO)
                log(f"balance: hidden norm {hidden:.2f}, embedding norm {embed:.2f}, alpha "
                    f"{alpha:g}")
                balance(out / THINKER, out / BALANCED, alpha)

            timed("balance", _balance)
        n_records = sum(_count(data_dir / f) for f in train_data)
        if n_records == 0:  # only DPO can end up without data: all samples scored alike
            log(f"{name}: SKIPPED, no records in {train_data}; shipping {src}")
            final = out / src
            continue
        stage = json.loads((STAGE_DIR / cfg).read_text())
        cmd = py + ["omnistream.cli", "train", "--config", str(STAGE_DIR / cfg),
                    "--data", *(str(data_dir / f) for f in train_data), "--model", str(out / src),
                    "--out", str(stage_out)]
        if n_records < stage["batch_size"]:
            cmd += ["--batch-size", str(n_records)]
        if max_steps_scale != 1.0:
            cmd += ["--max-steps", str(max(1, round(stage["max_steps"] * max_steps_scale)))]
        timed(name, lambda cmd=cmd: _run(cmd))
        if name == until:
            log(f"stopped after {name} (--until)")
            return stage_out

    # 5. ship and evaluate
    from omnistream.train.mini_model import budget, format_budget, ship

    ship_dir = Path(ship_dir) if ship_dir is not None else _ROOT / "models" / "omni-mini"
    mark = out / "shipped.json"
    shipped = json.loads(mark.read_text()) if mark.exists() else {}
    want = {"dir": str(ship_dir), "from": str(final)}
    if shipped == want and (ship_dir / "config.json").is_file():
        log(f"ship: done ({ship_dir})")
    else:
        log(f"ship: {final} -> {ship_dir}")
        ship(final, ship_dir)
        print(format_budget(budget(ship_dir, {})), flush=True)
        mark.write_text(json.dumps(want) + "\n")
        (out / "eval.txt").unlink(missing_ok=True)  # a new model: evaluate it again
    if eval_n > 0 and not _done(out / "eval.txt", "eval"):
        def evaluate() -> None:
            res = subprocess.run(py + ["omnistream.cli", "eval", "--model", str(ship_dir),
                                       "--n", str(eval_n)], check=True, capture_output=True,
                                 text=True)
            (out / "eval.txt").write_text(res.stdout)
            print(res.stdout, flush=True)

        timed("eval", evaluate)
    log(f"finished in {time.time() - t_start:.0f} s this run; step times (s): {timings}")
    return ship_dir


def _pace(steps: list[dict], window: int = 20) -> float | None:
    """Seconds per step of a stage: the median over its last ``window`` logged steps of the
    ``elapsed_s`` between two of them (a pause or a slow moment counts once, not in the
    average), within its last run (the clock starts again when a run resumes); None before two
    logged steps of that run."""
    rates = []
    for a, b in itertools.pairwise(steps[-window:]):
        if "elapsed_s" not in a or "elapsed_s" not in b or b["elapsed_s"] < a["elapsed_s"]:
            rates = []  # an earlier run of the stage, or a log without a clock
        elif b["step"] > a["step"]:
            rates.append((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]))
    return statistics.median(rates) if rates else None


def _current_step(out: Path) -> tuple[str, str] | None:
    """The step that ``run`` marked as in progress in ``out`` (``RUNNING``), and whether its
    process still runs; None when no step is marked."""
    try:
        mark = json.loads((out / RUNNING).read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # none, or being written now
        return None
    since = time.strftime("%H:%M", time.localtime(mark["since"]))
    try:
        os.kill(mark["pid"], 0)  # signal 0: does the process exist
    except ProcessLookupError:
        return mark["step"], (f"stopped part-way (started {since}; its process is gone: "
                              "run the command again)")
    except PermissionError:  # it exists, as another user's
        pass
    return mark["step"], f"running since {since} ({(time.time() - mark['since']) / 60:.0f} min)"


def status(out: str | Path) -> str:
    """Where a run in ``out`` stands, from its marks and logs (it may be running now): the steps
    done with their wall time, the step in progress (or stopped part-way), each training stage
    done, loading, part-way (its last logged step, its pace and the minutes it has left at that
    pace) or not started, and the evaluation when there is one."""
    out = Path(out)
    tpath = out / "timings.json"
    timings = json.loads(tpath.read_text()) if tpath.exists() else {}
    lines, stages = [f"{out}:"], {s[0] for s in STAGES}
    for name, secs in timings.items():
        if name not in stages:
            lines.append(f"  {name:<16} done   {secs / 60:6.1f} min")
    current = _current_step(out)
    if current and current[0] not in stages:
        lines.append(f"  {current[0]:<16} {current[1]}")
    for name, *_ in STAGES:
        d = out / name
        if (d / STAGE_FILE).exists():
            took = timings.get(name)
            lines.append(f"  {name:<16} done   " + (f"{took / 60:6.1f} min" if took else ""))
            continue
        steps = []
        if (d / LOG_FILE).exists():
            for line in (d / LOG_FILE).read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line being written now
                    continue
                if {"step", "of", "loss"} <= rec.keys():  # a training step, not an event
                    steps.append(rec)
        if not steps:
            busy = current is not None and current[0] == name
            lines.append(f"  {name:<16} " + (f"loading: {current[1]}" if busy else "not started"))
            continue
        last, pace = steps[-1], _pace(steps)
        when = time.strftime("%H:%M", time.localtime((d / LOG_FILE).stat().st_mtime))
        left = "" if pace is None else (
            f"; {pace:.2f} s a step, about {(last['of'] - last['step']) * pace / 60:.0f} min left")
        lines.append(f"  {name:<16} step {last['step']:,} of {last['of']:,} (logged at {when}; "
                     f"loss {last['loss']:.3f}{left})")
    if (out / "eval.txt").exists():
        lines.append((out / "eval.txt").read_text().rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnistream.train.mini", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/mini", help="work folder (data, stages, logs)")
    ap.add_argument("--codec", default=None, help="the trained speech codec's directory")
    ap.add_argument("--n-per-family", type=int, default=BASE_CASES)
    ap.add_argument("--seed", type=int, default=0,
                    help=f"training data seed (0 .. {last_seed():,})")
    ap.add_argument("--ship", default=None, help="shipped model folder (default models/omni-mini)")
    ap.add_argument("--eval-n", type=int, default=10, help="fresh cases per family (0: none)")
    ap.add_argument("--talker-repeat", type=int, default=10000,
                    help="extra repeat cases spoken for the Talker (distinct replies)")
    ap.add_argument("--dpo-prompts", type=int, default=22)
    ap.add_argument("--dpo-samples", type=int, default=4)
    ap.add_argument("--max-steps-scale", type=float, default=1.0,
                    help="scale every stage's max_steps (a quick trial run)")
    ap.add_argument("--until", default=None, metavar="STAGE",
                    help=f"stop after this stage (e.g. {THINKER}: the Thinker alone)")
    ap.add_argument("--status", action="store_true",
                    help="say where the run in --out stands (steps done, the step in "
                         "progress, the stage's step and pace) and exit; safe while it runs")
    a = ap.parse_args(argv)
    if a.status:
        print(status(a.out))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    run(a.out, a.codec, a.n_per_family, a.seed, a.ship, a.eval_n, a.dpo_prompts, a.dpo_samples,
        a.max_steps_scale, a.talker_repeat, a.until)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
