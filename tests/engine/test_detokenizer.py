"""Tests for scission.engine.detokenizer on the real default tokenizer (byte-level BPE)."""

from __future__ import annotations

import random

import pytest

from scission.engine.detokenizer import IncrementalDetokenizer
from scission.engine.tokenizer import Tokenizer, default_model_path, load_tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "你好，世界！こんにちは、元気ですか？ 한국어 텍스트",
    "emoji 🌍🚀👍🏽👨‍👩‍👧‍👦 and naïve café — “quotes” ✓ ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Ελληνικά, русский язык, العربية, עברית, हिन्दी, ไทย",
    "  leading spaces\n\ttabs and\r\nnewlines  ```python\nprint('x')\n```",
    "🎉" * 7 + "中" * 5 + "é" * 3,
]
CHUNKINGS = [1, 2, 3, 7]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}])


def run(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1
) -> tuple[list[str], str | None, str]:
    """Push ``ids`` in chunks until a stop string matches: ``(deltas, stopped_on, finish())``."""
    deltas = []
    for start in range(0, len(ids), chunk):
        out = detok.push(ids[start : start + chunk])
        deltas.append(out.text_delta)
        if out.stopped_on is not None:
            return deltas, out.stopped_on, detok.finish()
    return deltas, None, detok.finish()


def test_texts_split_characters_across_tokens(tokenizer: Tokenizer) -> None:
    """The test texts really contain multi-byte characters split across BPE tokens."""
    ids = [i for text in TEXTS for i in tokenizer.encode(text)]
    partial = [i for i in ids if tokenizer.decode([i]).endswith("\ufffd")]
    assert len(partial) > 20


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(
    tokenizer: Tokenizer, prompt: list[int], text: str, chunk: int
) -> None:
    """Deltas + finish() == decode(output ids); no delta has a partial character."""
    ids = [*tokenizer.encode(text), *tokenizer.eos_token_ids]
    deltas, stopped_on, tail = run(IncrementalDetokenizer(tokenizer, prompt), ids, chunk)
    assert stopped_on is None
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text
    assert tail == ""
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_ids_concatenate_to_decode(
    tokenizer: Tokenizer, prompt: list[int], skip_special_tokens: bool
) -> None:
    """On arbitrary ids (invalid UTF-8, special tokens) the stream still equals decode(),
    less a trailing incomplete character."""
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        ids += [rng.choice([0, 1, 2, 7906, 240]) for _ in range(rng.randrange(0, 3))]
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
        deltas, _, tail = run(detok, ids, rng.choice(CHUNKINGS))
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) + tail == expected.rstrip("\ufffd")  # no broken last char


def test_partial_character_is_held_back(tokenizer: Tokenizer) -> None:
    """A character split over tokens is emitted whole by the token that completes it."""
    ids = tokenizer.encode("世界")  # 世 = bytes e4 b8 96 over 3 tokens, then 界
    assert ids == [7906, 240, 178, 239, 230]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.push([i]).text_delta for i in ids] == ["", "世", "", "", "界"]
    assert detok.finish() == ""


@pytest.mark.parametrize("cut", [1, 2])
def test_unfinished_character_is_dropped_at_the_end(tokenizer: Tokenizer, cut: int) -> None:
    """A request that ends mid-character ("Hi 🚀" = 26843, 15107, 244, 218; 🚀 is f0 9f 9a
    80 over the last three, cut after 1 or 2 of them, as max_tokens would) ends its text
    with "Hi " and no U+FFFD (decode() would end in one); "Hi" itself stays."""
    ids = tokenizer.encode("Hi 🚀")
    assert ids == [26843, 15107, 244, 218]
    output = ids[: 1 + cut]
    assert tokenizer.decode(output) == "Hi \ufffd"
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.push([i]).text_delta for i in output]
    assert deltas == ["Hi"] + [""] * cut
    assert detok.finish() == " "


