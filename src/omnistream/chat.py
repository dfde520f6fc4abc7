"""The one chat renderer: the message schema, the system prompts and ChatML.

Messages follow the OpenAI-like schema qwen-omni-utils uses::

    [{"role": "system" | "user" | "assistant", "content": "text" | [
        {"type": "text", "text": "..."},
        {"type": "audio", "audio": <path | URL | data URL | array | (array, rate)>, ...},
        {"type": "image", "image": <path | URL | data URL | PIL image>, ...},
        {"type": "video", "video": <path | URL | list of frames>, ...},
    ]}, ...]

A bare string stands for one user turn. Rendering is the checkpoint's chat template
(``CHAT_TEMPLATE``, written into the checkpoints ``make-tiny`` builds): a conversation whose first
message is not a system turn gets a system block with the default prompt (the speech prompt when
speech is generated: the only one the release's speech output was trained with); every turn is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; media render as one placeholder each
(``AUDIO_PLACEHOLDER`` ...), which the processor then expands to the item's token count.

A conversation held in a KV cache continues without re-rendering: the next turn closes the
previous reply (``continued=True``: ``<|im_end|>\\n`` first, no system block), and a live turn is
its ``turn_prefix`` + media + ``turn_suffix``. Everything here is text; tokenizing it with the
special tokens recognised gives the ids the template's rendering gives.
"""

from __future__ import annotations

from collections.abc import Iterator

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# the release's system prompt for speech output (facts: the Talker was trained only with it)
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)

ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("audio", "image", "video")

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TURN_END = IM_END + "\n"  # closes every turn
GENERATION_PROMPT = IM_START + "assistant\n"  # opens the reply the model writes

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
IMAGE_PLACEHOLDER = "<|vision_bos|><|IMAGE|><|vision_eos|>"
VIDEO_PLACEHOLDER = "<|vision_bos|><|VIDEO|><|vision_eos|>"
PLACEHOLDERS = {"audio": AUDIO_PLACEHOLDER, "image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}
_ID_LABELS = {"audio": "Audio", "image": "Picture", "video": "Video"}

# The same rendering as a Jinja template (the checkpoint's ``chat_template``; transformers'
# ``apply_chat_template`` runs it). ``render_chat`` is tested equal to it.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{TURN_END}"
    "{% endif %}"
    f"{IM_START}{{{{ message['role'] }}}}\n"
    "{% if message['content'] is string %}"
    f"{{{{ message['content'] }}}}{TURN_END}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    f"{IMAGE_PLACEHOLDER}"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    f"{AUDIO_PLACEHOLDER}"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    f"{VIDEO_PLACEHOLDER}"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    f"{TURN_END}"
    "{% endif %}"
    "{% endfor %}"
    f"{{% if add_generation_prompt %}}{GENERATION_PROMPT}{{% endif %}}"
)


# ---------------------------------------------------------------------------------------------
# Schema


def system_prompt_for(speech_output: bool, system: str | None = None) -> str:
    """The system prompt of a conversation without a system turn: ``system`` when given, else
    the speech prompt when speech is generated, else the default one."""
    if system is not None:
        return system
    return SPEECH_SYSTEM_PROMPT if speech_output else DEFAULT_SYSTEM_PROMPT


def part_kind(part: dict) -> str | None:
    """The template's classification of a content part: image, audio, video, text or None."""
    t = part.get("type")
    if t == "image" or "image" in part or "image_url" in part:
        return "image"
    if t == "audio" or "audio" in part or "audio_url" in part:
        return "audio"
    if t == "video" or "video" in part:
        return "video"
    if "text" in part:
        return "text"
    return None


def normalize(messages: list[dict] | str) -> list[dict]:
    """Check the schema and return the messages as a new list (a string: one user turn).

    Raises ValueError naming the first bad message: a role outside ``ROLES``, content that is
    neither a string nor a list of dicts."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = list(messages)
    for i, m in enumerate(out):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        c = m.get("content")
        if isinstance(c, str):
            continue
        if not isinstance(c, list) or not all(isinstance(p, dict) for p in c):
            raise ValueError(f"messages[{i}]: content must be a string or a list of parts")
    return out


def content_parts(message: dict) -> list[dict]:
    """A message's content as parts (a string becomes one text part)."""
    c = message["content"]
    return [{"type": "text", "text": c}] if isinstance(c, str) else list(c)


