"""Chat messages with image parts -> prompt token ids with one image marker id per image.

A multimodal message's ``content`` is a list of parts, HF's chat format::

    {"type": "text", "text": str}      text, never control
    {"type": "image"}                  one image (``"index": k`` allowed: the k-th image part)

The checkpoint's chat template renders each image part as the processor's image marker
(``"<image>"``), an added token, so it becomes exactly one id, which
``MultimodalProcessor.expand_prompt`` later replaces by the image's segment. Text parts stay
text: every added token a user writes inside one (``"<image>"``, ``"<|im_end|>"``) is swapped
for a private escape before rendering and restored as plain text after, so a user can forge
neither an image slot nor a turn. Escapes sit inline, so template filters (``trim``,
``capitalize``) act on the real text as they do in HF::

    parts     [text "hi <image>"] [image] [text "end"]
    template  USER: <image>\\nhi \\x00<nonce>_0\\x00 end ASSISTANT:
    ids       USER: | <image> id | "\\nhi <image> end ASSISTANT:" as plain text
                      ^ the template's marker    ^ the user's "<image>", restored as text

Text between two of the template's added tokens is encoded in one piece, as a whole-string
encode would, so a chat without user-written added tokens gives exactly HF's
``tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True))`` ids.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence

from scission.engine.request import InvalidRequestError

TEXT_PART, IMAGE_PART = "text", "image"


def is_multimodal(messages: Sequence[dict]) -> bool:
    """Whether any message's ``content`` is a list of parts (validated messages)."""
    return any(isinstance(m["content"], list) for m in messages)


def count_image_parts(messages: Sequence[dict]) -> int:
    """Number of ``{"type": "image"}`` parts over all messages (validated messages)."""
    return sum(1 for m in messages if isinstance(m["content"], list)
               for p in m["content"] if p["type"] == IMAGE_PART)


def count_image_markers(token_ids: Sequence[int], image_token_id: int) -> int:
    """Number of ``image_token_id`` ids in ``token_ids`` (one per image before expansion)."""
    return sum(1 for t in token_ids if t == image_token_id)


def validate_parts(i: int, parts: object) -> None:
    """Check message ``i``'s list ``content``.

    Raises:
        InvalidRequestError: (field ``"messages"``) an empty list, a part that is not a dict,
            an unknown part type, a text part without a str ``text``, extra keys, or an image
            ``index`` that is not an int >= 0 (its order: ``check_image_indices``).
    """
    if not isinstance(parts, list) or not parts:
        raise InvalidRequestError("messages", f"[{i}] content must be a string or a non-empty "
                                  "list of parts")
    for j, part in enumerate(parts):
        where = f"[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == TEXT_PART:
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise InvalidRequestError("messages", f"{where} text part must be "
                                          "{'type': 'text', 'text': str}")
        elif kind == IMAGE_PART:
            index = part.get("index", 0)
            if not set(part) <= {"type", "index"} or type(index) is not int or index < 0:
                raise InvalidRequestError("messages", f"{where} image part must be "
                                          "{'type': 'image'} (optional 'index': int >= 0)")
        else:
            raise InvalidRequestError("messages", f"{where} must be a text or image part "
                                      "({'type': 'text' | 'image', ...})")


def check_image_indices(messages: Sequence[dict]) -> None:
    """An image part's optional ``index`` must be its rank among all image parts (the
    marker order): part order is what pairs images with markers.

    Raises:
        InvalidRequestError: an index out of order (field ``"messages"``).
    """
    rank = 0
    for m in messages:
        if not isinstance(m["content"], list):
            continue
        for p in m["content"]:
            if p["type"] == IMAGE_PART:
                if p.get("index", rank) != rank:
                    raise InvalidRequestError("messages", f"image part index {p['index']} is "
                                              f"image {rank} in part order")
                rank += 1


def encode_chat_parts(messages: list[dict], render: Callable[[list[dict]], str],
                      added_tokens: re.Pattern[str], encode_plain: Callable[[str], list[int]],
                      token_id: Callable[[str], int],
                      image_marker: str | None = None) -> list[int]:
    """Prompt ids of validated messages, some with list content (module docstring).

    A ``str`` content becomes one text part (the image-aware templates iterate parts).

    Args:
        render: messages -> the template's text with the generation prompt.
        added_tokens: matches every added token (the strings tokenized as their own ids).
        encode_plain: text -> ids, added tokens in it split as plain text.
        token_id: an added token's string -> its id.
        image_marker: the processor's marker; when given, the ids must hold exactly one
            marker id per image part.
    Raises:
        InvalidRequestError: (field ``"messages"``) bad image indices, a template that
            mangles the escapes, or a marker count that differs from the image parts.
    """
    check_image_indices(messages)
    nonce = f"\x00{uuid.uuid4().int:039d}_"
    escaped: list[str] = []

    def escape(match: re.Match[str]) -> str:
        escaped.append(match.group())
        return f"{nonce}{len(escaped) - 1}\x00"

    def part(p: dict) -> dict:
        if p["type"] == IMAGE_PART:
            return {"type": IMAGE_PART}
        return {"type": TEXT_PART, "text": added_tokens.sub(escape, p["text"])}

    template_messages = [{"role": m["role"], "content": [part(p) for p in _parts(m["content"])]}
                         for m in messages]
    rendered = render(template_messages)
    ids = _tokenize_rendered(rendered, nonce, escaped, added_tokens, encode_plain, token_id)
    if image_marker is not None:
        _check_markers(ids, token_id(image_marker), count_image_parts(messages))
    return ids


def _parts(content: str | list[dict]) -> list[dict]:
    return [{"type": TEXT_PART, "text": content}] if isinstance(content, str) else content


def _tokenize_rendered(rendered: str, nonce: str, escaped: list[str],
                       added_tokens: re.Pattern[str], encode_plain: Callable[[str], list[int]],
                       token_id: Callable[[str], int]) -> list[int]:
    """The template's added tokens -> their ids; escapes -> the user's text; the text
    between two template tokens encoded in one piece."""
    pattern = re.compile(f"(?P<esc>{re.escape(nonce)}(?P<n>[0-9]+)\x00)|{added_tokens.pattern}")
    ids: list[int] = []
    text, pos, num_escapes = "", 0, 0
    for match in pattern.finditer(rendered):
        text += rendered[pos : match.start()]
        pos = match.end()
        if match.group("esc") is not None:
            if int(match.group("n")) >= len(escaped):
                break  # a mangled escape: refused below
            text += escaped[int(match.group("n"))]
            num_escapes += 1
            continue
        ids += encode_plain(text)
        ids.append(token_id(match.group()))
        text = ""
    if rendered.count(nonce) != num_escapes:
        raise InvalidRequestError("messages", "message content holds special tokens, which "
                                  "this model's chat template cannot take as plain text")
    return ids + encode_plain(text + rendered[pos:])


def _check_markers(ids: list[int], marker_id: int, num_images: int) -> None:
    num_markers = count_image_markers(ids, marker_id)
    if num_markers != num_images:
        raise InvalidRequestError("messages", f"the chat template wrote {num_markers} image "
                                  f"markers for {num_images} image parts")
