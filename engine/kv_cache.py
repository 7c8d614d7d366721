"""Paged KV cache memory: one contiguous allocation, per-layer K and V views.

Two memory orders (``CacheConfig.kv_layout``), one tensor either way, so a KV transfer agent
registers a single memory region once::

    LAYER_MAJOR  [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
                 layer 0 K: |blk 0|blk 1|...|   layer 0 V: |blk 0|blk 1|...|   ... layer L-1 V
    BLOCK_MAJOR  [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]
                 blk 0: |L0 K|L0 V|L1 K|...|L-1 V|   blk 1: |L0 K|...|   ...

Either way ``layers[i] = (k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads,
head_dim]`` with dims 1..3 dense; in ``BLOCK_MAJOR`` the block stride is
``2 * num_layers * block_size * num_kv_heads * head_dim`` elements (not contiguous).
"""

from __future__ import annotations

import logging

import torch

from scission.engine.config import CacheConfig, KVLayout, ModelConfig

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
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (see the module docstring)."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str = "cpu",
                 layout: KVLayout = KVLayout.LAYER_MAJOR) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.layout = KVLayout(layout)
        inner = (block_size, model.num_kv_heads, model.head_dim)
        L = model.num_layers  # noqa: N806
        if self.layout is KVLayout.LAYER_MAJOR:
            self.tensor = torch.zeros((L, 2, num_blocks, *inner), dtype=dtype, device=device)
            self.layers = [(self.tensor[i, 0], self.tensor[i, 1]) for i in range(L)]
        else:
            self.tensor = torch.zeros((num_blocks, L, 2, *inner), dtype=dtype, device=device)
            self.layers = [(self.tensor[:, i, 0], self.tensor[:, i, 1]) for i in range(L)]
        logger.info("KV cache (%s): %d blocks x %d tokens, %.1f MiB", self.layout.value,
                    num_blocks, block_size, self.size_bytes / 2**20)

    @property
    def size_bytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def layer_major(self) -> torch.Tensor:
        """The cache as ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
        (a view, strided in ``BLOCK_MAJOR``)."""
        if self.layout is KVLayout.LAYER_MAJOR:
            return self.tensor
        return self.tensor.permute(1, 2, 0, 3, 4, 5)

    def block_bytes(self, block_ids: list[int]) -> bytes:
        """All layers' K and V bytes of these blocks, in layer-major order
        ``[num_layers, 2, len(block_ids), block_size, H, D]`` whatever the layout (for tests
        and checks)."""
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.tensor.device)
        sel = self.layer_major().index_select(2, idx).contiguous()
        return sel.view(torch.uint8).cpu().numpy().tobytes()

    def zero_block(self, block_id: int) -> None:
        """Zero every layer's K and V of one block (graph-mode warm-up writes block 0)."""
        self.layer_major()[:, :, block_id].zero_()