def text_of(message: dict) -> str:
    """The text parts of a message, joined."""
    return "".join(str(p["text"]) for p in content_parts(message) if part_kind(p) == "text")


def media_parts(messages: list[dict]) -> list[dict]:
    """The media content parts of ``messages`` in prompt order."""
    return [p for m in messages for p in content_parts(m) if part_kind(p) in MEDIA_KINDS]


# ---------------------------------------------------------------------------------------------
# ChatML


def system_block(system_prompt: str) -> str:
    """The system turn the template inserts before a conversation without one."""
    return f"{IM_START}system\n{system_prompt}{TURN_END}"


def turn_start(role: str) -> str:
    """``<|im_start|>{role}\\n``."""
    return f"{IM_START}{role}\n"


def render_content(message: dict, counts: dict[str, int] | None = None,
                   add_audio_id: bool = False, add_vision_id: bool = False) -> str:
    """A message's content as the template writes it (media as placeholders). ``counts``
    numbers media across the conversation for ``add_audio_id`` / ``add_vision_id``."""
    if isinstance(message["content"], str):
        return message["content"]
    counts = {k: 0 for k in MEDIA_KINDS} if counts is None else counts
    out: list[str] = []
    for part in message["content"]:
        kind = part_kind(part)
        if kind in PLACEHOLDERS:
            counts[kind] += 1
            label = add_audio_id if kind == "audio" else add_vision_id
            out.append((f"{_ID_LABELS[kind]} {counts[kind]}: " if label else "")
                       + PLACEHOLDERS[kind])
        elif kind == "text":
            out.append(str(part["text"]))
    return "".join(out)


def render_turns(messages: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 continued: bool = False, add_audio_id: bool = False,
                 add_vision_id: bool = False) -> Iterator[tuple[str, str, str]]:
    """``(head, content, tail)`` text of each turn, in order; concatenated they are
    ``render_chat`` without the generation prompt. The first head carries the system block the
    template inserts (or, ``continued``, the close of the previous reply)."""
    counts = {k: 0 for k in MEDIA_KINDS}
    for i, m in enumerate(messages):
        head = turn_start(m["role"])
        if i == 0:
            head = turn_prefix(m["role"], system_prompt=system_prompt, continued=continued)
        yield head, render_content(m, counts, add_audio_id, add_vision_id), TURN_END


def render_chat(
    messages: list[dict],
    add_generation_prompt: bool = True,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    add_audio_id: bool = False,
    add_vision_id: bool = False,
    continued: bool = False,
) -> str:
    """ChatML text exactly as the checkpoint's chat template renders ``messages``
    (``system_prompt`` is the one inserted when the first message is not a system turn).

    ``continued``: ``messages`` are the next turns of a conversation that ends with a generated
    reply (its text, not its close): the text starts with that reply's ``<|im_end|>\\n``, and a
    system turn is refused (ValueError)."""
    if continued and any(m["role"] == "system" for m in messages):
        raise ValueError("a system turn can only start a conversation")
    out = ["".join(t) for t in render_turns(messages, system_prompt, continued, add_audio_id,
                                             add_vision_id)]
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def turn_prefix(role: str = "user", *, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                continued: bool = False) -> str:
    """The text before a turn's content: the close of the previous reply (``continued``) or the
    system block (a conversation's first turn, unless it is the system turn itself), then
    ``<|im_start|>{role}\\n``."""
    if continued:
        head = TURN_END
    else:
        head = "" if role == "system" else system_block(system_prompt)
    return head + turn_start(role)


def turn_suffix(text: str | None = None, add_generation_prompt: bool = True) -> str:
    """The text after a turn's media: optional ``text``, the turn's close, then the reply's
    opening (``add_generation_prompt``)."""
    return (text or "") + TURN_END + (GENERATION_PROMPT if add_generation_prompt else "")
