"""Chat messages -> thinker inputs: ChatML text, token ids with expanded media placeholders, and
the audio / image / video tensors, equal to ``Qwen2_5OmniProcessor`` on the checkpoint's chat
template.

Messages, system prompts and the ChatML rendering are ``omnistream.chat``'s (the one renderer);
this module turns the rendered text into ids. Each media placeholder expands to the item's token
count: audio ``((L-1)//2+1-2)//2+1`` for L valid mel frames, image/video ``t*h*w/4``. With
``use_audio_in_video`` a video's placeholder becomes ``<|audio_bos|> V0 A0 V1 A1 ... <|audio_eos|>``
(inside the vision bos/eos): video tokens split into 2-second chunks by their time id
``k * second_per_grid * 25`` (a chunk label advances by at most one per token, as in the
reference), audio tokens in chunks of 50.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omnistream.chat import (
    SPEECH_SYSTEM_PROMPT,
    media_parts,
    normalize,
    part_kind,
    render_chat,
    system_prompt_for,
    text_of,
)
from omnistream.media.audio import (
    DEFAULT_MAX_SECONDS,
    audio_token_count,
    load_audio,
    log_mel_spectrogram,
    n_valid_frames,
)
from omnistream.media.errors import MediaError
from omnistream.media.image import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, process_image
from omnistream.media.video import (
    DEFAULT_MAX_VIDEO_SECONDS,
    FPS,
    FPS_MIN_FRAMES,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    load_video_audio,
    process_video,
)
from omnistream.tokenizer import SpecialIds


@dataclass(frozen=True)
class ProcessorOptions:
    """Per-call defaults; a content part's own keys (``min_pixels``, ``fps``, ...) override them."""

    image_min_pixels: int = MIN_PIXELS
    image_max_pixels: int = MAX_PIXELS
    video_fps: float = FPS  # frames sampled per second
    video_min_frames: int = FPS_MIN_FRAMES
    video_max_frames: int | None = None  # None: min(768, frames in the video)
    video_min_pixels: int = VIDEO_MIN_PIXELS  # per frame
    video_max_pixels: int | None = None  # per frame; None: the 768*28*28 / total budget
    video_total_pixels: float = VIDEO_TOTAL_PIXELS
    max_audio_seconds: float | None = DEFAULT_MAX_SECONDS
    max_video_seconds: float | None = DEFAULT_MAX_VIDEO_SECONDS
    seconds_per_chunk: float = 2.0  # audio-in-video interleave chunk
    position_id_per_seconds: int = 25


def processor_options(path: str | Path, **options) -> ProcessorOptions:
    """A checkpoint directory's processor options (``preprocessor_config.json``: image pixel
    bounds ``min_pixels`` / ``max_pixels``, and omnistream's optional per-frame video bounds
    ``video_min_pixels`` / ``video_max_pixels`` / ``video_total_pixels``, which the release
    leaves to its defaults), with ``options`` (ProcessorOptions fields) over them."""
    kw: dict[str, Any] = {}
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        keys = {"min_pixels": "image_min_pixels", "max_pixels": "image_max_pixels",
                "video_min_pixels": "video_min_pixels", "video_max_pixels": "video_max_pixels",
                "video_total_pixels": "video_total_pixels"}
        for key, field_name in keys.items():
            if cfg.get(key) is not None:
                kw[field_name] = int(cfg[key])
    kw.update(options)
    return ProcessorOptions(**kw)


