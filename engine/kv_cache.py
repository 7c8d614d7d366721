"""Paged KV cache memory: one contiguous allocation, per-layer K and V views.

Layout: ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]`` in one
tensor, so a KV transfer agent registers a single memory region once.
"""

from __future__ import annotations

import logging

import torch

from scission.engine.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """``cache.num_blocks`` if set, else as many blocks as fit in ``cache.kv_cache_bytes``.

    Raises:
        ValueError: the budget holds less than one block.
    """
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = model.kv_bytes_per_block(cache.block_size, dtype)
    n = cache.kv_cache_bytes // per_block
    if n < 1:
        raise ValueError(f"kv_cache_bytes={cache.kv_cache_bytes} is below one block ({per_block} B)")
    return int(n)


class KVCache:
    """Owns the cache tensor; ``layers[i] = (k_cache, v_cache)`` each
    ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str = "cpu") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.tensor[i, 0], self.tensor[i, 1]) for i in range(model.num_layers)]
        logger.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                    self.size_bytes / 2**20)

    @property
    def size_bytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def block_bytes(self, block_ids: list[int]) -> bytes:
        """All layers' K and V bytes of these blocks, in order (for tests and checks)."""
        idx = torch.tensor(block_ids, dtype=torch.int64)
        return self.tensor.index_select(2, idx).contiguous().view(torch.uint8).numpy().tobytes()