def test_unfinished_character_before_eos_is_dropped(tokenizer: Tokenizer) -> None:
    """EOS right after the first byte of 世 (7906): the text is "Hello", not "Hello\ufffd"."""
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push([19556]).text_delta == "Hello"
    assert detok.push([7906]).text_delta == ""  # first byte of 世
    assert detok.push([*tokenizer.eos_token_ids]).text_delta == ""
    assert detok.finish() == ""


def test_stop_string_spanning_two_tokens(tokenizer: Tokenizer, prompt: list[int]) -> None:
    """'o w' spans 'Hello' + ' world': text stops before it, and 'o' is never emitted."""
    ids = tokenizer.encode("Hello world, this is a test.")
    assert ids[:2] == [19556, 905]
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=("o w",))
    first = detok.push(ids[:1])
    assert (first.text_delta, first.stopped_on) == ("Hell", None)
    second = detok.push(ids[1:2])
    assert (second.text_delta, second.stopped_on) == ("", "o w")
    assert detok.push(ids[2:3]).text_delta == ""
    assert detok.finish() == ""
    assert detok.stopped_on == "o w"


def test_stop_string_at_start(tokenizer: Tokenizer, prompt: list[int]) -> None:
    """A stop string that is the very first text yields no text at all."""
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=("Hello",))
    out = detok.push(tokenizer.encode("Hello world"))
    assert (out.text_delta, out.stopped_on) == ("", "Hello")
    assert detok.finish() == ""


def test_earliest_stop_string_wins(tokenizer: Tokenizer, prompt: list[int]) -> None:
    """With several matches in one push, the text stops before the earliest one."""
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=("test", "is", "this"))
    deltas, stopped_on, tail = run(detok, tokenizer.encode("Hello world, this is a test."), 8)
    assert (deltas, stopped_on, tail) == (["Hello world, "], "this", "")


def test_held_back_text_flushed_by_finish(tokenizer: Tokenizer, prompt: list[int]) -> None:
    """A possible stop-string start is held until finish(), which then emits it."""
    ids = tokenizer.encode("Hello wor")
    assert ids == [19556, 458]
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=("world",))
    assert [detok.push([i]).text_delta for i in ids] == ["Hello", " "]
    assert detok.finish() == "wor"
    assert detok.stopped_on is None


def test_held_back_text_released_when_it_diverges(tokenizer: Tokenizer) -> None:
    """Held text is emitted as soon as it can no longer be a stop-string start."""
    detok = IncrementalDetokenizer(tokenizer, [], stop=("world peace",))
    deltas = [detok.push([i]).text_delta for i in tokenizer.encode("Hello world, hi")]
    assert deltas == ["Hello", " ", "world,", " hi"]  # "world" was held for one step
    assert "".join(deltas) + detok.finish() == "Hello world, hi"


@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_strings_property(tokenizer: Tokenizer, prompt: list[int], chunk: int) -> None:
    """For random stop substrings, the text equals decode(ids) cut before the first match."""
    rng = random.Random(99)
    for text in TEXTS:
        for _ in range(15):
            start = rng.randrange(len(text))
            stop = text[start : start + rng.randrange(1, 6)]
            ids = tokenizer.encode(text)
            detok = IncrementalDetokenizer(tokenizer, prompt, stop=(stop, "\x00never"))
            deltas, stopped_on, tail = run(detok, ids, chunk)
            assert stopped_on == stop
            assert "".join(deltas) + tail == text[: text.find(stop)]


class RecordingTokenizer(Tokenizer):
    """The real tokenizer, recording the length of every id window it decodes."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner.hf, inner.eos_token_ids, inner.context_length)
        self.window_lens: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:  # type: ignore[override]
        self.window_lens.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def test_work_per_token_is_bounded(tokenizer: Tokenizer, prompt: list[int]) -> None:
    """Each push decodes windows of a few tokens, however long the output grows."""
    recording = RecordingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 1000
    deltas, _, tail = run(IncrementalDetokenizer(recording, prompt), ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert max(recording.window_lens) <= 8  # a 4-byte character over 4 tokens + prefix
