"""The Talker: a Qwen2 decoder that turns the Thinker's reply into codec ids (dual track).

State dict == the checkpoint's tensors under ``talker.`` (``thinker_to_talker_proj``, ``model``,
``codec_head``). Every input lives in thinker-hidden space (``embedding_size``): a *text track*
vector from the Thinker plus a *codec track* embedding (``model.embed_tokens``), summed, then
projected by ``thinker_to_talker_proj`` to the talker's hidden size.

This module is the one home of that input (facts §8); the streaming engine
(``engine/speech.py``), the offline loop (``engine/offline.py``) and training
(``train/losses.py``) all build it here:

    position            text track                             codec track
    t < P (prompt)      hidden_t + embed_t (embed 0 at media)  -                ``prompt_track``
    P                   embed(speaker bos)                     codec(pad)       ``start``
    P + 1               text(0)                                codec(bos)       -> code 0
    P + 1 + k, k >= 1   text(k)                                codec(code k-1)  -> code k

``text(k)`` (``TextTrack.at``) is ``r_k = hidden_k + embed_k`` of reply token k (``hidden_k`` the
thinker's final hidden state when token k was fed) while k < n (the reply's length), then
``embed(tts_text_end)`` at k == n, then ``embed(tts_text_pad)`` forever. So talker step k needs
only the thinker's state for reply token k: the streaming engine runs it a few tokens behind
the thinker (``prefill`` + ``step``). Every id comes from ``TalkerConfig``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from omnistream.config import TalkerConfig
from omnistream.nn.cache import KVCache
from omnistream.nn.text import TextModel


@dataclass
class TextTrack:
    """The thinker embeddings the text track uses besides the Thinker's states."""

    bos: Tensor  # [E] the voice's bos token (position P)
    end: Tensor  # [E] tts_text_end: the step right after the reply
    pad: Tensor  # [E] tts_text_pad: every step after that

    def at(self, k: Tensor | int, n: Tensor | int, reply: Tensor | None = None) -> Tensor:
        """Text-track inputs [B|1, T, E] of talker steps ``k`` ([T] or one int; step 0 is the
        ``r_0`` of ``start``) for rows whose reply has ``n`` tokens ([B] or one int): ``reply``
        [B, T, E] (the states r_k) where k < n, ``end`` where k == n, ``pad`` after. ``reply``
        may be None when no k is below n."""
        dev = self.end.device
        k = torch.as_tensor(k, device=dev).reshape(1, -1, 1)  # [1, T, 1]
        n = torch.as_tensor(n, device=dev).reshape(-1, 1, 1)  # [B|1, 1, 1]
        after = torch.where(k == n, self.end, self.pad)  # [B|1, T, E]
        if reply is None:
            if bool((k < n).any()):
                raise ValueError("a reply step needs the reply's state")
            return after
        return torch.where(k < n, reply, after)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.model = TextModel(cfg)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(
        self,
        x: Tensor,  # [B, T, E] summed text + codec tracks (thinker-hidden space)
        position_ids: Tensor,  # [3, B, T]
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,  # [B, T]
        last: Tensor | None = None,  # [B] each right-padded row's last token
    ) -> Tensor:  # [B, T, vocab] float32 codec logits ([B, 1, vocab] with ``last``)
        h = self.model(self.thinker_to_talker_proj(x), position_ids, cache, attention_mask)
        if last is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last][:, None]
        return self.codec_head(h).float()

    # -- the dual-track input (the one builder) -------------------------------------------------

    def codec(self, ids: Tensor) -> Tensor:
        """Codec-track embeddings (thinker-hidden space) of codec ids."""
        return self.model.embed_tokens(ids)

    def prompt_track(self, input_ids: Tensor, hidden: Tensor, embeds: Tensor) -> Tensor:
        """Text track of the prompt [..., L, E]: thinker final hidden + input embedding, with the
        embedding zeroed at audio/image/video placeholders (``input_ids`` [..., L])."""
        c = self.cfg
        ids = (c.audio_token_index, c.image_token_index, c.video_token_index)
        media = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        return hidden + embeds.masked_fill(media.unsqueeze(-1), 0)

    def text_track(self, text_embed: Callable[[Tensor], Tensor], speaker_bos: int) -> TextTrack:
        """The ``TextTrack`` of a voice (``text_embed``: the thinker's token embedding)."""
        c = self.cfg
        ids = [speaker_bos, c.tts_text_end_token_id, c.tts_text_pad_token_id]
        return TextTrack(*text_embed(torch.tensor(ids, device=self.codec_head.weight.device)))

    def start(self, speaker_bos: Tensor, reply0: Tensor) -> Tensor:
        """Inputs [B, 2, E] of the two positions after the prompt: ``speaker_bos`` ([E] or
        [B, 1, E]) + codec(pad), then ``reply0`` (r_0, [B, 1, E]) + codec(bos)."""
        c, B, E = self.cfg, reply0.shape[0], reply0.shape[-1]
        ids = torch.tensor([c.tts_codec_pad_token_id, c.tts_codec_start_token_id])
        text = torch.cat([speaker_bos.expand(B, 1, E), reply0.reshape(B, 1, E)], 1)
        return self.codec(ids.to(reply0.device)) + text

    def step_inputs(self, codes: Tensor, text: Tensor) -> Tensor:
        """Inputs [B, T, E] of decode steps: codec(previous codes [B, T]) + text track."""
        return self.codec(codes) + text

    def teacher_forced(self, track: TextTrack, reply: Tensor, n: Tensor | int,
                       codes: Tensor) -> Tensor:
        """Inputs [B, m+2, E] of every position after the prompt when the codes [B, m] are
        given (training): ``start`` then the m steps. ``reply`` [B, m+1, E] holds r_k at step k
        where k < n (other rows are not read)."""
        m = codes.shape[1]
        text = track.at(torch.arange(m + 1), n, reply)  # [B, m+1, E]
        steps = self.step_inputs(codes, text[:, 1:])  # [B, m, E]
        return torch.cat([self.start(track.bos, text[:, :1]), steps], 1)

    def targets(self, codes: Tensor) -> Tensor:
        """What the positions from P+1 on predict: the codes [B, m], then codec eos [B, m+1]."""
        eos = codes.new_full((codes.shape[0], 1), self.cfg.tts_codec_end_token_id)
        return torch.cat([codes, eos], 1)

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Codec ids that end the speech (the Talker stops on pad or eos)."""
        return self.cfg.tts_codec_pad_token_id, self.cfg.tts_codec_end_token_id

    @property
    def penalty_ids(self) -> tuple[int, int, int]:
        """Codec ids the repetition penalty counts as seen before the first code (the
        reference's codec-track prompt: mask at every prompt position, then pad, bos)."""
        c = self.cfg
        return c.tts_codec_mask_token_id, c.tts_codec_pad_token_id, c.tts_codec_start_token_id

    # -- streaming steps ------------------------------------------------------------------------

    def prefill(
        self,
        cache: KVCache,
        prompt: Tensor,  # [B, L, E] text track of the prompt (``prompt_track``)
        position_ids: Tensor,  # [3, B, L] the thinker's TMRoPE ids of the prompt
        rope_deltas: Tensor,  # [B, 1] the thinker's (next position = cache.length + delta)
        speaker_bos: Tensor,  # [B, 1, E] or [E]: ``TextTrack.bos``
        reply0: Tensor,  # [B, 1, E] r_0 = hidden + embedding of reply token 0
        attention_mask: Tensor | None = None,  # [B, L] left padding of the prompt
    ) -> Tensor:  # [B, vocab] logits of the first code
        B = prompt.shape[0]
        x, pos = self.prefill_inputs(cache, prompt, position_ids, rope_deltas, speaker_bos, reply0)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 2)], 1)
        return self(x, pos, cache, attention_mask)[:, -1]

    def prefill_inputs(self, cache: KVCache, prompt: Tensor, position_ids: Tensor,
                       rope_deltas: Tensor, speaker_bos: Tensor,
                       reply0: Tensor) -> tuple[Tensor, Tensor]:
        """``prefill``'s inputs [B, L+2, E] and TMRoPE ids [3, B, L+2] (the same arguments): the
        prompt, then the two start positions, appended at ``cache.length``."""
        L = prompt.shape[1]
        x = torch.cat([prompt, self.start(speaker_bos, reply0)], 1)  # [B, L+2, E]
        tail = (cache.length + L + rope_deltas + torch.arange(2, device=prompt.device)).unsqueeze(0)
        return x, torch.cat([position_ids, tail.expand(3, -1, -1)], 2)

    def step(self, cache: KVCache, code: Tensor, text: Tensor, rope_deltas: Tensor) -> Tensor:
        """One codec step: previous ``code`` [B] + its text-track input ``text`` [B, 1, E]
        (``TextTrack.at``); returns the next code's logits [B, vocab]."""
        x = self.step_inputs(code.reshape(-1, 1), text.reshape(code.numel(), 1, -1))
        pos = (cache.length + rope_deltas).unsqueeze(0).expand(3, -1, -1)  # [3, B, 1]
        return self(x, pos, cache)[:, -1]
