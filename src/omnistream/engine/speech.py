"""The speech half of one reply: the Talker and code2wav, fed one reply-token state at a time.

``Session.respond`` (``session.py``) runs the Thinker; after each fed reply token it hands the
token's state to ``Speech.feed``, which runs every Talker step that state unlocks and pushes the
codes through streaming code2wav. ``finish`` runs the Talker on past the text (text end, then
text pad) to its codec eos and flushes the audio. With ``offline=True`` nothing runs before
``finish``, and the whole utterance is synthesised at once (the reference's order, same codes).

The Talker's input comes from ``nn/talker.py``'s builder (``prompt_track``, ``TextTrack``,
``prefill`` / ``step``), as in the offline loop and in training. Talker steps and code2wav chunks
are yielded as work items (``engine/batch.py``): run at once alone, or batched across sessions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from omnistream.engine.batch import AudioDrain, Code2WavWork, PrefillWork, TalkerWork
from omnistream.engine.events import SAMPLE_RATE, AudioChunk, Event
from omnistream.engine.sampling import sample, seen_mask

if TYPE_CHECKING:
    from omnistream.engine.session import Session

TALKER_SLACK = 1024  # spare Talker cache slots, so later turns usually fit without a new one


class Speech:
    """The Talker + code2wav side of one reply (see the module docstring)."""

    def __init__(self, sess: Session, offline: bool, deltas: Tensor):
        self.sess = sess
        self.offline = offline
        self.codes: list[int] = []
        self.reply: list[Tensor] = []  # [E] r_k = hidden + embedding of each fed reply token
        self.n_reply: int | None = None  # the reply's length, once the text is complete
        self.k = 0  # next talker step
        self.done = False
        self.prompt_len = sess.cache.length  # thinker prompt positions (reply token 0 not yet fed)
        self.deltas = deltas  # [1, 1] the thinker's rope deltas
        self.talker_gen = sess.talker_gen
        self.n_chunks = 0
        self.t_first_audio: float | None = None
        self.talker_s = 0.0
        self.code2wav_s = 0.0
        self.audio_s = 0.0
        eng = sess.engine
        self.talker = eng.talker
        self.track = self.talker.text_track(eng.thinker.model.embed_tokens, sess.speaker.bos_token)
        self.stream = None
        if not offline:
            from omnistream.engine.code2wav import Code2WavStream

            self.stream = Code2WavStream(eng.token2wav, sess.speaker.cond, sess.speaker.ref_mel,
                                         chunk_size=sess.chunk_frames,
                                         max_chunk_size=sess.max_chunk_frames,
                                         first_future=sess.first_chunk_lookahead,
                                         steps=sess.ode_steps,
                                         solver=sess.solver, guidance_scale=sess.guidance_scale,
                                         seed=sess.noise_seed,
                                         spk=eng.voice_condition(sess.speaker,
                                                                 sess.guidance_scale))

    def feed(self, hidden: Tensor, embed: Tensor) -> Iterator[Event]:
        """Reply token k's Thinker state exists (``hidden``, ``embed`` [E]): run the Talker
        step(s) it unlocks."""
        self.reply.append(hidden + embed)
        if self.offline:
            return
        yield from self._advance()

    def finish(self) -> Iterator[Event]:
        """The reply is complete: the Talker runs on (text end, then text pad) to its codec eos."""
        self.n_reply = len(self.reply)
        yield from self._advance()
        if self.offline and self.codes:
            sess = self.sess
            t = time.perf_counter()
            wav = sess.engine.token2wav(
                torch.tensor([self.codes]), sess.speaker.cond, sess.speaker.ref_mel,
                steps=sess.ode_steps, solver=sess.solver, guidance_scale=sess.guidance_scale,
                generator=sess.noise_gen)
            self.code2wav_s += time.perf_counter() - t
            if (ev := self._event(wav)) is not None:
                yield ev
        elif self.stream is not None:
            self.stream.close()
            yield from self._chunks()
            yield AudioDrain()  # chunks made beside the reply are all out before its end

    def _text(self, k: int) -> Tensor | None:
        """Text-track input [1, 1, E] of talker step k (``TextTrack.at``); None while reply
        token k does not exist yet."""
        n = self.n_reply
        if k < len(self.reply):
            r = self.reply[k].reshape(1, 1, -1)
        elif n is None:
            return None  # the Thinker has not produced token k yet
        else:
            r = None
        return self.track.at(k, k + 1 if n is None else n, r)

    def _start(self) -> Iterator[PrefillWork]:
        """Prefill the prompt positions this turn added, then the two start positions (a
        ``PrefillWork``: other sessions' Talker prompts may run in the same call); returns the
        first code's logits."""
        sess, t = self.sess, time.perf_counter()
        hidden, embeds, pos = sess.ctx.tensors()  # [T, E], [T, E], [3, T]
        P, dev = self.prompt_len, hidden.device
        ctx, need = sess.ctx, P + 2 + sess.talker_max_new_tokens
        if ctx.talker_cache is None or ctx.talker_cache.max_len < need:
            ctx.talker_cache = self.talker.new_cache(1, need + TALKER_SLACK)
            ctx.talker_valid = 0
        self.cache = ctx.talker_cache
        v = min(ctx.talker_valid, P) if sess.reuse_talker_cache else 0
        self.cache.crop(min(v, self.cache.length))  # earlier turns' prompt stays; the rest goes
        shared = ctx.prefix if sess.reuse_talker_cache and v == 0 else None
        if shared is not None and shared.talker_k is not None:  # a shared system block's rows
            self.cache.put_rows(shared.talker_k, shared.talker_v)
            v, shared = len(shared.ids), None
        ctx.talker_valid = 0  # until this prefill has run
        ids = torch.tensor(ctx.ids[v:P], device=dev)
        prompt = self.talker.prompt_track(ids, hidden[v:P], embeds[v:P])[None]  # [1, P - v, E]
        self.seen = seen_mask(1, self.talker.cfg.vocab_size,
                              torch.tensor([self.talker.penalty_ids], device=dev), dev)
        self.stop = set(self.talker.stop_ids)
        x, pos = self.talker.prefill_inputs(self.cache, prompt, pos[:, None, v:P], self.deltas,
                                            self.track.bos, self._text(0))
        self.talker_s += time.perf_counter() - t
        work = PrefillWork(self.talker, self.cache, x, pos)
        logits, _ = yield work
        self.talker_s += work.seconds
        if shared is not None:  # the first session with speech keeps them for the others
            shared.talker_k, shared.talker_v = self.cache.rows(len(shared.ids))
        ctx.talker_valid = P
        return logits

    def _advance(self) -> Iterator[Event]:
        """Run every Talker step whose input exists; push codes to code2wav as they come."""
        sess = self.sess
        while not self.done and not sess._cancel.is_set():
            if self.k == 0:
                if not self.reply:
                    self.done = self.n_reply is not None  # an empty reply has no speech
                    return
                logits = yield from self._start()
            else:
                text = self._text(self.k)
                if text is None:
                    return
                work = TalkerWork(self.talker, self.cache, self.codes[-1], text, self.deltas)
                logits = yield work
                self.talker_s += work.seconds
            t = time.perf_counter()
            code = int(sample(logits, sess.talker_sampling, self.seen, self.talker_gen))
            self.k += 1
            self.talker_s += time.perf_counter() - t
            if code in self.stop:
                self.done = True
                return
            self.codes.append(code)
            limit = sess.talker_max_new_tokens
            if self.n_reply is not None:  # the text is complete: cap speech by its length
                limit = min(limit, sess.max_codes_per_token * (self.n_reply + 1))
            if len(self.codes) >= limit:
                self.done = True
            if self.stream is not None:
                self.stream.append([code])
                yield from self._chunks()

    def _chunks(self) -> Iterator:
        """Synthesise and emit every code2wav chunk whose codes exist (or hand them on: a
        ``Batcher`` with a code2wav thread sends None back and emits each when it is made)."""
        for chunk in iter(self.stream.next_chunk, None):
            deadline = None  # the first two chunks never wait (engine/batch.py)
            if self.n_chunks >= 2 and self.t_first_audio is not None:
                deadline = self.t_first_audio + self.audio_s
            work = Code2WavWork(self.stream, chunk, deadline, self._made)
            pcm = yield work
            if pcm is not None and (ev := self._made(work, pcm)) is not None:
                yield ev

    def _made(self, work: Code2WavWork, pcm: np.ndarray) -> AudioChunk | None:
        """A chunk's PCM is made: its event (None when empty)."""
        self.code2wav_s += work.seconds
        return self._event(pcm)

    def _event(self, pcm: Tensor | np.ndarray) -> AudioChunk | None:
        """The next audio chunk's event (None for no samples); counts it."""
        pcm = pcm.detach().float().cpu().numpy() if isinstance(pcm, Tensor) else pcm
        pcm = pcm.reshape(-1).astype(np.float32)
        if pcm.size == 0:
            return None
        if self.t_first_audio is None:
            self.t_first_audio = time.perf_counter()
        self.audio_s += pcm.size / SAMPLE_RATE
        self.n_chunks += 1
        return AudioChunk(pcm, self.n_chunks - 1)

    def timings(self, t0: float) -> dict[str, float]:
        """Talker and code2wav time, speech seconds, and time to first audio (from ``t0``)."""
        out = {"talker_s": self.talker_s, "code2wav_s": self.code2wav_s,
               "talker_tok_s": len(self.codes) / max(self.talker_s, 1e-9),
               "audio_s": self.audio_s,
               "code2wav_rtf": self.code2wav_s / max(self.audio_s, 1e-9)}
        if self.t_first_audio is not None:
            out["ttfa_s"] = self.t_first_audio - t0
        return out
