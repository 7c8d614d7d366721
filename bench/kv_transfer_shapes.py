"""Pure helpers of the KV-transfer benchmark: the KV shape of a prompt, block-id patterns,
repeat counts and latency statistics (no NIXL, no processes; unit-tested).

A worker's cache is ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``
(``engine/kv_cache.py``, layer-major; block-major puts a block's K and V of every layer in one
range: one descriptor per run); a prompt of ``n`` tokens occupies ``ceil(n / block_size)`` blocks in
every layer's K and V, and a READ moves whole blocks::

    layer 0 K: [blk a][blk a+1]...    layer 0 V: [blk a][blk a+1]...    ... layer L-1 V
               <- one descriptor per run of consecutive blocks, per layer and K/V ->
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Block-id patterns: "contiguous" = the prompt's blocks are one run on both sides (a fresh
# cache: 2 * num_layers descriptors); "fragmented" = no two blocks adjacent on both sides (a
# cache after churn: the block manager frees in reverse order; 2 * num_layers * num_blocks
# descriptors).
PATTERNS = ("contiguous", "fragmented")
# engine.config.KVLayout values (strings here: this module imports no scission code).
KV_LAYOUTS = ("layer_major", "block_major")


@dataclass(frozen=True)
class KVShape:
    """The KV geometry a READ moves (one model, one dtype)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    kv_layout: str = "layer_major"  # engine.config.KVLayout value: "layer_major" | "block_major"

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.dtype not in _ELEMENT_SIZE:
            raise ValueError(f"dtype must be one of {sorted(_ELEMENT_SIZE)}, got {self.dtype!r}")
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size) < 1:
            raise ValueError(f"every dimension must be >= 1: {self}")

    @property
    def element_size(self) -> int:
        return _ELEMENT_SIZE[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        """One block of one layer's K (or V): ``block_size * num_kv_heads * head_dim``."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    def num_blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def transfer_bytes(self, num_tokens: int) -> int:
        """Bytes a READ of the prompt moves (whole blocks, every layer, K and V)."""
        return 2 * self.num_layers * self.num_blocks(num_tokens) * self.bytes_per_block

    def num_descriptors(self, num_runs: int) -> int:
        """Descriptors per side for ``num_runs`` block runs: one per layer, K/V and run
        (layer-major), one per run (block-major)."""
        return num_runs if self.kv_layout == "block_major" else 2 * self.num_layers * num_runs


def block_ids(pattern: str, num_blocks: int, cache_blocks: int,
              seed: int = 0) -> tuple[list[int], list[int]]:
    """``(remote_ids, local_ids)`` of ``num_blocks`` blocks in caches of ``cache_blocks``.

    ``contiguous``: ``[0, n)`` on both sides. ``fragmented``: local ``[0, n)``, remote the
    same ids descending (as a block table looks after the block manager freed a request's
    blocks in reverse order): no two consecutive on both sides, so every block is a run.
    """
    if not 0 < num_blocks <= cache_blocks:
        raise ValueError(f"need 0 < num_blocks <= cache_blocks, got {num_blocks}, {cache_blocks}")
    local = list(range(num_blocks))
    if pattern == "contiguous":
        return list(local), local
    if pattern == "fragmented":
        start = random.Random(seed).randrange(cache_blocks - num_blocks + 1)
        return [start + num_blocks - 1 - i for i in range(num_blocks)], local
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def repeats_for(num_tokens: int, repeats: int, min_repeats: int) -> int:
    """Timed repeats for a prompt: ``repeats`` up to 1k tokens, then fewer in proportion
    (a 16k READ moves 16x the bytes), never below ``min_repeats``."""
    return max(min_repeats, min(repeats, repeats * 1024 // max(num_tokens, 1)))


def latency_stats(samples_s: Sequence[float]) -> dict[str, float]:
    """``{"n", "median_ms", "p90_ms", "min_ms"}`` of durations in seconds (p90: linear
    interpolation, numpy's default)."""
    if not samples_s:
        raise ValueError("no samples")
    ms = [s * 1e3 for s in samples_s]
    return {"n": len(ms), "median_ms": statistics.median(ms),
            "p90_ms": float(np.percentile(ms, 90)), "min_ms": min(ms)}


def gb_per_s(num_bytes: int, duration_ms: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second)."""
    return num_bytes / (duration_ms * 1e-3) / 1e9 if duration_ms > 0 else float("inf")
