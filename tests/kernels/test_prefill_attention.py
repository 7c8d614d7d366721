"""prefill_attention (varlen chunks over cached prefixes) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.prefill_attention import prefill_attention
from scission.kernels.reference import ref_prefill_attention, rel_error

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||
NUM_KV_HEADS = 2


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def _run_and_check(batch, block_m: int = 64, block_n: int = 64) -> None:
    out = torch.full_like(batch.q, float("nan"))  # poison: an unwritten element fails
    prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                      batch.cu_seqlens_q, batch.max_seqlen_q, batch.scale, out=out,
                      block_m=block_m, block_n=block_n)
    ref = ref_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                                batch.seq_lens, batch.cu_seqlens_q, batch.scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = rel_error(out, ref)
    assert err < TOL[batch.q.dtype], f"relative error {err:.2e}"


# Pruned grid: each block size, GQA ratio, head_dim and dtype appears, not every combination.
@pytest.mark.parametrize(
    ("block_size", "gqa", "head_dim", "dtype"),
    [
        (16, 1, 64, torch.float32),
        (32, 3, 128, torch.bfloat16),
        (16, 4, 128, torch.bfloat16),
        (32, 4, 64, torch.float32),
        (16, 3, 64, torch.float32),
        (32, 1, 80, torch.float32),  # head_dim not a power of two (padded, masked)
    ],
    ids=_dtype_id,
)
def test_prefill_matches_reference(make_paged_batch, block_size, gqa, head_dim, dtype):
    """Mixed chunks: fresh prompt, decode row, chunk over a prefix, multi-tile chunk."""
    query_lens = [1, 5, 70, 16, 1]
    ctx_lens = [0, 30, 17, 100, block_size + 3]
    batch = make_paged_batch(query_lens, ctx_lens, num_kv_heads=NUM_KV_HEADS, gqa=gqa,
                             head_dim=head_dim, block_size=block_size, dtype=dtype)
    _run_and_check(batch)


def test_prefill_small_tiles(make_paged_batch):
    """16x16 tiles: many query and key tiles per request, diagonal tiles partly masked."""
    batch = make_paged_batch([37, 2, 20], [11, 50, 0], num_kv_heads=NUM_KV_HEADS, gqa=3,
                             head_dim=64, block_size=16, dtype=torch.float32)
    _run_and_check(batch, block_m=16, block_n=16)


def test_prefill_large_num_blocks(make_paged_batch):
    """Blocks past 2**31 cache elements are addressed with int64 offsets."""
    batch = make_paged_batch([9, 1], [40, 7], num_kv_heads=1, gqa=4, head_dim=64,
                             block_size=16, dtype=torch.bfloat16, big=True)
    assert batch.block_table.max() * batch.k_cache.stride(0) > 2**31
    _run_and_check(batch)
