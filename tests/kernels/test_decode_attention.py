"""decode_attention (single pass and split-K) against the float64 loop reference."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.decode_attention import decode_attention
from scission.kernels.reference import ref_decode_attention, rel_error

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||
NUM_KV_HEADS = 2


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def _run(batch, num_splits: int, block_n: int = 64) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))  # poison: an unwritten element fails
    decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                     batch.scale, num_splits=num_splits, out=out, block_n=block_n)
    return out


def _check(batch, out: torch.Tensor) -> None:
    ref = ref_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                               batch.seq_lens, batch.scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = rel_error(out, ref)
    assert err < TOL[batch.q.dtype], f"relative error {err:.2e}"


# Pruned grid: every block size, GQA ratio, head_dim, dtype and split count appears, not
# every combination.
@pytest.mark.parametrize(
    ("block_size", "gqa", "head_dim", "dtype", "num_splits"),
    [
        (16, 1, 64, torch.float32, 1),
        (32, 3, 128, torch.bfloat16, 1),
        (16, 4, 128, torch.float32, 4),
        (32, 4, 64, torch.bfloat16, 3),
        (16, 3, 64, torch.bfloat16, 2),
        (32, 1, 128, torch.float32, 2),
        (16, 3, 80, torch.bfloat16, 1),  # head_dim not a power of two (padded, masked)
    ],
    ids=_dtype_id,
)
def test_decode_matches_reference(make_paged_batch, block_size, gqa, head_dim, dtype, num_splits):
    """Ragged contexts (1, non-multiples of block_size, several tiles) match the reference."""
    ctx = [0, 16, 3 * block_size + 4, 130]  # seq_len = ctx + 1: 1, 17, 3 bs + 5, 131
    batch = make_paged_batch([1] * len(ctx), ctx, num_kv_heads=NUM_KV_HEADS, gqa=gqa,
                             head_dim=head_dim, block_size=block_size, dtype=dtype)
    _check(batch, _run(batch, num_splits))


def test_split_k_with_empty_splits(make_paged_batch):
    """More splits than context tiles: empty splits weigh nothing, short rows stay exact."""
    batch = make_paged_batch([1, 1, 1], [0, 20, 90], num_kv_heads=NUM_KV_HEADS, gqa=3,
                             head_dim=64, block_size=32, dtype=torch.float32)  # tile < block
    out = _run(batch, num_splits=8, block_n=16)
    _check(batch, out)
    single = _run(batch, num_splits=1, block_n=16)
    assert rel_error(out, single) < 1e-6, "split-K must agree with the single pass"


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_large_num_blocks(make_paged_batch, num_splits):
    """Blocks past 2**31 cache elements are addressed with int64 offsets."""
    batch = make_paged_batch([1, 1], [40, 7], num_kv_heads=1, gqa=4, head_dim=64,
                             block_size=16, dtype=torch.bfloat16, big=True)
    assert batch.block_table.max() * batch.k_cache.stride(0) > 2**31
    _check(batch, _run(batch, num_splits))