def load_part(part: dict, kind: str, opts: ProcessorOptions, src: Any = None,
              normalized: bool = True) -> Any:
    """One content part's media, decoded as the processor decodes it: ``opts`` give the defaults
    and the part's own keys (``min_pixels``, ``fps``, ``audio_start`` ...) override them. ``kind``
    audio -> 16 kHz float32 clip; image / video -> ``VisualInput``; "video_audio" -> the video's
    audio track as a 16 kHz clip (``use_audio_in_video``). ``src``: the part's source if already
    resolved. ``normalized=False``: images and videos as uint8 patches (``process_image``)."""
    if src is None:
        src = _source_of(part, "video" if kind == "video_audio" else kind)
    if kind == "audio":
        return load_audio(src, sampling_rate=part.get("sampling_rate"),
                          start=part.get("audio_start"), end=part.get("audio_end"),
                          max_seconds=opts.max_audio_seconds)
    if kind == "image":
        return process_image(src, part.get("min_pixels", opts.image_min_pixels),
                             part.get("max_pixels", opts.image_max_pixels),
                             part.get("resized_height"), part.get("resized_width"), normalized)
    if kind == "video_audio":
        return load_video_audio(src, part.get("video_start"), part.get("video_end"),
                                opts.max_audio_seconds)
    return process_video(
        src,
        fps=part.get("fps", None if "nframes" in part else opts.video_fps),
        nframes=part.get("nframes"),
        min_frames=part.get("min_frames", opts.video_min_frames),
        max_frames=part.get("max_frames", opts.video_max_frames),
        min_pixels=part.get("min_pixels", opts.video_min_pixels),
        max_pixels=part.get("max_pixels", opts.video_max_pixels),
        total_pixels=part.get("total_pixels", opts.video_total_pixels),
        resized_height=part.get("resized_height"),
        resized_width=part.get("resized_width"),
        start=part.get("video_start"),
        end=part.get("video_end"),
        sample_fps=part.get("sample_fps"),
        normalized=normalized,
        max_seconds=opts.max_video_seconds,
    )


@dataclass
class MediaItem:
    """Where one media item sits in ``input_ids`` and which tensor rows hold it."""

    kind: str  # "audio" | "image" | "video"
    index: int  # row in input_features (audio) or in image_grid_thw / video_grid_thw
    start: int  # offset of the item's first token (its bos) in input_ids
    end: int  # offset after its last token (eos)
    n_tokens: int  # media tokens (a video with audio: its video tokens)
    source: str = ""  # short description of the source, for messages
    grid_thw: tuple[int, int, int] | None = None  # image / video patch grid
    second_per_grid: float | None = None  # video
    audio_index: int | None = None  # a video's audio track: row in input_features
    n_audio_tokens: int = 0  # a video's audio tokens
    chunks: list[tuple[int, int]] | None = None  # audio in video: (video, audio) tokens per chunk


@dataclass
class PromptInputs:
    """Everything the thinker needs for one prompt (tensors on CPU)."""

    input_ids: Tensor  # [T] int64
    text: str  # the rendered ChatML (placeholders not expanded)
    items: list[MediaItem] = field(default_factory=list)  # in prompt order
    input_features: Tensor | None = None  # [N_audio, 128, F] float32 (F: longest valid)
    feature_attention_mask: Tensor | None = None  # [N_audio, F] int64
    pixel_values: Tensor | None = None  # [P, 1176] float32
    image_grid_thw: Tensor | None = None  # [N_image, 3] int64
    pixel_values_videos: Tensor | None = None  # [P', 1176] float32
    video_grid_thw: Tensor | None = None  # [N_video, 3] int64
    video_second_per_grid: Tensor | None = None  # [N_video] float32
    use_audio_in_video: bool = False

    @property
    def audio_feature_lengths(self) -> Tensor | None:
        """Valid mel frames per audio row, ``[N_audio]``."""
        m = self.feature_attention_mask
        return None if m is None else m.sum(-1)


# ---------------------------------------------------------------------------------------------
# Placeholder layout


def _chunk_sizes(values: np.ndarray, per_chunk: int) -> list[int]:
    """Tokens per chunk for non-decreasing time ids ``values`` (the reference's rule: a new chunk
    starts at the first token whose id reaches the next multiple of ``per_chunk``, at most one
    new chunk per token)."""
    if values.size == 0:
        return [0]
    k = np.floor(values / per_chunk)
    k = np.where((k + 1) * per_chunk <= values, k + 1, k)  # exact: k = #multiples <= value
    k = np.where(k * per_chunk > values, k - 1, k).astype(np.int64)
    i = np.arange(values.size)
    labels = np.minimum.accumulate(k - i) + i
    return np.bincount(labels).tolist()


