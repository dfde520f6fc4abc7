"""The Thinker: audio + vision encoders feeding the Qwen2.5 text decoder.

State dict == the checkpoint's tensors under ``thinker.`` (``audio_tower.*``, ``visual.*``,
``model.*``, ``lm_head.weight``).

The per-step API is what the streaming engine reuses:

* ``encode_media(...)``  -> ``Media`` (encoder outputs + what TMRoPE needs);
* ``prefill(ids, cache, ...)`` -> ``ThinkerStep`` for the whole prompt (optionally in chunks);
* ``decode_step(tokens, cache, rope_deltas)`` -> ``ThinkerStep`` for one new token.

A ``ThinkerStep`` carries the next-token logits plus the two per-position tensors the Talker
consumes (final hidden state and input embedding), nothing else. The loops that drive these
steps live above ``nn/``: ``engine/offline.py`` (a whole batch) and ``engine/session.py``.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from omnistream.config import ThinkerConfig
from omnistream.nn.audio_encoder import AudioEncoder
from omnistream.nn.cache import KVCache
from omnistream.nn.positions import get_rope_index
from omnistream.nn.text import TextModel
from omnistream.nn.vision_encoder import VisionEncoder

MEDIA_FIELDS = (
    "input_features",
    "feature_attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
    "use_audio_in_video",
)


def _field(inputs: Any, name: str) -> Any:
    if inputs is None:
        return None
    if isinstance(inputs, Mapping):
        return inputs.get(name)
    return getattr(inputs, name, None)


@dataclass
class Media:
    """Encoded media of one batch of prompts, in prompt order (all items of all rows).

    The ``*_embeds`` are encoder outputs, one row per placeholder token; the rest is what
    ``get_rope_index`` needs to position them."""

    audio_embeds: Tensor | None = None  # [N_audio_tokens, D]
    audio_seqlens: Tensor | None = None  # [K] mel frames per audio item
    image_embeds: Tensor | None = None  # [N_image_tokens, D]
    image_grid_thw: Tensor | None = None  # [I, 3]
    video_embeds: Tensor | None = None  # [N_video_tokens, D]
    video_grid_thw: Tensor | None = None  # [V, 3]
    video_second_per_grid: Tensor | None = None  # [V]
    use_audio_in_video: bool = False


@dataclass
class ThinkerStep:
    """One prefill or decode call. ``hidden``/``embeds`` cover the tokens fed in this call."""

    logits: Tensor  # [B, V] next-token logits (float32)
    hidden: Tensor  # [B, T, D] final (normed) hidden states
    embeds: Tensor  # [B, T, D] input embeddings (media merged)
    position_ids: Tensor  # [3, B, T]
    rope_deltas: Tensor  # [B, 1]: next position = cache.length + rope_deltas


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio_config)
        self.visual = VisionEncoder(cfg.vision_config)
        self.model = TextModel(cfg.text_config)
        self.lm_head = nn.Linear(
            cfg.text_config.hidden_size, cfg.text_config.vocab_size, bias=False
        )
        if cfg.text_config.tie_word_embeddings:  # one [V, D] matrix for input and output
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- inputs ---------------------------------------------------------------------------------

    def encode_media(self, inputs: Any = None, /, **fields: Any) -> Media:
        """Run the encoders on processor outputs.

        ``inputs``: any object or mapping holding the processor fields (``prompt.PromptInputs``,
        a transformers ``BatchFeature``), and/or the fields as keywords (keywords win):
        ``input_features`` [K, n_mels, T_pad], ``feature_attention_mask`` [K, T_pad],
        ``pixel_values`` [N, 1176], ``image_grid_thw`` [I, 3], ``pixel_values_videos``,
        ``video_grid_thw`` [V, 3], ``video_second_per_grid`` [V], ``use_audio_in_video``."""
        f = {k: _field(inputs, k) for k in MEDIA_FIELDS}
        f.update((k, v) for k, v in fields.items() if v is not None)
        unknown = set(fields) - set(MEDIA_FIELDS)
        if unknown:
            raise TypeError(f"unknown media fields {sorted(unknown)}")
        dev = self.lm_head.weight.device
        m = Media(
            image_grid_thw=f["image_grid_thw"],
            video_grid_thw=f["video_grid_thw"],
            video_second_per_grid=f["video_second_per_grid"],
            use_audio_in_video=bool(f["use_audio_in_video"]),
        )
        if f["input_features"] is not None:
            feats, mask = f["input_features"].to(dev), f["feature_attention_mask"]
            valid = torch.ones(feats.shape[::2], dtype=torch.bool, device=dev)  # [K, T_pad]
            if mask is not None:
                valid = mask.to(dev, torch.bool)
            m.audio_seqlens = valid.sum(-1)
            m.audio_embeds, _ = self.audio_tower(feats.transpose(1, 2)[valid].T, m.audio_seqlens)
        if f["pixel_values"] is not None:
            m.image_embeds = self.visual(f["pixel_values"].to(dev), f["image_grid_thw"])
        if f["pixel_values_videos"] is not None:
            m.video_embeds = self.visual(f["pixel_values_videos"].to(dev), f["video_grid_thw"])
        return m

    def embed(self, input_ids: Tensor, media: Media | None = None) -> Tensor:
        """Token embeddings [B, T, D] with media features written at their placeholders."""
        x = self.model.embed_tokens(input_ids)
        if media is None:
            return x
        for tok, feats in (
            (self.cfg.audio_token_index, media.audio_embeds),
            (self.cfg.image_token_index, media.image_embeds),
            (self.cfg.video_token_index, media.video_embeds),
        ):
            if feats is not None:
                mask = (input_ids == tok).unsqueeze(-1)  # [B, T, 1]
                x = x.masked_scatter(mask, feats.to(x.dtype))
        return x

    def position_ids(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, media: Media | None = None
    ) -> tuple[Tensor, Tensor]:
        """TMRoPE ids [3, B, T] of a prompt and its rope deltas [B, 1] relative to the *padded*
        length, so that decode positions are simply ``cache.length + rope_deltas``."""
        m = media or Media()
        pos, deltas = get_rope_index(
            input_ids,
            m.image_grid_thw,
            m.video_grid_thw,
            attention_mask,
            m.use_audio_in_video,
            m.audio_seqlens,
            m.video_second_per_grid,
            self.cfg,
        )
        if attention_mask is not None:
            deltas = deltas - (attention_mask == 0).sum(-1, keepdim=True).to(deltas)
        return pos, deltas

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        inputs_embeds: Tensor,  # [B, T, D]
        position_ids: Tensor,  # [3, B, T]
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,  # [B, T]
        last_only: bool = False,
        last: Tensor | None = None,  # [B] each right-padded row's last token
    ) -> tuple[Tensor, Tensor]:
        """Logits [B, T|1, V] (float32; one position per row with ``last_only`` or ``last``) and
        final hidden states [B, T, D]."""
        hidden = self.model(inputs_embeds, position_ids, cache, attention_mask)
        if last is not None:
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last][:, None]
        else:
            h = hidden[:, -1:] if last_only else hidden
        return self.lm_head(h).float(), hidden

    def prefill(
        self,
        input_ids: Tensor,  # [B, T]
        cache: KVCache,
        attention_mask: Tensor | None = None,
        media: Media | None = None,
        chunk_size: int | None = None,
        position_offset: Tensor | int = 0,
    ) -> ThinkerStep:
        """Run the prompt into ``cache`` (appended at ``cache.length``, in chunks of
        ``chunk_size`` tokens if given); returns the next-token logits and per-token states.

        ``position_offset`` (int or [B, 1]) shifts the prompt's TMRoPE ids: to continue a
        conversation in the same cache pass the previous turn's ``cache.length + rope_deltas``."""
        chunks = self.prefill_chunks(input_ids, cache, attention_mask, media, chunk_size,
                                     position_offset)
        try:
            while True:
                chunks.send(None)
        except StopIteration as done:
            return done.value

    def prefill_chunks(
        self,
        input_ids: Tensor,  # [B, T]
        cache: KVCache,
        attention_mask: Tensor | None = None,
        media: Media | None = None,
        chunk_size: int | None = None,
        position_offset: Tensor | int = 0,
    ) -> Generator[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, ThinkerStep]:
        """``prefill`` one chunk at a time: yields each chunk's inputs (embeddings [B, n, D] and
        TMRoPE ids [3, B, n]) and takes back None (the chunk runs here) or what running it into
        ``cache`` gave, (logits [B, V], hidden [B, n, D]): a scheduler runs several sessions'
        chunks in one call, and other sessions' steps between them (engine/batch.py). Returns
        the ``ThinkerStep``."""
        embeds = self.embed(input_ids, media)
        pos, deltas = self.position_ids(input_ids, attention_mask, media)
        offset = torch.as_tensor(position_offset, device=pos.device).reshape(-1, 1)  # [B|1, 1]
        pos = pos + offset.unsqueeze(0)
        deltas = deltas + offset - cache.length
        T = input_ids.shape[1]
        step = chunk_size or T
        hidden = []
        for s in range(0, T, step):
            x, p = embeds[:, s : s + step], pos[:, :, s : s + step]
            out = yield x, p
            if out is None:
                am = None if attention_mask is None else attention_mask[:, s : s + step]
                logits, h = self(x, p, cache, am, True)
                out = logits[:, -1], h
            logits, h = out
            hidden.append(h)
        return ThinkerStep(logits, torch.cat(hidden, 1), embeds, pos, deltas)

    def decode_step(self, tokens: Tensor, cache: KVCache, rope_deltas: Tensor) -> ThinkerStep:
        """Feed one token per row (``tokens`` [B]) at position ``cache.length + rope_deltas``."""
        ids = tokens.reshape(-1, 1)  # [B, 1]
        embeds = self.model.embed_tokens(ids)
        pos = (rope_deltas + cache.length).unsqueeze(0).expand(3, -1, -1)  # [3, B, 1]
        logits, hidden = self(embeds, pos, cache, None, True)
        return ThinkerStep(logits[:, -1], hidden, embeds, pos, rope_deltas)
