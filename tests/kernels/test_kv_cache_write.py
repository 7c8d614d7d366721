"""kv_cache_write scatters K/V rows bit-exactly to their slots and skips slot -1."""

from __future__ import annotations

import pytest
import torch

from scission.kernels.kv_cache_write import kv_cache_write
from scission.kernels.reference import ref_kv_cache_write


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def _slot_mapping(batch, skip: tuple[int, ...] = ()) -> torch.Tensor:
    """[num_tokens] int64 slots of each request's last q_len positions; ``skip`` rows -1."""
    block_size = batch.k_cache.shape[1]
    table = batch.block_table.cpu().long()
    slots = []
    seq_lens = batch.seq_lens.tolist()
    for r, (q_len, seq_len) in enumerate(zip(batch.query_lens, seq_lens, strict=True)):
        pos = torch.arange(seq_len - q_len, seq_len)
        slots.append(table[r, pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.cat(slots)
    slot_mapping[list(skip)] = -1
    return slot_mapping.to(batch.q.device)


def _new_kv(batch, gen):
    num_tokens, (_, _, num_kv_heads, head_dim) = batch.q.shape[0], batch.k_cache.shape
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) for _ in range(2))
    return k.to(batch.q.device, batch.q.dtype), v.to(batch.q.device, batch.q.dtype)


@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "dtype"),
    [(16, 2, 64, torch.float32), (32, 3, 128, torch.bfloat16), (16, 1, 128, torch.bfloat16)],
    ids=_dtype_id,
)
def test_kv_cache_write_matches_reference(make_paged_batch, gen, block_size, num_kv_heads,
                                          head_dim, dtype):
    """Every kept token lands at its slot; skipped tokens and all other slots are untouched."""
    batch = make_paged_batch([1, 7, 2 * block_size + 3], [0, 20, 5], num_kv_heads=num_kv_heads,
                             gqa=1, head_dim=head_dim, block_size=block_size, dtype=dtype)
    k, v = _new_kv(batch, gen)
    slot_mapping = _slot_mapping(batch, skip=(2, 5, 9))
    ref_k, ref_v = ref_kv_cache_write(k, v, batch.k_cache, batch.v_cache, slot_mapping)
    kv_cache_write(k, v, batch.k_cache, batch.v_cache, slot_mapping)
    assert torch.equal(batch.k_cache, ref_k) and torch.equal(batch.v_cache, ref_v)
    assert not torch.equal(batch.k_cache.flatten(0, 1)[slot_mapping[2]], k[2])  # skipped


def test_kv_cache_write_noncontiguous_inputs(make_paged_batch, gen):
    """k/v as head slices of a fused qkv projection (strided rows) are written correctly."""
    batch = make_paged_batch([5, 3], [4, 0], num_kv_heads=2, gqa=1, head_dim=64,
                             block_size=16, dtype=torch.float32)
    qkv = torch.randn(8, 6, 64, generator=gen).to(batch.q.device)
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slot_mapping = _slot_mapping(batch)
    ref_k, ref_v = ref_kv_cache_write(k, v, batch.k_cache, batch.v_cache, slot_mapping)
    kv_cache_write(k, v, batch.k_cache, batch.v_cache, slot_mapping)
    assert torch.equal(batch.k_cache, ref_k) and torch.equal(batch.v_cache, ref_v)


def test_kv_cache_write_large_num_blocks(make_paged_batch, gen):
    """Slots past 2**31 cache elements are written with int64 offsets."""
    batch = make_paged_batch([3, 1], [30, 0], num_kv_heads=1, gqa=1, head_dim=64,
                             block_size=16, dtype=torch.bfloat16, big=True)
    k, v = _new_kv(batch, gen)
    slot_mapping = _slot_mapping(batch)
    assert slot_mapping.max() * batch.k_cache.stride(1) > 2**31
    kv_cache_write(k, v, batch.k_cache, batch.v_cache, slot_mapping)
    k_flat, v_flat = batch.k_cache.flatten(0, 1), batch.v_cache.flatten(0, 1)
    assert torch.equal(k_flat[slot_mapping], k) and torch.equal(v_flat[slot_mapping], v)
