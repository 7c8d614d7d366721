"""Incremental detokenization with stop-string matching.

Follows vLLM's ``detokenize_incrementally`` (``vllm/transformers_utils/detokenizer_utils.py``):
each step decodes only a short window of token ids, so the cost per token is O(window), not
O(sequence)::

    token ids:  ... | prefix window    | new tokens     |
                    ^prefix_offset     ^read_offset     ^len(ids)
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]

Decoding a window that starts at the prefix (instead of at the new tokens) keeps context-
dependent decoders (SentencePiece's leading space) right. If ``new_text`` ends in ``"\\ufffd"``
the last character is a partial UTF-8 sequence split across byte-level BPE tokens: nothing is
emitted and the offsets stay put until a later token completes it. If none does (the request
ends mid-character: ``max_tokens``, or EOS right after a byte token), ``finish()`` drops it:
a stream never ends in a broken character (vLLM emits nothing for it either; HF's
``decode`` would give U+FFFD); the request's token ids still carry every byte.

Stop strings are matched on the emitted text. Any suffix that could still grow into a stop
string is held back, so a stop string split across tokens is caught and never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from scission.engine.tokenizer import Tokenizer

# Prompt tokens decoded as context before the first output token (vLLM uses 5).
INITIAL_PREFIX_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class DetokenizerOutput(NamedTuple):
    """One ``push``: text safe to emit now, and the stop string that ended the text, if any."""

    text_delta: str
    stopped_on: str | None


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas, one ``push`` per engine step.

    The concatenation of every ``text_delta`` and ``finish()`` equals
    ``tokenizer.decode(output_token_ids, skip_special_tokens=skip_special_tokens)`` without
    a trailing incomplete character (cut just before the first stop string when one matched).

    Args:
        tokenizer: the model's tokenizer.
        prompt_token_ids: the prompt; only its last ``INITIAL_PREFIX_TOKENS`` ids are used, as
            decoding context.
        skip_special_tokens: drop special tokens (EOS, ``<|im_end|>``) from the text.
        stop: stop strings; generation text ends just before the earliest match.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
    ) -> None:
        assert all(stop), "stop strings must be non-empty"
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        context = list(prompt_token_ids[-INITIAL_PREFIX_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # the prompt ends mid-character: it cannot be a clean prefix
        # Only ids from prefix_offset on are kept; older ones are never decoded again.
        self._token_ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pending = ""  # decoded, not yet emitted: a possible stop-string start
        self._stopped_on: str | None = None

    @property
    def stopped_on(self) -> str | None:
        """The stop string that ended the text, or ``None``."""
        return self._stopped_on

    def push(self, token_ids: list[int]) -> DetokenizerOutput:
        """Add newly sampled ids; return the text that became final.

        After a stop string matched, further pushes return an empty delta.
        """
        if self._stopped_on is not None:
            return DetokenizerOutput("", self._stopped_on)
        self._token_ids.extend(token_ids)
        self._pending += self._decode_new(flush=False)
        return DetokenizerOutput(self._release(final=False), self._stopped_on)

    def finish(self) -> str:
        """Flush held-back text at the end of generation (never the stop string).

        A trailing partial UTF-8 sequence (bytes no token completed) is dropped, not emitted
        as ``"\\ufffd"`` the way ``decode`` would.
        """
        if self._stopped_on is not None:
            return ""
        self._pending += self._decode_new(flush=True).rstrip(REPLACEMENT_CHAR)
        return self._release(final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, flush: bool) -> str:
        """Text of the ids past ``read_offset``; ``""`` while it ends mid-character."""
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) and not flush:
            return ""  # e.g. only special tokens so far
        if new_text.endswith(REPLACEMENT_CHAR) and not flush:
            return ""  # hold a partial UTF-8 character until it completes
        # drop ids before the new prefix window: memory and work stay O(window)
        del self._token_ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _release(self, final: bool) -> str:
        """Emit ``pending`` up to the earliest stop string, or up to any possible start of one."""
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        match_at, match = -1, None
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0 and (match is None or i < match_at):
                match_at, match = i, s
        if match is not None:
            out, self._pending = self._pending[:match_at], ""
            self._stopped_on = match
            return out
        keep = 0 if final else self._held_suffix_len()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def _held_suffix_len(self) -> int:
        """Length of the longest suffix of ``pending`` that is a proper prefix of a stop string."""
        pending = self._pending
        for n in range(min(len(pending), self._max_stop_len - 1), 0, -1):
            tail = pending[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
