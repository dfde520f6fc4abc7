"""The streaming engine: text and speech stream out together.

One ``Engine`` owns the loaded components; each ``Session`` owns a conversation's state (the
Thinker's static KV cache, the per-position Thinker states the Talker reads, the running TMRoPE
position) and answers turns with ``respond()``, a generator of events.

Schedule (one thread, interleaved; deterministic, so streaming ids equal offline ids):

    thinker step k  ->  TextDelta(token k)
                    ->  the Talker's input for reply token k exists (hidden + embedding)
                    ->  talker step k  ->  code k  ->  code2wav.push(code)  ->  AudioChunk*
    after the reply:    talker steps on (text-eos, then text-pad inputs) until its codec eos

The Talker needs reply token k's state for its step k, so it trails the Thinker by one token and
speech starts as soon as code2wav has one chunk of codes plus its look-ahead, long before the
text is finished. Every ``next()`` on ``respond()`` does at most one Thinker step plus the Talker
and code2wav work it unlocks, so a server can interleave sessions by round-robin.

The reply is written as a coroutine (``engine/batch.py``): it yields each model call as a work
item, so that iterating ``respond()`` runs them at once while a ``Batcher`` runs the calls of many
sessions' replies together (one batched Thinker step, one batched Talker step per tick).
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from omnistream import chat
from omnistream.checkpoint import resolve_dtype
from omnistream.engine.batch import Reply, SlotPool, ThinkerWork, prefilling
from omnistream.engine.events import Done, TextDelta, Usage
from omnistream.engine.options import SessionOptions
from omnistream.engine.prefix import Prefix, PrefixStore, system_block_length
from omnistream.engine.sampling import sample, seen_mask, talker_sampling_from
from omnistream.engine.speech import Speech
from omnistream.models import RANDOM_WEIGHTS_MARKER
from omnistream.nn.cache import KVCache

PREFILL_CHUNK = 1024  # prompt tokens per prefill call: bounds activations for long video prompts


@dataclass
class _Context:
    """What the Talker needs about every position in the Thinker's cache."""

    ids: list[int] = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)  # [T_i, D] final hidden states
    embeds: list[Tensor] = field(default_factory=list)  # [T_i, D] input embeddings (media merged)
    pos: list[Tensor] = field(default_factory=list)  # [3, T_i] TMRoPE ids
    # the Talker's KV cache kept across turns: its first ``talker_valid`` slots hold the prompt
    # track of these positions (a later turn prefills only what came after)
    talker_cache: KVCache | None = None
    talker_valid: int = 0
    prefix: Prefix | None = None  # the shared system block these positions open with

    def add(self, ids: list[int], hidden: Tensor, embeds: Tensor, pos: Tensor) -> None:
        self.ids += ids
        self.hidden.append(hidden)
        self.embeds.append(embeds)
        self.pos.append(pos)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.cat(self.hidden), torch.cat(self.embeds), torch.cat(self.pos, 1)

    def clear(self) -> None:
        cache = self.talker_cache  # the allocation (a pool slot) stays; talker_valid 0 empties it
        self.__init__()
        self.talker_cache = cache

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions (a rolled-back cache)."""
        self.talker_valid = min(self.talker_valid, n)
        if self.prefix is not None and n < len(self.prefix.ids):
            self.prefix = None
        if n >= len(self.ids):
            return
        hidden, embeds, pos = self.tensors()
        self.ids = self.ids[:n]
        self.hidden, self.embeds, self.pos = [hidden[:n]], [embeds[:n]], [pos[:, :n]]


class Engine:
    """Loaded components of one checkpoint. Build with ``Engine.load``."""

    def __init__(self, model_dir: Path, cfg, tokenizer, thinker, talker=None, token2wav=None,
                 speakers=None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 model_id: str | None = None, random_weights: bool = False):
        self.model_dir = Path(model_dir)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.thinker = thinker
        self.talker = talker
        self.token2wav = token2wav
        self.speakers_map = speakers or {}
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_id = model_id or self.model_dir.name
        self.random_weights = random_weights
        self.slots: SlotPool | None = None  # cache slots for batched sessions (reserve_slots)
        # system blocks' Thinker and Talker cache rows, shared by new sessions (engine/prefix.py)
        self.prefixes: PrefixStore | None = PrefixStore()  # None: off
        # (id(speaker), guidance scale) -> (speaker, its condition): kept, the id stays its own
        self._voice_conditions: dict[tuple[int, float], tuple[object, Tensor]] = {}
        gen = self.model_dir / "generation_config.json"
        # the Talker sampling of sessions that do not choose one
        self.talker_sampling = talker_sampling_from(
            json.loads(gen.read_text()) if gen.is_file() else {})
        from omnistream.prompt import Processor

        self.processor = Processor.from_dir(self.model_dir)
        if self.tokenizer is None:  # Engine.load: the processor's (tokenizer.json parsed once)
            self.tokenizer = self.processor.tokenizer

    @classmethod
    def load(cls, model: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
             audio_output: bool = True, quiet: bool = False,
             quantize: str | None = None, tf32: bool = False) -> Engine:
        """Load a checkpoint directory or hub id; ``audio_output=False`` loads the Thinker only.

        ``quantize``: "int8" or "int4" (CPU) stores the Thinker and Talker decoder weights
        (not the encoders, not Token2Wav) in that many bits after loading (``engine/quant.py``).
        ``tf32`` (CUDA): float32 matmuls in TF32, process-wide. Token2Wav runs in float32 (as the
        release's), so on a GPU its DiT is bound by fp32 arithmetic (10 s of speech in 1.1 s on
        an H200 with RK4), and streams' chunks batched together cost nearly their sum."""
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be None, 'int8' or 'int4', not {quantize!r}")
        if tf32 and torch.device(device).type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        from omnistream.checkpoint import (
            load_component,
            load_config,
            load_speakers,
            resolve_model_dir,
        )

        d = resolve_model_dir(model)
        cfg = load_config(d)
        dt = resolve_dtype(dtype)  # a name (float32, bf16, ...) or a torch dtype
        thinker = load_component(d, "thinker", dtype=dt, device=device, quiet=quiet).eval()
        talker = token2wav = speakers = None
        if audio_output and cfg.enable_audio_output:
            talker = load_component(d, "talker", dtype=dt, device=device, quiet=quiet).eval()
            token2wav = load_component(d, "token2wav", dtype=torch.float32, device=device,
                                       quiet=quiet).eval()
            speakers = load_speakers(d)
        from omnistream.engine.layout import tune_head_layout_
        from omnistream.engine.packed import PACK_MIN_NUMEL, pack_linears_
        from omnistream.engine.quant import quantize_int4_, quantize_int8_

        for m in (thinker, talker):
            if m is None:
                continue
            if quantize == "int8":
                quantize_int8_(m)
            elif quantize == "int4":
                if torch.device(device).type != "cpu":
                    raise ValueError("int4 uses torch's CPU kernel; use int8 on this device")
                quantize_int4_(m)
            else:
                # the decoders' small projections in one matmul per group (a small model's
                # decode step is per-call cost), the wide fp32 layers on a CPU packed for
                # batched decoding (engine/packed.py)
                m.model.fuse_projections_(max_numel=PACK_MIN_NUMEL)
                pack_linears_(m, (m.audio_tower, m.visual) if m is thinker else ())
                head = m.lm_head if m is thinker else m.codec_head
                if type(head) is torch.nn.Linear:
                    tune_head_layout_(head)
        if torch.device(device).type == "cpu":
            from omnistream.engine.allocator import tune_malloc

            tune_malloc()  # after the weights (loading's peak stays as it was)
        return cls(d, cfg, None, thinker, talker, token2wav, speakers, device, dt,
                   model_id=str(model), random_weights=(d / RANDOM_WEIGHTS_MARKER).exists())

    @property
    def speakers(self) -> list[str]:
        return list(self.speakers_map)

    def speaker(self, voice: str | None):
        """The ``Speaker`` for ``voice`` (case-insensitive; None = "Chelsie" when present).
        Unknown names raise ValueError listing the available ones."""
        if not self.speakers_map:
            raise ValueError("this engine was loaded without audio output (no voices)")
        if voice is None:
            voice = "Chelsie" if "Chelsie" in self.speakers_map else self.speakers[0]
        try:
            return self.speakers_map[voice]
        except LookupError as e:
            raise ValueError(str(e).strip("'\"")) from None

    def voice_condition(self, speaker, guidance_scale: float) -> Tensor:
        """The DiT's per-voice condition of ``speaker`` (``Token2Wav.speaker``: ECAPA over its
        reference mel), computed once per voice and guidance scale and kept: every reply in that
        voice starts its code2wav stream from it."""
        key = (id(speaker), guidance_scale)
        if key not in self._voice_conditions:
            spk = self.token2wav.speaker(speaker.cond, speaker.ref_mel, guidance_scale)
            self._voice_conditions[key] = speaker, spk
        return self._voice_conditions[key][1]

    def reserve_slots(self, slots: int, context: int = 8192,
                      speech_codes: int = 4096) -> SlotPool:
        """Pre-allocate ``slots`` cache slots (``engine/batch.py: SlotPool``): sessions made from
        now on take one (while any is free and their ``max_context`` fits ``context``), so a
        ``Batcher`` can decode them together. A session gives its slot back on ``close()`` or
        when it is dropped."""
        self.slots = SlotPool(self, slots, context, speech_codes)
        return self.slots

    def session(self, options: SessionOptions | None = None, /, **fields) -> Session:
        """A conversation configured by ``options`` with ``fields`` (``SessionOptions`` field
        names) changed: ``engine.session(SessionOptions(voice="Ethan"))`` or
        ``engine.session(voice="Ethan")``."""
        return Session(self, options, **fields)


