"""Copy KV blocks between scattered cache blocks and a contiguous staging buffer.

``GATHER``: ``staging[i] = cache[block_ids[i]]``; ``SCATTER``: ``cache[block_ids[i]] =
staging[i]``. Packing many small (``block_size * H * D``-element) blocks into one
contiguous buffer lets a KV transfer move them as a single descriptor. Each block is a flat
run of ``block_size * num_kv_heads * head_dim`` elements in both tensors (inner dims
contiguous; the block stride of the cache is free, so per-layer views of a larger
allocation work). Dtype-agnostic: it moves bits. Grid: ``(n_blocks, cdiv(elems, BLOCK))``;
block offsets are int64.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl


class KVCopyDirection(enum.Enum):
    GATHER = "gather"  # cache blocks -> staging
    SCATTER = "scatter"  # staging -> cache blocks


@triton.jit
def _kv_gather_kernel(
    cache_ptr, staging_ptr, block_ids_ptr, stride_cb, stride_sb,
    BLOCK_ELEMS: tl.constexpr, BLOCK: tl.constexpr, SCATTER: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < BLOCK_ELEMS
    block_id = tl.load(block_ids_ptr + i).to(tl.int64)
    cache_off = block_id * stride_cb + offs
    staging_off = i * stride_sb + offs
    # -- copy one chunk of one block --
    if SCATTER:
        tl.store(cache_ptr + cache_off, tl.load(staging_ptr + staging_off, mask=mask), mask=mask)
    else:
        tl.store(staging_ptr + staging_off, tl.load(cache_ptr + cache_off, mask=mask), mask=mask)


def copy_kv_blocks(
    cache: torch.Tensor,
    staging: torch.Tensor,
    block_ids: torch.Tensor,
    direction: KVCopyDirection,
    *,
    block: int = 2048,
) -> None:
    """Gather cache blocks into ``staging`` or scatter ``staging`` into cache blocks.

    Args:
        cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD), any dtype;
            dims 1..3 contiguous.
        staging: ``[n_blocks, block_size, num_kv_heads, head_dim]``, cache's dtype; dims
            1..3 contiguous.
        block_ids: ``[n_blocks]`` int32/int64 cache block ids (distinct for ``SCATTER``).
        direction: ``GATHER`` (cache -> staging) or ``SCATTER`` (staging -> cache).
        block: elements per program (power of two).
    """
    n_blocks = block_ids.shape[0]
    assert cache.dim() == 4 and staging.shape == (n_blocks, *cache.shape[1:]), (
        f"staging {tuple(staging.shape)} must be [{n_blocks}, *{tuple(cache.shape[1:])}]"
    )
    assert staging.dtype == cache.dtype, f"dtype {staging.dtype} != {cache.dtype}"
    assert block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64)
    assert _inner_contiguous(cache) and _inner_contiguous(staging), "dims 1..3 must be dense"
    assert block > 0 and block & (block - 1) == 0, "block must be a power of two"
    if n_blocks == 0:
        return
    elems = cache.shape[1] * cache.shape[2] * cache.shape[3]
    block = min(block, triton.next_power_of_2(elems))
    _kv_gather_kernel[(n_blocks, triton.cdiv(elems, block))](
        cache, staging, block_ids, cache.stride(0), staging.stride(0),
        BLOCK_ELEMS=elems, BLOCK=block, SCATTER=direction is KVCopyDirection.SCATTER,
    )


def _inner_contiguous(t: torch.Tensor) -> bool:
    _, block_size, heads, head_dim = t.shape
    return t.stride(3) == 1 and t.stride(2) == head_dim and t.stride(1) == heads * head_dim
