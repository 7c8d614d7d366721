"""``router/convert.py: validate`` refuses a prompt that cannot fit before tokenizing it
(``Tokenizer.max_token_bytes``), with the default model's real tokenizer."""

from __future__ import annotations

import pytest

from scission.engine.request import InvalidRequestError
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.router.convert import validate

CONTEXT = 8192
# ASCII prose, code, CJK, emoji, runs of spaces and newlines, digits: a text of B bytes has at
# least ceil(B / max_token_bytes) tokens whatever it holds
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 50,
         "def f(x):\n    return [i ** 2 for i in range(x)]\n" * 40,
         "東京は日本の首都です。" * 60, "🙂🚀🌍" * 100, " " * 5000, "\n" * 3000,
         "-" * 4000, "0123456789" * 300]


class SpyTokenizer:
    """The real tokenizer, counting encode calls."""

    def __init__(self, tokenizer) -> None:
        self._t, self.num_encodes = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._t, name)

    def encode(self, text: str) -> list[int]:
        self.num_encodes += 1
        return self._t.encode(text)

    def apply_chat_template(self, messages):
        self.num_encodes += 1
        return self._t.apply_chat_template(messages)


def check(req: pb.GenerateRequest, tokenizer):
    return validate(req, tokenizer, CONTEXT, default_max_tokens=16, max_tokens_limit=4096,
                    max_prompt_tokens=None)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_max_token_bytes_bounds_every_text(tokenizer, text):
    per_token = tokenizer.max_token_bytes
    assert per_token is not None and per_token >= 1
    assert len(tokenizer.encode(text)) * per_token >= len(text.encode("utf-8"))


def test_multi_megabyte_prompt_refused_without_tokenizing(tokenizer):
    """4 MB of text (at least 4e6 / max_token_bytes tokens > 8192): OUT_OF_RANGE on "input",
    and the tokenizer never ran; the same for chat content."""
    spy = SpyTokenizer(tokenizer)
    big = "word " * 800_000
    at_least = -(-len(big) // tokenizer.max_token_bytes)
    with pytest.raises(InvalidRequestError) as err:
        check(pb.GenerateRequest(prompt=big), spy)
    assert err.value.field == "input" and err.value.out_of_range
    assert f"at least {at_least} tokens" in str(err.value)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=big)])
    with pytest.raises(InvalidRequestError):
        check(pb.GenerateRequest(chat=chat), spy)
    assert spy.num_encodes == 0


def test_prompt_within_the_byte_bound_is_tokenized_and_checked_exactly(tokenizer):
    """20,000 words (100 KB: under the byte bound, over 8,192 tokens) are tokenized and
    refused with the exact count; a short prompt passes."""
    spy = SpyTokenizer(tokenizer)
    text = "word " * 20_000
    with pytest.raises(InvalidRequestError) as err:
        check(pb.GenerateRequest(prompt=text), spy)
    assert f"prompt has {len(tokenizer.encode(text))} tokens, limit {CONTEXT}" in str(err.value)
    assert spy.num_encodes == 1
    ok = check(pb.GenerateRequest(prompt="hello"), spy)
    assert ok.prompt_token_ids == tokenizer.encode("hello")
