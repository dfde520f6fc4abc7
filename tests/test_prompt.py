"""Prompt rendering and full processor parity against Qwen2_5OmniProcessor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media_helpers import processor_dir, reference_processor, tone, write_video
from PIL import Image

from omnistream.chat import (
    AUDIO_PLACEHOLDER,
    DEFAULT_SYSTEM_PROMPT,
    SPEECH_SYSTEM_PROMPT,
    normalize,
    render_chat,
    system_prompt_for,
    turn_prefix,
    turn_suffix,
)
from omnistream.media.video import decode_video, load_video_audio, process_video, resize_frames
from omnistream.prompt import Processor, interleave_chunks


@pytest.fixture(scope="module")
def pdir(tmp_path_factory):
    return processor_dir(tmp_path_factory.mktemp("proc"))


@pytest.fixture(scope="module")
def ref(pdir):
    return reference_processor(pdir)


@pytest.fixture(scope="module")
def ours(pdir):
    return Processor.from_dir(pdir)


def _img(w, h, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": "a.wav"},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A tone."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "x.png"},
                {"type": "video", "video": "v.mp4"},
                {"type": "text", "text": "and these?"},
            ],
        },
    ],
    [{"role": "user", "content": [{"image_url": "u"}, {"audio_url": "a"}, {"text": "t"}]}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_chat_template(ref, conv, gen):
    want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert render_chat(conv, add_generation_prompt=gen) == want


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_render_equals_chat_template_with_ids(ref, conv):
    want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                   add_audio_id=True, add_vision_id=True)
    assert render_chat(conv, add_audio_id=True, add_vision_id=True) == want


def test_continued_and_live_renderings_equal_the_whole_conversation():
    first = [{"role": "user", "content": "Hi"}]
    second = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"},
                                           {"type": "text", "text": "And this?"}]}]
    whole = render_chat([*first, {"role": "assistant", "content": "Hello."}, *second],
                        system_prompt=SPEECH_SYSTEM_PROMPT)
    # a cached conversation: the first prompt, the generated reply, then the continuation
    got = (render_chat(first, system_prompt=SPEECH_SYSTEM_PROMPT) + "Hello."
           + render_chat(second, continued=True))
    assert got == whole
    # a live turn: prefix + media + suffix
    live = (turn_prefix("user", continued=True) + AUDIO_PLACEHOLDER + turn_suffix("And this?"))
    assert render_chat(first, system_prompt=SPEECH_SYSTEM_PROMPT) + "Hello." + live == whole
    assert turn_prefix("user", system_prompt="S") + "x" + turn_suffix() == render_chat(
        [{"role": "user", "content": "x"}], system_prompt="S")
    with pytest.raises(ValueError, match="system turn"):
        render_chat([{"role": "system", "content": "x"}], continued=True)


def test_schema_is_checked():
    assert normalize("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"messages\[1\]: role"):
        normalize([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match="content must be"):
        normalize([{"role": "user", "content": 3}])
    assert system_prompt_for(True) == SPEECH_SYSTEM_PROMPT
    assert system_prompt_for(False) == DEFAULT_SYSTEM_PROMPT == "You are a helpful assistant."
    assert system_prompt_for(True, "Mine.") == "Mine."


def test_speech_system_prompt(ours):
    msgs = [{"role": "user", "content": "hi"}]
    out = ours(msgs, speech_output=True)
    assert out.text.startswith(f"<|im_start|>system\n{SPEECH_SYSTEM_PROMPT}<|im_end|>\n")
    assert ours(msgs).text.startswith("<|im_start|>system\nYou are a helpful assistant.")


def _compare(ours_out, ref_out):
    assert ours_out.input_ids.tolist() == ref_out["input_ids"][0].tolist()
    if ours_out.input_features is not None:
        f = ours_out.input_features.shape[-1]
        rf = ref_out["input_features"]
        assert torch.equal(
            ours_out.feature_attention_mask, ref_out["feature_attention_mask"][:, :f].long()
        )
        assert int(ref_out["feature_attention_mask"][:, f:].sum()) == 0
        assert (ours_out.input_features - rf[:, :, :f]).abs().max() < 1e-4
    for a, b in (
        ("pixel_values", "pixel_values"),
        ("image_grid_thw", "image_grid_thw"),
        ("pixel_values_videos", "pixel_values_videos"),
        ("video_grid_thw", "video_grid_thw"),
    ):
        x = getattr(ours_out, a)
        if x is not None:
            assert x.shape == ref_out[b].shape
            assert (x.float() - ref_out[b].float()).abs().max() < 1e-5, a


def test_audio_image_text_parity(ours, ref):
    a1, a2 = tone(3.3, 16000, seed=1)[0], tone(1.05, 16000, seed=2)[0]
    img1, img2 = _img(120, 80), _img(333, 517, 1)
    msgs = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": a1},
                {"type": "image", "image": img1},
                {"type": "text", "text": "Describe both. 你好"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Okay."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": img2}, {"type": "audio", "audio": a2}],
        },
    ]
    out = ours(msgs)
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.text == text
    r = ref(text=text, audio=[a1, a2], images=[img1, img2], return_tensors="pt")
    _compare(out, r)
    # item spans: bos at start, eos at end - 1, media tokens between
    ids = out.input_ids
    for it in out.items:
        bos, eos = int(ids[it.start]), int(ids[it.end - 1])
        assert (bos, eos) == ((151647, 151648) if it.kind == "audio" else (151652, 151653))
        assert it.end - it.start - 2 == it.n_tokens
    # reference-shaped features on request
    full = ours(msgs, pad_features_to=30000)
    assert (full.input_features - r["input_features"]).abs().max() < 1e-4


def _ref_video_frames(path, **kw):
    """Our decoded and resized frames (the reference processor's input, as qwen-omni-utils
    would hand them over: float, already resized)."""
    v = process_video(path, **kw)
    dec = decode_video(path, fps=kw.get("fps"))
    return resize_frames(dec.frames, *v.frame_size).float(), v


@pytest.mark.parametrize("audio_in_video", [False, True])
def test_video_parity(ours, ref, tmp_path, audio_in_video):
    a = tone(6.0, 16000)
    path = str(write_video(tmp_path / "v.mp4", 60, fps=10, size=(64, 96), audio=(a, 16000)))
    extra = tone(1.3, 16000, seed=3)[0]
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": extra},
                {"type": "video", "video": path},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    out = ours(msgs, use_audio_in_video=audio_in_video)
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    frames, v = _ref_video_frames(path)
    kw = dict(text=text, videos=[frames], return_tensors="pt")
    if audio_in_video:
        track = load_video_audio(path)
        r = ref(
            audio=[extra, track], audio_from_video_indices=[None, 0], use_audio_in_video=True, **kw
        )
    else:
        r = ref(audio=[extra], **kw)
    _compare(out, r)
    assert out.video_second_per_grid.tolist() == [float(x) for x in r["video_second_per_grid"]]
    it = out.items[1]
    if audio_in_video:
        assert it.audio_index == 1 and len(it.chunks) == 3  # 6 s in 2 s chunks
        assert out.input_ids[it.start + 1] == 151647  # audio bos after vision bos
        assert out.input_ids[it.end - 2] == 151648


@pytest.mark.parametrize(
    "grid,spg,n_audio",
    [((4, 2, 4), 3.0, 10), ((6, 4, 4), 1.0, 140), ((5, 2, 2), 0.7, 3), ((2, 2, 2), 2.0, 0)],
)
def test_interleave_chunks_equal_reference(grid, spg, n_audio):
    from transformers import Qwen2_5OmniProcessor

    t, h, w = grid
    vals = np.repeat(np.arange(t), (h // 2) * (w // 2)) * spg * 25
    ref_v = Qwen2_5OmniProcessor.get_chunked_index(None, vals, 50)
    ref_a = Qwen2_5OmniProcessor.get_chunked_index(None, np.arange(n_audio), 50)
    n = max(len(ref_v), len(ref_a))
    want = [
        (
            (ref_v[j][1] - ref_v[j][0]) if j < len(ref_v) else 0,
            (ref_a[j][1] - ref_a[j][0]) if j < len(ref_a) else 0,
        )
        for j in range(n)
    ]
    assert interleave_chunks(grid, spg, n_audio) == want
