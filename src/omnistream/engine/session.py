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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from omnistream.engine.events import AudioChunk, Done, Event, TextDelta, Usage
from omnistream.engine.sampling import TALKER_SAMPLING, SamplingParams, sample, seen_mask

DEFAULT_SYSTEM = "You are a helpful assistant."
SPEECH_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"  # file make-tiny leaves in a checkpoint it writes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Context:
    """What the Talker needs about every position in the Thinker's cache."""

    ids: list[int] = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)  # [T_i, D] final hidden states
    embeds: list[Tensor] = field(default_factory=list)  # [T_i, D] input embeddings, 0 at media
    pos: list[Tensor] = field(default_factory=list)  # [3, T_i] TMRoPE ids

    def add(self, ids: list[int], hidden: Tensor, embeds: Tensor, pos: Tensor) -> None:
        self.ids += ids
        self.hidden.append(hidden)
        self.embeds.append(embeds)
        self.pos.append(pos)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.cat(self.hidden), torch.cat(self.embeds), torch.cat(self.pos, 1)

    def clear(self) -> None:
        self.__init__()


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
        from omnistream.prompt import Processor

        self.processor = Processor.from_dir(self.model_dir)

    @classmethod
    def load(cls, model: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
             audio_output: bool = True, quiet: bool = False) -> Engine:
        """Load a checkpoint directory or hub id; ``audio_output=False`` loads the Thinker only."""
        from omnistream.checkpoint import (
            load_component,
            load_config,
            load_speakers,
            resolve_model_dir,
        )
        from omnistream.tokenizer import Tokenizer

        d = resolve_model_dir(model)
        cfg = load_config(d)
        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        thinker = load_component(d, "thinker", dtype=dt, device=device, quiet=quiet).eval()
        talker = token2wav = speakers = None
        if audio_output and cfg.enable_audio_output:
            talker = load_component(d, "talker", dtype=dt, device=device, quiet=quiet).eval()
            token2wav = load_component(d, "token2wav", dtype=torch.float32, device=device,
                                       quiet=quiet).eval()
            speakers = load_speakers(d)
        return cls(d, cfg, Tokenizer.from_dir(d), thinker, talker, token2wav, speakers, device, dt,
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

    def session(self, voice: str | None = None, system: str | None = None,
                audio_output: bool = True, sampling: SamplingParams | None = None,
                talker_sampling: SamplingParams | None = None, max_new_tokens: int = 256,
                talker_max_new_tokens: int = 4096, seed: int | None = None,
                ignore_eos: bool = False, use_audio_in_video: bool = False,
                max_context: int = 8192, chunk_frames: int = 48, ode_steps: int = 10,
                solver: str = "rk4") -> Session:
        """A conversation. Validates the voice at once (unknown voice -> ValueError)."""
        return Session(self, voice, system, audio_output, sampling or SamplingParams(),
                       talker_sampling or TALKER_SAMPLING, max_new_tokens, talker_max_new_tokens,
                       seed, ignore_eos, use_audio_in_video, max_context, chunk_frames, ode_steps,
                       solver)


class Session:
    """One conversation; see the module docstring for the schedule."""

    def __init__(self, engine: Engine, voice, system, audio_output, sampling, talker_sampling,
                 max_new_tokens, talker_max_new_tokens, seed, ignore_eos, use_audio_in_video,
                 max_context, chunk_frames, ode_steps, solver):
        self.engine = engine
        self.audio_output = bool(audio_output and engine.talker is not None)
        if audio_output and engine.talker is None:
            raise ValueError("audio output requested but the engine was loaded text-only")
        self.speaker = engine.speaker(voice) if self.audio_output else None
        self.system = system
        self.sampling = sampling
        self.talker_sampling = talker_sampling
        self.max_new_tokens = max_new_tokens
        self.talker_max_new_tokens = talker_max_new_tokens
        self.ignore_eos = ignore_eos
        self.use_audio_in_video = use_audio_in_video
        self.chunk_frames = chunk_frames
        self.ode_steps = ode_steps
        self.solver = solver
        # one generator per stage, so streaming and offline draw the same numbers in each
        base = seed if seed is not None else int(torch.seed() % (2**62))
        self.generator, self.talker_gen, self.noise_gen = (
            torch.Generator(device=engine.device).manual_seed(base + i) for i in range(3))
        self.noise_seed = base + 2
        self.cache = engine.thinker.model.new_cache(1, max_context)
        self.ctx = _Context()
        self.next_pos = 0  # TMRoPE id of the next token fed to the Thinker
        self.pending: list[int] = []  # sampled but not yet fed (the previous reply's <|im_end|>)
        self.turns = 0
        self.last_prompt_ids: list[int] = []
        self._cancel = threading.Event()
        self._live = None  # streaming user turn (append_audio / append_video_frame)

    # -- control --------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the running reply at its next step (thread-safe)."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget the conversation (the cache is kept allocated)."""
        self.cache.reset()
        self.ctx.clear()
        self.next_pos = 0
        self.pending = []
        self.turns = 0
        self._live = None

    # -- prompt ---------------------------------------------------------------------------------

    def _system_prompt(self) -> str:
        if self.system is not None:
            return self.system
        return SPEECH_SYSTEM if self.audio_output else DEFAULT_SYSTEM

    def _prepare(self, messages: list[dict] | str):
        """The new turn's inputs; ids [1, T] continue the cached conversation."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        first = self.cache.length == 0
        system = self._system_prompt()
        inputs = self.engine.processor(list(messages), add_generation_prompt=True,
                                       use_audio_in_video=self.use_audio_in_video,
                                       speech_output=self.audio_output, system_prompt=system)
        ids = inputs.input_ids.reshape(-1)
        if not first:
            if messages and messages[0].get("role") == "system":
                raise ValueError("a system turn can only start a conversation")
            # drop the system block the template inserts; close the previous assistant turn
            sys_ids = self.engine.tokenizer.encode(f"<|im_start|>system\n{system}<|im_end|>\n")
            if ids[: len(sys_ids)].tolist() != sys_ids:
                raise RuntimeError("unexpected prompt rendering of a continued conversation")
            head = self.pending + self.engine.tokenizer.encode("\n")
            ids = torch.cat([torch.tensor(head, dtype=ids.dtype), ids[len(sys_ids):]])
        self.pending = []
        return inputs, ids[None]

    # -- the reply ------------------------------------------------------------------------------

    @torch.inference_mode()
    def respond(self, messages: list[dict] | str, offline: bool = False) -> Iterator[Event]:
        """Answer ``messages`` (the new user turn; history lives in the session). Yields
        ``TextDelta`` and ``AudioChunk`` events interleaved, then one ``Done``.

        ``offline=True`` is the reference's order (whole reply, then whole speech, one chunk) and
        yields the same ids; it exists as a baseline and for parity checks."""
        self._cancel.clear()
        eng, th = self.engine, self.engine.thinker
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        inputs, ids = self._prepare(messages)
        ids = ids.to(eng.device)
        self.last_prompt_ids = ids[0].tolist()
        if self.cache.length + ids.shape[1] + self.max_new_tokens + 2 > self.cache.max_len:
            raise ValueError(
                f"conversation too long: {self.cache.length} cached + {ids.shape[1]} prompt + "
                f"{self.max_new_tokens} new tokens exceed the context of {self.cache.max_len}"
            )
        media = th.encode_media(inputs)
        cached = self.cache.length
        step = th.prefill(ids, self.cache, media=media, position_offset=self.next_pos)
        self.ctx.add(self.last_prompt_ids, step.hidden[0], _zero_media(step.embeds[0], ids[0],
                     eng.cfg.thinker_config), step.position_ids[:, 0])
        deltas = step.rope_deltas
        timings["prefill_s"] = time.perf_counter() - t0

        speech = _Speech(self, offline, deltas) if self.audio_output else None
        detok = eng.tokenizer.detokenizer()
        seen = None
        if self.sampling.repetition_penalty != 1.0:
            seen = seen_mask(1, step.logits.shape[-1], ids, device=eng.device)
        eos = {eng.cfg.thinker_config.eos_token_id, eng.cfg.thinker_config.pad_token_id}
        text_ids: list[int] = []
        finish = "length"
        t_dec = time.perf_counter()
        for i in range(self.max_new_tokens):
            logits = step.logits
            if self.ignore_eos:
                logits = logits.clone()
                logits[:, list(eos)] = -float("inf")
            tok = int(sample(logits, self.sampling, seen, self.generator))
            text_ids.append(tok)
            if i == 0:
                timings["ttft_s"] = time.perf_counter() - t0
            if tok in eos:
                finish = "stop"
                self.pending = [tok]
                break
            yield TextDelta(detok.push(tok), tok)
            if self._cancel.is_set():
                finish = "cancelled"
                break
            if i == self.max_new_tokens - 1:  # the last sampled token is not fed (as the reference)
                self.pending = [tok]
                break
            step = th.decode_step(torch.tensor([tok], device=eng.device), self.cache, deltas)
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
        if finish == "cancelled":  # a cancelled turn leaves no half reply in the cache
            self.pending = []
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
        usage = Usage(ids.shape[1], n_text, len(codec), cached)
        yield Done(text, finish, usage, timings, text_ids, codec)


def _zero_media(embeds: Tensor, ids: Tensor, tcfg) -> Tensor:
    """The Talker sees no embedding at audio/image/video placeholder positions (facts §8)."""
    media = (ids == tcfg.audio_token_index) | (ids == tcfg.image_token_index) | (
        ids == tcfg.video_token_index)
    return embeds.masked_fill(media.unsqueeze(-1), 0.0)


class _Speech:
    """The Talker + code2wav side of one reply, fed one reply-token state at a time."""

    def __init__(self, sess: Session, offline: bool, deltas: Tensor):
        self.sess = sess
        self.offline = offline
        self.codes: list[int] = []
        self.reply: list[Tensor] = []  # [D] hidden + embed of reply tokens not yet consumed
        self.k = 0  # next talker step
        self.done = False
        self.prompt_len = sess.cache.length  # thinker prompt positions (reply token 0 not yet fed)
        self.deltas = deltas
        self.talker_gen = sess.talker_gen
        self.n_chunks = 0
        self.t_first_audio: float | None = None
        self.talker_s = 0.0
        self.code2wav_s = 0.0
        self.audio_s = 0.0
        eng = sess.engine
        self.talker = eng.talker
        self.stream = None
        if not offline:
            from omnistream.engine.code2wav import Code2WavStream

            self.stream = Code2WavStream(eng.token2wav, sess.speaker.cond, sess.speaker.ref_mel,
                                         chunk_size=sess.chunk_frames, steps=sess.ode_steps,
                                         solver=sess.solver, seed=sess.noise_seed)

    def feed(self, hidden: Tensor, embed: Tensor) -> Iterator[Event]:
        """Reply token k's Thinker state exists: run the Talker step(s) it unlocks."""
        self.reply.append(hidden + embed)
        if self.offline:
            return
        yield from self._advance()

    def finish(self) -> Iterator[Event]:
        """The reply is complete: the Talker runs on (text-eos, then text-pad) to its codec eos."""
        self.reply.append(None)  # marks the end of the text
        yield from self._advance(until_done=True)
        if self.offline and self.codes:
            t = time.perf_counter()
            wav = self.sess.engine.token2wav(
                torch.tensor([self.codes]), self.sess.speaker.cond, self.sess.speaker.ref_mel,
                steps=self.sess.ode_steps, solver=self.sess.solver, generator=self.sess.noise_gen)
            self.code2wav_s += time.perf_counter() - t
            yield from self._emit(wav)
        elif self.stream is not None:
            t = time.perf_counter()
            chunks = list(self.stream.flush())
            self.code2wav_s += time.perf_counter() - t
            for c in chunks:
                yield from self._emit(c)

    def _reply_input(self, k: int) -> Tensor | None:
        """Text-track input of talker step k: r_k, then the text-end embedding once, then the
        text-pad embedding; None while reply token k does not exist yet."""
        if k < len(self.reply) and self.reply[k] is not None:
            return self.reply[k]
        if not self.reply or self.reply[-1] is not None:
            return None  # the Thinker has not produced token k yet
        end = len(self.reply) - 1  # index of the end marker = number of real reply tokens
        return self.text_end if k == end else self.text_pad

    def _start(self) -> Tensor:
        sess, eng = self.sess, self.sess.engine
        c = eng.cfg.talker_config
        hidden, embeds, pos = sess.ctx.tensors()
        P = self.prompt_len
        emb = eng.thinker.model.embed_tokens
        dev = eng.device
        ids = torch.tensor([sess.speaker.bos_token, c.tts_text_end_token_id,
                            c.tts_text_pad_token_id], device=dev)
        bos, self.text_end, self.text_pad = emb(ids).unbind(0)
        self.cache = self.talker.new_cache(1, P + 2 + sess.talker_max_new_tokens)
        prompt = (hidden[:P] + embeds[:P])[None]  # [1, P, E] (embeds are 0 at media)
        self.seen = seen_mask(1, c.vocab_size, torch.tensor(
            [[c.tts_codec_mask_token_id, c.tts_codec_pad_token_id, c.tts_codec_start_token_id]],
            device=dev), dev)
        self.stop = {c.tts_codec_pad_token_id, c.tts_codec_end_token_id}
        return self.talker.prefill(self.cache, prompt, pos[:, None, :P], self.deltas, bos,
                                   self.reply[0].reshape(1, 1, -1))

    def _advance(self, until_done: bool = False) -> Iterator[Event]:
        """Run every Talker step whose input exists; push codes to code2wav as they come."""
        sess = self.sess
        while not self.done and not sess._cancel.is_set():
            t = time.perf_counter()
            if self.k == 0:
                if not self.reply or self.reply[0] is None:
                    self.done = self.done or bool(self.reply)  # an empty reply has no speech
                    return
                logits = self._start()
            else:
                r = self._reply_input(self.k)
                if r is None:
                    return
                prev = torch.tensor([self.codes[-1]], device=sess.engine.device)
                logits = self.talker.step(self.cache, prev, r.reshape(1, 1, -1), self.deltas)
            code = int(sample(logits, sess.talker_sampling, self.seen, self.talker_gen))
            self.k += 1
            self.talker_s += time.perf_counter() - t
            if code in self.stop:
                self.done = True
                return
            self.codes.append(code)
            if len(self.codes) >= sess.talker_max_new_tokens:
                self.done = True
            if self.stream is not None:
                t = time.perf_counter()
                chunks = list(self.stream.push([code]))
                self.code2wav_s += time.perf_counter() - t
                for c in chunks:
                    yield from self._emit(c)

    def _emit(self, pcm: Tensor | np.ndarray) -> Iterator[Event]:
        pcm = pcm.detach().float().cpu().numpy() if isinstance(pcm, Tensor) else pcm
        pcm = pcm.reshape(-1).astype(np.float32)
        if pcm.size == 0:
            return
        if self.t_first_audio is None:
            self.t_first_audio = time.perf_counter()
        self.audio_s += pcm.size / 24000
        yield AudioChunk(pcm, self.n_chunks)
        self.n_chunks += 1

    def timings(self, t0: float) -> dict[str, float]:
        out = {"talker_s": self.talker_s, "code2wav_s": self.code2wav_s,
               "talker_tok_s": len(self.codes) / max(self.talker_s, 1e-9),
               "audio_s": self.audio_s,
               "code2wav_rtf": self.code2wav_s / max(self.audio_s, 1e-9)}
        if self.t_first_audio is not None:
            out["ttfa_s"] = self.t_first_audio - t0
        return out
