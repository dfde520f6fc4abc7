"""``omnistream bench --config answer``: whole-process time to answer, ours vs transformers.

Each side runs in a fresh Python process, as a user would: import, load a 0.45B-parameter
Thinker checkpoint (1.8 GB of fp32 weights in the released layout), render the chat prompt,
produce ``--answer-tokens`` (160) greedy tokens, decode them to text, exit. The parent times the
process from spawn to exit; each process reports its peak RSS (VmHWM). The two sides alternate
``--repeats`` times; the best wall time of each is compared, the range is printed beside it.

Both sides run with the same ``OMP_WAIT_POLICY`` (``--omp-wait-policy``, default passive). With
libgomp's default (active: waiting threads spin) on an oversubscribed CPU, as on a shared
machine, every multi-threaded op can stall for a scheduler tick (a 0.02 ms attention took 15 ms
at load average 7 on 2 cores) and those stalls, not the models, decide the result.

The checkpoint is written once into ``--cache-dir`` (``~/.cache/omnistream/bench``) and reused.
Reading its bytes (page cache warm, like ``cat files > /dev/null``) is timed in the same run as
the floor any loader stands on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omnistream.bench.common import TINY_BIGVGAN, Bench, omni_dict

# Qwen2.5-0.5B widths (hidden 896, 14 heads / 2 KV heads, MLP 4864) with the real vocabulary and
# an untied output head like Qwen2.5-Omni's; 12 layers make it 0.45B parameters.
ANSWER_TEXT = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=12,
    num_attention_heads=14,
    num_key_value_heads=2,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
    tie_word_embeddings=False,
)
SYSTEM = "You are a helpful assistant."
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."

OURS = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from omnistream.engine.events import TextDelta
from omnistream.engine.session import Engine
d, n, system, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
t1 = time.perf_counter()
eng = Engine.load(d, dtype="float32", audio_output=False, quiet=True)
t2 = time.perf_counter()
sess = eng.session(audio_output=False, system=system, max_new_tokens=n, ignore_eos=True, seed=0)
text, first, count = [], None, 0
for ev in sess.respond(prompt):
    if isinstance(ev, TextDelta):
        first = first or time.perf_counter()
        count += 1
        text.append(ev.text)
t3 = time.perf_counter()
peak = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status")
            if ln.startswith("VmHWM"))  # this process's own (getrusage keeps the parent's)
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": first - t2, "decode": t3 - first,
                  "tokens": count, "prompt": len(sess.last_prompt_ids), "text": "".join(text),
                  "peak": peak}))
"""

REF = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration
d, n, system, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
t1 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(d)  # text only: the processor would need torchvision
model = Qwen2_5OmniForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
t2 = time.perf_counter()
msgs = [{"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "text", "text": prompt}]}]
template = json.load(open(d + "/chat_template.json"))["chat_template"]
inputs = tok(tok.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                     tokenize=False), return_tensors="pt")
# the thinker's generate: the omni model's reads self.talker even for text (no talker here)
out = model.thinker.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             repetition_penalty=1.0)
p = inputs["input_ids"].shape[1]
text = tok.decode(out[0, p:], skip_special_tokens=True)
t3 = time.perf_counter()
peak = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status")
            if ln.startswith("VmHWM"))  # this process's own (getrusage keeps the parent's)
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "generate": t3 - t2,
                  "tokens": int(out.shape[1] - p), "prompt": p, "text": text,
                  "peak": peak}))
"""


def answer_config() -> dict:
    """The config.json of the answer checkpoint (tiny talker/token2wav, no audio output)."""
    cfg = omni_dict(text=ANSWER_TEXT, bigvgan=TINY_BIGVGAN)
    cfg["enable_audio_output"] = False
    return cfg


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "omnistream" / "bench"


def ensure_checkpoint(cache_dir: Path) -> Path:
    """The answer checkpoint in ``cache_dir`` (written once: thinker fp32 on disk, 1.8 GB)."""
    import torch

    from omnistream.maketiny import make_tiny

    cfg = answer_config()
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    d = Path(cache_dir) / f"answer-{key}"
    if (d / "config.json").is_file():
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    print(f"writing the answer checkpoint to {d} (once)", file=sys.stderr, flush=True)
    make_tiny(tmp, seed=0, config=cfg,
              dtypes={"thinker": torch.float32, "talker": torch.float32})
    tmp.replace(d) if not d.exists() else shutil.rmtree(tmp)
    return d


def read_bytes_s(model_dir: Path) -> tuple[float, int]:
    """Seconds to read every weights file once (page cache warm) and the byte count."""
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    files = sorted(model_dir.glob("*.safetensors"))
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(view):
                n += k
    return time.perf_counter() - t0, n


def run_process(code: str, args: list[str], timeout: float = 900,
                omp_wait_policy: str | None = None) -> tuple[float, int, dict]:
    """(wall seconds from spawn to exit, peak RSS bytes, the JSON it printed last: its own
    timings and its peak RSS, VmHWM; ``ru_maxrss`` would carry over the parent's peak).
    ``omp_wait_policy``: OMP_WAIT_POLICY for the process (None: inherited)."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {err[-600:]}")
    info = json.loads(out.strip().splitlines()[-1])
    return wall, info.pop("peak"), info


