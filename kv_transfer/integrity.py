"""Per-block checksums of transferred KV (opt-in: ``WorkerConfig.kv_checksums``).

None of the PD anchors checks what a one-sided READ delivered; a bit flipped in a NIC, a
stale descriptor or a block reused under the reader would silently change the output. So the
prefill worker can put one checksum per block in the (signed) ``TransferHandle`` and the
decode worker compares after the READ; a mismatch is handled like a failed pull (the prompt
is recomputed locally) and counted.

The checksum of block ``b`` is XXH3-64 (xxhash, Collet; a fast non-cryptographic hash: it
detects corruption, not an adversary, whom the handle's MAC stops) over the bytes of
``k_cache[b]`` then ``v_cache[b]`` of every layer, in layer order. Whole blocks are hashed,
including the unused tail of the last one: the READ copies whole blocks, so both sides hold
the same bytes there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

KVLayers = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache), NHD


def block_checksums(layers: KVLayers, block_ids: Sequence[int]) -> tuple[int, ...]:
    """XXH3-64 of each block (see the module docstring), as unsigned 64-bit ints.

    Args:
        layers: per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size,
            num_kv_heads, head_dim]``, contiguous, on CPU (any dtype).
        block_ids: blocks to hash, in the order of the result.
    Raises:
        IndexError: a block id out of range.
    """
    flat = [(k.view(k.shape[0], -1).view(torch.uint8), v.view(v.shape[0], -1).view(torch.uint8))
            for k, v in layers]
    out = []
    for b in block_ids:
        h = xxhash.xxh3_64()
        for k, v in flat:
            h.update(memoryview(k[b].numpy()))
            h.update(memoryview(v[b].numpy()))
        out.append(h.intdigest())
    return tuple(out)


def mismatched_blocks(expected: Sequence[int], layers: KVLayers,
                      block_ids: Sequence[int]) -> list[int]:
    """Positions ``i`` where ``block_ids[i]``'s checksum differs from ``expected[i]``.

    Raises:
        ValueError: ``expected`` and ``block_ids`` differ in length.
    """
    if len(expected) != len(block_ids):
        raise ValueError(f"{len(expected)} checksums for {len(block_ids)} blocks")
    actual = block_checksums(layers, block_ids)
    return [i for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if a != e]
