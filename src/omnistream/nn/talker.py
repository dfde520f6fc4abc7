"""The Talker: a Qwen2 decoder that turns the Thinker's reply into codec ids (dual track).

State dict == the checkpoint's tensors under ``talker.`` (``thinker_to_talker_proj``, ``model``,
``codec_head``). Every input lives in thinker-hidden space (``embedding_size``): a *text track*
vector from the Thinker plus a *codec track* embedding (``model.embed_tokens``), summed, then
projected by ``thinker_to_talker_proj`` to the talker's hidden size.

Text track, per position:

* prompt: thinker final hidden + thinker input embedding (zeroed at audio/image/video
  placeholders);
* then ``embed(speaker bos)`` and ``r_0``; afterwards step k consumes ``r_k``;
* ``r_k = hidden_k + embed_k`` of reply token k (``hidden_k`` is the thinker's final hidden state
  when token k was fed); after the reply, ``embed(151861)`` once, then ``embed(151859)`` forever.

Codec track: nothing on the prompt, ``codec(8292)`` on the speaker bos, ``codec(8293)`` on
``r_0``, then the previous code. So talker step k needs only the thinker's state for reply token
k: the streaming engine can run it a few tokens behind the thinker (``prefill`` + ``step``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from omnistream.config import TalkerConfig
from omnistream.engine.cache import KVCache
from omnistream.engine.sampling import TALKER_SAMPLING, SamplingParams, sample, seen_mask
from omnistream.nn.text import TextModel
from omnistream.nn.thinker import ThinkerGeneration


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.model = TextModel(cfg)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch_size, max_len)

    def codec(self, ids: Tensor) -> Tensor:
        """Codec-track embeddings (thinker-hidden space) of codec ids."""
        return self.model.embed_tokens(ids)

    def forward(
        self,
        x: Tensor,  # [B, T, E] summed text + codec tracks (thinker-hidden space)
        position_ids: Tensor,  # [3, B, T]
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,  # [B, T]
    ) -> Tensor:  # [B, T, vocab] float32 codec logits
        h = self.model(self.thinker_to_talker_proj(x), position_ids, cache, attention_mask)
        return self.codec_head(h).float()

    def prompt_track(self, input_ids: Tensor, hidden: Tensor, embeds: Tensor) -> Tensor:
        """Text track of the prompt [B, L, E]: thinker final hidden + input embedding, with the
        embedding zeroed at media placeholders."""
        c = self.cfg
        ids = (c.audio_token_index, c.image_token_index, c.video_token_index)
        media = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        return hidden + embeds.masked_fill(media.unsqueeze(-1), 0)

    def prefill(
        self,
        cache: KVCache,
        prompt: Tensor,  # [B, L, E] text track of the prompt (``prompt_track``)
        position_ids: Tensor,  # [3, B, L] the thinker's TMRoPE ids of the prompt
        rope_deltas: Tensor,  # [B, 1] the thinker's (next position = cache.length + delta)
        speaker_bos: Tensor,  # [B, 1, E] or [E]: thinker embedding of the speaker's bos token
        reply0: Tensor,  # [B, 1, E] r_0 = hidden + embedding of reply token 0
        attention_mask: Tensor | None = None,  # [B, L] left padding of the prompt
    ) -> Tensor:  # [B, vocab] logits of the first code
        B, L, E = prompt.shape
        pad = self.codec(self._ids(B, self.cfg.tts_codec_pad_token_id))  # [B, 1, E]
        bos = self.codec(self._ids(B, self.cfg.tts_codec_start_token_id))
        x = torch.cat([prompt, speaker_bos.expand(B, 1, E) + pad, reply0.reshape(B, 1, E) + bos], 1)
        tail = (cache.length + L + rope_deltas + torch.arange(2, device=prompt.device)).unsqueeze(0)
        pos = torch.cat([position_ids, tail.expand(3, -1, -1)], 2)  # [3, B, L+2]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 2)], 1)
        return self(x, pos, cache, attention_mask)[:, -1]

    def step(self, cache: KVCache, code: Tensor, reply: Tensor, rope_deltas: Tensor) -> Tensor:
        """One codec step: previous ``code`` [B] + text-track vector ``reply`` [B, 1, E]."""
        x = self.codec(code.reshape(-1, 1)) + reply.reshape(code.numel(), 1, -1)
        pos = (cache.length + rope_deltas).unsqueeze(0).expand(3, -1, -1)  # [3, B, 1]
        return self(x, pos, cache)[:, -1]

    def _ids(self, B: int, tok: int) -> Tensor:
        return torch.full((B, 1), tok, dtype=torch.long, device=self.codec_head.weight.device)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,  # [B, L] the thinker prompt
        thinker: ThinkerGeneration,  # the thinker's finished reply (greedy or sampled)
        text_embed: Callable[[Tensor], Tensor],  # the thinker's token embedding
        speaker_bos: int,
        max_new_tokens: int,
        params: SamplingParams = TALKER_SAMPLING,
        attention_mask: Tensor | None = None,  # [B, L] left padding of the prompt
        text_eos_ids: tuple[int, ...] = (151645,),
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Offline loop over a finished thinker reply: codes [B, n] (``tts_codec_pad`` after a
        row's end) and per-row lengths [B] (codes before the first end id)."""
        c, dev = self.cfg, input_ids.device
        B, L = input_ids.shape
        tokens, N = thinker.tokens, thinker.tokens.shape[1]
        # row b's reply is r_0 .. r_{e_b - 1}, e_b = its first thinker eos (clamped to [1, N-1]),
        # then embed(text end) once, then embed(text pad) forever
        is_eos = torch.isin(tokens, torch.tensor(text_eos_ids, device=dev))
        first = torch.where(is_eos, torch.arange(N, device=dev), N).amin(-1).clamp(1, max(N - 1, 1))
        r = thinker.reply_hidden + thinker.reply_embeds  # [B, N-1, E]
        end = text_embed(self._ids(B, c.tts_text_end_token_id))
        pad = text_embed(self._ids(B, c.tts_text_pad_token_id))

        def reply(k: int) -> Tensor:  # [B, 1, E]
            real = r[:, min(k, N - 2)].unsqueeze(1)
            k_ = torch.full((B, 1, 1), k, device=dev)
            f = first.view(B, 1, 1)
            return torch.where(k_ < f, real, torch.where(k_ == f, end, pad))

        p = thinker.prompt
        cache = self.new_cache(B, L + 2 + max_new_tokens)
        prompt = self.prompt_track(input_ids, p.hidden, p.embeds)
        bos = text_embed(self._ids(B, speaker_bos))
        logits = self.prefill(
            cache, prompt, p.position_ids, p.rope_deltas, bos, reply(0), attention_mask
        )
        # the reference's repetition penalty counts its prompt codec ids: mask (x L), pad, bos
        start = [c.tts_codec_pad_token_id, c.tts_codec_start_token_id]
        start += [c.tts_codec_mask_token_id] * (L > 0)
        seen = seen_mask(B, c.vocab_size, torch.tensor(start, device=dev).expand(B, -1), dev)
        stop = torch.tensor([c.tts_codec_pad_token_id, c.tts_codec_end_token_id], device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        codes = []
        for k in range(1, max_new_tokens + 1):
            code = sample(logits, params, seen, generator)
            code = torch.where(done, c.tts_codec_pad_token_id, code)
            codes.append(code)
            done |= torch.isin(code, stop)
            if k == max_new_tokens or bool(done.all()):
                break
            logits = self.step(cache, code, reply(k), p.rope_deltas)
        codes = torch.stack(codes, 1)  # [B, n]
        n = codes.shape[1]
        lengths = torch.where(torch.isin(codes, stop), torch.arange(n, device=dev), n).amin(-1)
        return codes, lengths
