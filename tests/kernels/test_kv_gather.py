"""copy_kv_blocks moves whole cache blocks to/from a contiguous staging buffer bit-exactly."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.kv_gather import KVCopyDirection, copy_kv_blocks
from scission.kernels.reference import ref_kv_gather, ref_kv_scatter


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def _random(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(1, 255, shape, generator=gen).to(dtype)


@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "dtype", "ids_dtype", "block"),
    [
        (16, 2, 64, torch.float32, torch.int32, 2048),
        (32, 3, 128, torch.bfloat16, torch.int64, 1024),
        (16, 1, 128, torch.uint8, torch.int32, 512),
    ],
    ids=_dtype_id,
)
def test_gather_then_scatter(gen, device, block_size, num_kv_heads, head_dim, dtype, ids_dtype,
                             block):
    """GATHER copies blocks[ids] in order; SCATTER writes them back and touches nothing else."""
    shape = (40, block_size, num_kv_heads, head_dim)
    cache = _random(shape, dtype, gen).to(device)
    block_ids = torch.randperm(40, generator=gen)[:7].to(device, ids_dtype)
    staging = torch.full((7, *shape[1:]), 77, dtype=dtype, device=device)  # poison
    copy_kv_blocks(cache, staging, block_ids, KVCopyDirection.GATHER, block=block)
    assert torch.equal(staging, ref_kv_gather(cache, block_ids))
    new = _random(staging.shape, dtype, gen).to(device)
    ref = ref_kv_scatter(cache, new, block_ids)
    copy_kv_blocks(cache, new, block_ids, KVCopyDirection.SCATTER, block=block)
    assert torch.equal(cache, ref)


def test_gather_from_layer_view(gen, device):
    """A per-layer view of a [num_blocks, 2, ...] K/V allocation (block stride 2x) works."""
    kv = torch.randn(12, 2, 16, 2, 64, generator=gen).to(device)
    v_cache = kv[:, 1]
    block_ids = torch.tensor([11, 0, 5], dtype=torch.int32, device=device)
    staging = torch.full((3, 16, 2, 64), float("nan"), device=device)
    copy_kv_blocks(v_cache, staging, block_ids, KVCopyDirection.GATHER)
    assert torch.equal(staging, v_cache[block_ids.long()])


def test_kv_gather_large_num_blocks(make_paged_batch):
    """Block ids past 2**31 cache elements are gathered/scattered with int64 offsets."""
    batch = make_paged_batch([1, 1], [40, 7], num_kv_heads=1, gqa=1, head_dim=64,
                             block_size=16, dtype=torch.bfloat16, big=True)
    block_ids = batch.block_table[0, :3].contiguous()
    assert block_ids.max() * batch.k_cache.stride(0) > 2**31
    staging = torch.zeros(3, 16, 1, 64, dtype=torch.bfloat16, device=block_ids.device)
    copy_kv_blocks(batch.k_cache, staging, block_ids, KVCopyDirection.GATHER)
    assert torch.equal(staging, batch.k_cache[block_ids.long()])
    copy_kv_blocks(batch.v_cache, staging, block_ids, KVCopyDirection.SCATTER)
    assert torch.equal(batch.v_cache[block_ids.long()], batch.k_cache[block_ids.long()])