def interleave_chunks(
    grid_thw: tuple[int, int, int],
    second_per_grid: float,
    n_audio: int,
    seconds_per_chunk: float = 2.0,
    position_id_per_seconds: int = 25,
) -> list[tuple[int, int]]:
    """``(video tokens, audio tokens)`` of each chunk of a video with its audio track."""
    t, h, w = grid_thw
    per_frame = (h // MERGE_SIZE) * (w // MERGE_SIZE)
    frame_ids = np.arange(t, dtype=np.float64) * second_per_grid * position_id_per_seconds
    c = int(position_id_per_seconds * seconds_per_chunk)
    video = _chunk_sizes(np.repeat(frame_ids, per_frame), c)
    audio = _chunk_sizes(np.arange(n_audio, dtype=np.float64), c)
    n = max(len(video), len(audio))
    video += [0] * (n - len(video))
    audio += [0] * (n - len(audio))
    return list(zip(video, audio, strict=True))


# ---------------------------------------------------------------------------------------------
# The processor


def _encode(tokenizer, text: str) -> list[int]:
    out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


def _source_of(part: dict, kind: str) -> Any:
    if kind == "image":
        src = part.get("image", part.get("image_url"))
    elif kind == "audio":
        src = part.get("audio", part.get("audio_url"))
    else:
        src = part.get("video", part.get("video_url"))
    if isinstance(src, dict) and "url" in src:
        src = src["url"]
    if src is None:
        raise MediaError(part, f"{kind} part without a source")
    return src


class Processor:
    """Messages -> ``PromptInputs`` with a tokenizer and processing options."""

    def __init__(self, tokenizer, options: ProcessorOptions | None = None):
        self.tokenizer = tokenizer
        self.options = options or ProcessorOptions()
        sp = SpecialIds()
        tid = getattr(tokenizer, "token_to_id", lambda s: None)
        self.ids = {
            name: tid(tok) if tid(tok) is not None else default
            for name, tok, default in (
                ("audio", "<|AUDIO|>", sp.audio),
                ("image", "<|IMAGE|>", sp.image),
                ("video", "<|VIDEO|>", sp.video),
                ("audio_bos", "<|audio_bos|>", sp.audio_bos),
                ("audio_eos", "<|audio_eos|>", sp.audio_eos),
            )
        }

    @classmethod
    def from_dir(cls, path: str | Path, **options) -> Processor:
        """Tokenizer and ``preprocessor_config.json`` (pixel bounds) of a checkpoint directory."""
        from omnistream.tokenizer import Tokenizer

        return cls(Tokenizer.from_dir(path), processor_options(path, **options))

    def __call__(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        use_audio_in_video: bool = False,
        speech_output: bool = False,
        system_prompt: str | None = None,
        continued: bool = False,
        pad_features_to: int | None = None,
        **options,
    ) -> PromptInputs:
        """Process a conversation.

        Args:
            messages: the conversation (see the module docstring).
            use_audio_in_video: also take each video's audio track, interleaved in 2 s chunks.
            speech_output: speech will be generated: a missing system turn gets the speech
                system prompt (the only one speech output was trained with).
            system_prompt: the prompt for a missing system turn (overrides the defaults).
            continued: ``messages`` continue a conversation that ends with a generated reply
                (``chat.render_chat``): no system block, the reply's close first.
            pad_features_to: pad ``input_features`` to this many frames (30000 = the reference
                processor's shape); default: the longest clip's valid frames.
            options: ``ProcessorOptions`` fields for this call.
        """
        opts = replace(self.options, **options) if options else self.options
        messages = normalize(messages)
        system_prompt = system_prompt_for(speech_output, system_prompt)
        if speech_output and messages and messages[0]["role"] == "system":
            if text_of(messages[0]) != SPEECH_SYSTEM_PROMPT:
                warnings.warn(
                    "speech output was trained only with the speech system prompt; this "
                    "conversation has another system turn",
                    stacklevel=2,
                )
        text = render_chat(messages, add_generation_prompt, system_prompt, continued=continued)
        parts = media_parts(messages)

        audios: list[np.ndarray] = []  # 16 kHz clips in input_features order
        images, videos = [], []
        items: list[MediaItem] = []
        for part in parts:
            kind = part_kind(part)
            src = _source_of(part, kind)
            desc = MediaError(src, "").source
            if kind == "audio":
                x = load_part(part, kind, opts, src)
                n = audio_token_count(n_valid_frames(x.size))
                items.append(MediaItem("audio", len(audios), 0, 0, n, desc))
                audios.append(x)
            elif kind == "image":
                v = load_part(part, kind, opts, src)
                items.append(MediaItem("image", len(images), 0, 0, v.n_tokens, desc, v.grid_thw))
                images.append(v)
            else:
                v = load_part(part, kind, opts, src)
                item = MediaItem(
                    "video", len(videos), 0, 0, v.n_tokens, desc, v.grid_thw, v.second_per_grid
                )
                if use_audio_in_video:
                    x = load_part(part, "video_audio", opts, src)
                    item.audio_index = len(audios)
                    item.n_audio_tokens = audio_token_count(n_valid_frames(x.size))
                    item.chunks = interleave_chunks(
                        v.grid_thw,
                        v.second_per_grid,
                        item.n_audio_tokens,
                        opts.seconds_per_chunk,
                        opts.position_id_per_seconds,
                    )
                    audios.append(x)
                items.append(item)
                videos.append(v)

        input_ids = self._expand(_encode(self.tokenizer, text), items)
        out = PromptInputs(input_ids, text, items, use_audio_in_video=use_audio_in_video)
        if audios:
            valid = [n_valid_frames(x.size) for x in audios]
            width = max(valid) if pad_features_to is None else pad_features_to
            feats = [log_mel_spectrogram(x, pad_to=width)[0] for x in audios]
            out.input_features = torch.stack(feats)
            out.feature_attention_mask = (
                torch.arange(width)[None] < torch.tensor(valid)[:, None]
            ).long()
        if images:
            out.pixel_values = torch.cat([v.pixel_values for v in images])
            out.image_grid_thw = torch.tensor([v.grid_thw for v in images], dtype=torch.long)
        if videos:
            out.pixel_values_videos = torch.cat([v.pixel_values for v in videos])
            out.video_grid_thw = torch.tensor([v.grid_thw for v in videos], dtype=torch.long)
            out.video_second_per_grid = torch.tensor(
                [v.second_per_grid for v in videos], dtype=torch.float32
            )
        return out

    def _expand(self, ids: list[int], items: list[MediaItem]) -> Tensor:
        """Replace each placeholder id by its item's tokens; fill the items' spans."""
        ph = {self.ids["audio"]: "audio", self.ids["image"]: "image", self.ids["video"]: "video"}
        found = [ph[i] for i in ids if i in ph]
        if found != [it.kind for it in items]:
            raise ValueError(
                f"the prompt text has media placeholders {found} but the messages hold "
                f"{[it.kind for it in items]} (is a placeholder string such as <|AUDIO|> "
                "written in a text part?)"
            )
        out: list[int] = []
        k = 0
        for i in ids:
            if i not in ph:
                out.append(i)
                continue
            it = items[k]
            k += 1
            it.start = len(out) - 1  # the bos before the placeholder
            tok = self.ids[it.kind]
            if it.chunks is None:
                out.extend([tok] * it.n_tokens)
            else:
                out.append(self.ids["audio_bos"])
                for nv, na in it.chunks:
                    out.extend([tok] * nv)
                    out.extend([self.ids["audio"]] * na)
                out.append(self.ids["audio_eos"])
            it.end = len(out) + 1  # after the eos that follows
        return torch.tensor(out, dtype=torch.long)


def process_messages(messages: list[dict], tokenizer, **kwargs) -> PromptInputs:
    """``Processor(tokenizer)(messages, **kwargs)``; ``tokenizer`` may be a checkpoint directory."""
    if isinstance(tokenizer, (str, Path)):
        return Processor.from_dir(tokenizer)(messages, **kwargs)
    opt_names = {f.name for f in fields(ProcessorOptions)}
    opts = ProcessorOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in opt_names})
    return Processor(tokenizer, opts)(messages, **kwargs)
