"""Stable, chained block hashes for prefix caching and the global KV index.

A full block's hash is ``H(seed, parent_hash, token_ids, extra_keys)`` with BLAKE2b
(64-bit digest), so equal prefixes hash equally in every process and across restarts
(Python's ``hash()`` is salted per process and is never used). The seed mixes in the
model id so two models never share entries. Only full blocks are hashed.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

NONE_HASH = 0  # parent of the first block


def hash_seed(model_id: str) -> bytes:
    """16-byte seed for a model; every worker of a deployment must agree on it."""
    return hashlib.blake2b(f"scission-block-hash-v1:{model_id}".encode(), digest_size=16).digest()


def hash_block(
    seed: bytes, parent_hash: int, token_ids: Sequence[int], extra_keys: bytes = b""
) -> int:
    """64-bit hash of one full block chained on its parent.

    Args:
        seed: from ``hash_seed``.
        parent_hash: the previous block's hash, ``NONE_HASH`` for the first block.
        token_ids: exactly ``block_size`` token ids.
        extra_keys: e.g. image content hashes for multimodal blocks.
    """
    h = hashlib.blake2b(seed, digest_size=8)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    h.update(extra_keys)
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(
    seed: bytes, token_ids: Sequence[int], block_size: int, start_hashes: Sequence[int] = (),
    extra_keys: Sequence[bytes] = (),
) -> list[int]:
    """Hashes of every full block of ``token_ids``; continues after ``start_hashes``.

    Equal to chaining ``hash_block`` over the blocks, about 2x faster: the prompt is packed
    to bytes once and each block copies a hasher already fed the seed.

    Args:
        extra_keys: per block from block 0 (``multimodal.block_extra_keys``: the image
            hashes a block overlaps); blocks past its end have none.
    Returns:
        ``len(token_ids) // block_size`` hashes (the first ``len(start_hashes)`` reused).
    """
    hashes = list(start_hashes)
    num_blocks = len(token_ids) // block_size
    if len(hashes) >= num_blocks:
        return hashes
    first_block = len(hashes)
    block_ids = token_ids[first_block * block_size : num_blocks * block_size]
    data = struct.pack(f"<{len(block_ids)}i", *block_ids)
    seeded = _seeded_hasher(seed)
    parent = struct.pack("<Q", hashes[-1] if hashes else NONE_HASH)
    step = block_size * 4
    digests = []
    for i, off in enumerate(range(0, len(data), step), start=first_block):
        h = seeded.copy()
        h.update(parent + data[off : off + step])
        if i < len(extra_keys) and extra_keys[i]:
            h.update(extra_keys[i])
        parent = h.digest()
        digests.append(parent)
    hashes.extend(int.from_bytes(d, "little") for d in digests)
    return hashes


@functools.lru_cache(maxsize=16)
def _seeded_hasher(seed: bytes) -> hashlib.blake2b:
    """BLAKE2b state after the seed; callers only ``copy()`` it."""
    return hashlib.blake2b(seed, digest_size=8)