def bench_answer(b: Bench, name: str) -> None:
    """Rows: whole-process wall time and peak RSS (ours vs reference), our load vs reading the
    checkpoint's bytes, and where each side's time goes."""
    a = b.args
    d = ensure_checkpoint(Path(a.cache_dir or default_cache_dir()))
    n = a.answer_tokens
    read_bytes_s(d)  # warm the page cache, as a second run of either side would find it
    read_s, nbytes = min(read_bytes_s(d) for _ in range(3))
    args = [str(d), str(n), SYSTEM, PROMPT]
    policy = None if a.omp_wait_policy == "inherit" else a.omp_wait_policy
    env_note = f"OMP_WAIT_POLICY={policy.upper() if policy else os.environ.get('OMP_WAIT_POLICY')}"
    runs: dict[str, list[tuple[float, int, dict]]] = {"ours": [], "ref": []}
    for i in range(a.repeats):
        for which, code in (("ours", OURS), ("ref", REF)):
            w, peak, info = run_process(code, args, omp_wait_policy=policy)
            runs[which].append((w, peak, info))
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()
                     if k != "text"}
            print(f"  [{name}] run {i + 1} {which}: {w:.2f} s, peak {peak / 2**30:.2f} GiB, "
                  f"{shown}", file=sys.stderr, flush=True)
    (wo, po, io), (wr, pr, ir) = (min(runs[k], key=lambda r: r[0]) for k in ("ours", "ref"))

    def spread(k: str) -> str:
        ws = [r[0] for r in runs[k]]
        return f"{min(ws):.1f}-{max(ws):.1f} s"

    same = io["text"] == ir["text"] and io["prompt"] == ir["prompt"]
    gib = 2**30
    b.add(config=name, metric=f"whole process: load + {n} greedy tokens", unit="s", ours=wo,
          ref=wr, higher_is_better=False,
          note=f"{a.repeats} runs each, ours {spread('ours')}, ref {spread('ref')}; prompt "
               f"{io['prompt']} tok; {'the same' if same else 'a DIFFERENT'} reply; both sides "
               f"{env_note}")
    b.add(config=name, metric="whole process: peak RSS", unit="GiB", ours=po / gib,
          ref=pr / gib, higher_is_better=False,
          note=f"weights {nbytes / 1e9:.2f} GB fp32 on disk; max over runs: ours "
               f"{max(r[1] for r in runs['ours']) / gib:.2f}, ref "
               f"{max(r[1] for r in runs['ref']) / gib:.2f}")
    b.add(config=name, metric="read the weights' bytes (page cache)", unit="s", ours=read_s,
          note=f"{nbytes / 1e9:.2f} GB, best of 3: the floor under any loader")
    b.add(config=name, metric="load (model + tokenizer)", unit="s", ours=io["load"],
          ref=ir["load"], higher_is_better=False,
          note=f"ours = read + {io['load'] - read_s:.2f} s (weights mapped, read by the first "
               f"step); ref: from_pretrained + AutoTokenizer")
    b.add(config=name, metric="import", unit="s", ours=io["import"], ref=ir["import"],
          higher_is_better=False)
    b.add(config=name, metric=f"first token + {n - 1} more (in process)", unit="s",
          ours=io["first"] + io["decode"], ref=ir["generate"], higher_is_better=False,
          note=f"ours first token {io['first']:.2f} s (prefill reads every weight once), then "
               f"{(n - 1) / io['decode']:.1f} tok/s")