class Session:
    """One conversation; see the module docstring for the schedule."""

    def __init__(self, engine: Engine, options: SessionOptions | None = None, /, **fields):
        """``options`` (``SessionOptions``, defaults when None) with ``fields`` changed.
        Validates the voice at once (unknown voice -> ValueError; None = "Chelsie").

        Speech stops at the Talker's codec eos, at ``talker_max_new_tokens`` codes, or at
        ``max_codes_per_token`` codes (50 = 1 s) per reply token: real speech needs far fewer,
        and the cap stops a Talker that never ends (e.g. random weights) from babbling."""
        o = self.options = (options or SessionOptions()).replace(**fields)
        self.engine = engine
        self.audio_output = bool(o.audio_output and engine.talker is not None)
        if o.audio_output and engine.talker is None:
            raise ValueError("audio output requested but the engine was loaded text-only")
        self.speaker = engine.speaker(o.voice) if self.audio_output else None
        # the options the reply loops read, as attributes
        self.system = o.system
        self.sampling = o.sampling
        self.talker_sampling = o.talker_sampling or engine.talker_sampling
        self.max_new_tokens = o.max_new_tokens
        self.talker_max_new_tokens = o.talker_max_new_tokens
        self.max_codes_per_token = o.max_codes_per_token
        self.ignore_eos = o.ignore_eos
        self.use_audio_in_video = o.use_audio_in_video
        self.chunk_frames, self.max_chunk_frames = o.chunk_frames, o.max_chunk_frames
        self.first_chunk_lookahead = o.first_chunk_lookahead
        self.ode_steps, self.solver, self.guidance_scale = (
            engine.cfg.token2wav_config.decode_options(o.ode_steps, o.solver, o.guidance_scale))
        self.reuse_talker_cache = True  # False: re-prefill the whole history each turn (tests)
        # one generator per stage, so streaming and offline draw the same numbers in each
        base = o.seed if o.seed is not None else int(torch.seed() % (2**62))
        self.generator, self.talker_gen, self.noise_gen = (
            torch.Generator(device=engine.device).manual_seed(base + i) for i in range(3))
        self.noise_seed = base + 2
        self.ctx = _Context()
        self.prefill_chunk = PREFILL_CHUNK  # prompt tokens per prefill call (a Batcher sets it)
        self._release = None
        slot = None
        if engine.slots is not None and o.max_context <= engine.slots.context:
            slot = engine.slots.acquire()
        if slot is None:  # a private cache (no reserved slots, or none free): runs unbatched
            self.cache = engine.thinker.model.new_cache(1, o.max_context)
        else:  # views of the engine's pools, given back when the session is closed or dropped
            self.cache = engine.slots.thinker.view(slot, o.max_context)
            if engine.slots.talker is not None:
                self.ctx.talker_cache = engine.slots.talker.view(slot)
            self._release = weakref.finalize(self, engine.slots.release, slot)
        self.next_pos = 0  # TMRoPE id of the next token fed to the Thinker
        self.pending: list[int] = []  # the previous reply's last token: sampled, not yet fed
        self.turns = 0
        self.last_prompt_ids: list[int] = []
        self._cancel = threading.Event()
        self._live: _Live | None = None  # user turn arriving live (append_audio / _video_frame)
        self._ready = None  # a committed live turn, prefilled, waiting for respond([])

    # -- control --------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the running reply at its next step (thread-safe)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether the running reply was told to stop."""
        return self._cancel.is_set()

    def close(self) -> None:
        """Give the session's cache slot back at once (the session is unusable afterwards)."""
        if self._release is not None:
            self._release()
        self.cache = self.ctx.talker_cache = None

    def reset(self) -> None:
        """Forget the conversation (the cache is kept allocated)."""
        self.cache.reset()
        self.ctx.clear()
        self.next_pos = 0
        self.pending = []
        self.turns = 0
        self._live = None
        self._ready = None

    # -- prompt ---------------------------------------------------------------------------------

    def _system_prompt(self) -> str:
        return chat.system_prompt_for(self.audio_output, self.system)

    def _prepare(self, messages: list[dict] | str):
        """The new turn's inputs; ids [1, T] continue the cached conversation (rendered by
        ``omnistream.chat``: a later turn first closes the previous reply, no system block)."""
        inputs = self.engine.processor(chat.normalize(messages), add_generation_prompt=True,
                                       use_audio_in_video=self.use_audio_in_video,
                                       speech_output=self.audio_output,
                                       system_prompt=self._system_prompt(),
                                       continued=self.cache.length > 0)
        ids = inputs.input_ids.reshape(-1)
        ids = torch.cat([torch.tensor(self.pending, dtype=ids.dtype), ids])
        self.pending = []
        return inputs, ids[None]

    def _check_room(self, n: int) -> None:
        if self.cache.length + n + self.max_new_tokens + 2 > self.cache.max_len:
            raise ValueError(
                f"conversation too long: {self.cache.length} cached + {n} prompt + "
                f"{self.max_new_tokens} new tokens exceed the context of {self.cache.max_len}"
            )

    def _prefill(self, messages):
        """Prefill a turn given as messages, a ``PrefillWork`` per chunk; returns (logits [1, V],
        rope deltas [1, 1], ids, cached)."""
        eng, th = self.engine, self.engine.thinker
        inputs, ids = self._prepare(messages)
        ids = ids.to(eng.device)
        self._check_room(ids.shape[1])
        media = th.encode_media(inputs)
        cached = self.cache.length
        rest = copied = 0  # prompt tokens of a shared system block in the cache, copied ones
        if cached == 0:
            rest, copied = yield from self._system_prefix(ids[0].tolist())
        step = yield from prefilling(th, self.cache, th.prefill_chunks(
            ids[:, rest:], self.cache, media=media, chunk_size=self.prefill_chunk,
            position_offset=self.next_pos + rest))
        self.ctx.add(ids[0, rest:].tolist(), step.hidden[0], step.embeds[0],
                     step.position_ids[:, 0])
        return step.logits, step.rope_deltas, ids[0].tolist(), cached + copied

    def _system_prefix(self, ids: list[int]):
        """Put the system block that opens ``ids`` into the empty cache: copied from the
        engine's ``prefixes``, or prefilled (``PrefillWork``) and stored there. Returns its length
        (0: no system block, or the store is off) and how many of its tokens were copied."""
        store = self.engine.prefixes
        n = system_block_length(ids) if store is not None else 0
        if not n:
            return 0, 0
        prefix = store.get(ids[:n])
        if prefix is None:
            th = self.engine.thinker
            step = yield from prefilling(th, self.cache, th.prefill_chunks(
                torch.tensor([ids[:n]], device=self.engine.device), self.cache,
                chunk_size=self.prefill_chunk))
            prefix = Prefix.of(ids[:n], self.cache, step.hidden[0], step.embeds[0],
                               step.position_ids[:, 0])
            store.put(prefix)
            copied = 0
        else:
            self.cache.put_rows(prefix.k, prefix.v)
            copied = n
        self.ctx.add(list(prefix.ids), prefix.hidden, prefix.embeds, prefix.pos)
        self.ctx.prefix = prefix  # the Talker shares its rows too (engine/speech.py)
        return n, copied

    # -- live user turns (microphone / camera) ----------------------------------------------------

    def append_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Add microphone PCM (mono float32) to the user turn being spoken. Complete 2 s blocks
        are encoded and prefilled at once, so answering after ``commit_user_turn`` only has the
        last partial block left to do."""
        live = self._open_live(video=False)
        live.audio.append((np.asarray(pcm), int(sample_rate)))
        self._feed_live(live.turn.append_audio(pcm, sample_rate))

    def append_video_frame(self, rgb: np.ndarray, timestamp_s: float | None = None) -> None:
        """Add a camera frame (``[H, W, 3]`` uint8) taken at ``timestamp_s`` on the caller's
        clock (None: now, i.e. at the audio received so far). The turn is then laid out as
        audio-in-video, 2 s chunks interleaved; an audio-only turn is rebuilt once as video."""
        live = self._open_live(video=True)
        turn = live.turn
        if timestamp_s is None:
            t = turn.audio_seconds
        else:
            if live.clock is None:  # the first frame sits at the audio time it arrives at
                live.clock = turn.audio_seconds - float(timestamp_s)
            t = float(timestamp_s) + live.clock
        t = max(t, live.last_frame_t)  # clocks may jitter; never go back in time
        live.last_frame_t = t
        self._feed_live(turn.append_video_frame(rgb, t))

    def commit_user_turn(self, text: str | None = None) -> None:
        """Close the live user turn (optional ``text`` after the media) and prefill its rest;
        ``respond([])`` then answers it."""
        if self._live is None:
            raise ValueError("no live user turn to commit (append audio or frames first)")
        live, self._live = self._live, None
        c = live.turn.commit(self.engine.tokenizer.encode(chat.turn_suffix(text)))
        if c.segment is not None:
            self._feed_live(c.segment, live)
        logits = live.logits.reshape(1, -1)
        deltas = torch.tensor([[c.next_position - self.cache.length]], device=self.engine.device)
        prompt_ids = self.ctx.ids[live.start:]
        self._ready = (logits, deltas, prompt_ids, live.start, live.turn.counters())
        self.next_pos = c.next_position

    def clear_user_turn(self) -> None:
        """Drop the live user turn (nothing of it stays in the conversation)."""
        if self._live is None:
            return
        live, self._live = self._live, None
        self.cache.crop(live.start)
        self.ctx.crop(live.start)
        self.pending = live.pending

    def _open_live(self, video: bool) -> _Live:
        from omnistream.engine.live import LiveTurn

        if self._ready is not None:
            raise ValueError("a committed user turn is waiting: respond([]) first")
        live = self._live
        if live is not None and (live.video or not video):
            return live
        if live is None:
            prefix = self.pending + self.engine.tokenizer.encode(chat.turn_prefix(
                "user", system_prompt=self._system_prompt(), continued=self.cache.length > 0))
            live = _Live(start=self.cache.length, pending=self.pending, prefix=prefix,
                         position=self.next_pos)
            self.pending = []
        else:  # frames joined an audio-only turn: rebuild it as audio-in-video
            self.cache.crop(live.start)
            self.ctx.crop(live.start)
        live.video = video
        live.turn = LiveTurn(self.engine.thinker, prefix_ids=live.prefix,
                             position_offset=live.position, video=video)
        self._live = live
        self._feed_live(live.turn.poll(), live)
        for pcm, sr in live.audio:
            self._feed_live(live.turn.append_audio(pcm, sr), live)
        return live

    def _feed_live(self, seg, live: _Live | None = None) -> None:
        """Prefill a segment of the live turn (cropping first when it restarts earlier)."""
        from omnistream.engine.live import prefill_segment

        live = live or self._live
        if seg is None or len(seg) == 0:
            return
        at = live.start + seg.start
        self._check_room(at + len(seg) - self.cache.length)
        self.ctx.crop(at)
        with torch.inference_mode():
            logits, hidden = prefill_segment(self.engine.thinker, self.cache, seg, live.start)
        ids = seg.ids.to(hidden.device)
        self.ctx.add(ids.tolist(), hidden, seg.embeds.to(hidden.dtype),
                     seg.position_ids.to(hidden.device))
        live.logits = logits

    # -- the reply ------------------------------------------------------------------------------

    def respond(self, messages: list[dict] | str, offline: bool = False) -> Reply:
        """Answer ``messages`` (the new user turn; history lives in the session). Yields
        ``TextDelta`` and ``AudioChunk`` events interleaved, then one ``Done``.

        ``offline=True`` is the reference's order (whole reply, then whole speech, one chunk) and
        yields the same ids; it exists as a baseline and for parity checks. The generator is a
        ``Reply``: a ``Batcher`` can drive it together with other sessions' replies."""
        return Reply(self, self._reply(messages, offline))

    def _reply(self, messages: list[dict] | str, offline: bool) -> Iterator:
        """``respond``'s coroutine: yields events, and work items whose results come back."""
        self._cancel.clear()
        eng = self.engine
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if messages:
            if self._live is not None or self._ready is not None:
                raise ValueError("a live user turn is open: commit it and respond([]), or clear it")
            logits, deltas, prompt_ids, cached = yield from self._prefill(messages)
            live_counts = {}  # Usage's live_* fields: a live turn's input counters
        elif self._ready is not None:
            (logits, deltas, prompt_ids, cached, live_counts), self._ready = self._ready, None
        else:
            raise ValueError("nothing to respond to: pass messages, or commit a live user turn")
        self.last_prompt_ids = prompt_ids
        n_prompt = len(prompt_ids)
        timings["prefill_s"] = time.perf_counter() - t0

        speech = Speech(self, offline, deltas) if self.audio_output else None
        detok = eng.tokenizer.detokenizer()
        seen = None
        if self.sampling.repetition_penalty != 1.0:
            seen = seen_mask(1, logits.shape[-1], torch.tensor([prompt_ids], device=eng.device),
                             device=eng.device)
        eos = {eng.cfg.thinker_config.eos_token_id, eng.cfg.thinker_config.pad_token_id}
        text_ids: list[int] = []
        unfed: list[int] = []
        finish = "length"
        t_dec = time.perf_counter()
        params = self.sampling
        if self.ignore_eos:  # benchmarks: run to max_new_tokens
            params = replace(params, suppress_ids=(*params.suppress_ids, *sorted(eos)))
        for i in range(self.max_new_tokens):
            tok = int(sample(logits, params, seen, self.generator))
            text_ids.append(tok)
            if i == 0:
                timings["ttft_s"] = time.perf_counter() - t0
            if tok in eos:
                finish = "stop"
                break
            yield TextDelta(detok.push(tok), tok)
            if self._cancel.is_set():
                finish = "cancelled"
                unfed = [tok]
                break
            if i == self.max_new_tokens - 1:  # the last sampled token is not fed (as the reference)
                unfed = [tok]
                break
            step = yield ThinkerWork(eng.thinker, self.cache, tok, deltas)
            logits = step.logits
            self.ctx.add([tok], step.hidden[0], step.embeds[0], step.position_ids[:, 0])
            if speech is not None:
                yield from speech.feed(step.hidden[0, -1], step.embeds[0, -1])
        n_text = len(text_ids)
        timings["thinker_s"] = time.perf_counter() - t_dec
        timings["thinker_tok_s"] = n_text / max(timings["thinker_s"], 1e-9)
        tail = detok.flush()
        if tail:
            yield TextDelta(tail, -1)
        self.next_pos = int(self.cache.length + deltas[0, 0])
        # the next turn feeds what was sampled but not fed, then closes the reply as the chat
        # template renders it (a cut or cancelled reply stays in the history as far as it got)
        self.pending = unfed
        if speech is not None and finish != "cancelled":
            yield from speech.finish()
        if self._cancel.is_set():
            finish = "cancelled"
        codec = speech.codes if speech is not None else []
        if speech is not None:
            timings.update(speech.timings(t0))
        timings["total_s"] = time.perf_counter() - t0
        self.turns += 1
        text = eng.tokenizer.decode([t for t in text_ids if t not in eos], skip_special_tokens=True)
        usage = Usage(n_prompt, n_text, len(codec), cached, **live_counts)
        yield Done(text, finish, usage, timings, text_ids, codec)


@dataclass
class _Live:
    """A user turn arriving live, and what to restore if it is cleared."""

    start: int  # cache slot of the turn's first token
    pending: list[int]  # the session's pending ids before the turn took them
    prefix: list[int]  # text before the media
    position: int  # TMRoPE id of the first prefix token
    video: bool = False
    turn: object = None  # LiveTurn
    audio: list = field(default_factory=list)  # (pcm, rate) pieces, to rebuild as video
    clock: float | None = None  # turn time minus caller time, set by the first frame
    last_frame_t: float = 0.0
    logits: Tensor | None = None  # after the last prefilled token
