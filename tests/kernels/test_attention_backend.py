"""TritonAttentionBackend agrees with TorchAttentionBackend and the float64 reference."""

from __future__ import annotations

import pytest
import torch

from scission.engine.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    reference_paged_attention,
)
from scission.engine.attention_triton import TritonAttentionBackend
from scission.kernels.reference import rel_error

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||


def _dtype_id(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None


def _metadata(batch) -> AttentionMetadata:
    """Engine metadata for ``batch``: query rows are each request's last q_len positions."""
    block_size = batch.k_cache.shape[1]
    seq_lens = tuple(batch.seq_lens.tolist())
    table = batch.block_table.cpu().long()
    slots = []
    for r, (q_len, seq_len) in enumerate(zip(batch.query_lens, seq_lens, strict=True)):
        pos = torch.arange(seq_len - q_len, seq_len)
        slots.append(table[r, pos // block_size] * block_size + pos % block_size)
    return AttentionMetadata(
        cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens, block_table=batch.block_table,
        slot_mapping=torch.cat(slots).to(batch.q.device), max_seqlen_q=batch.max_seqlen_q,
        max_seq_len=max(seq_lens), block_size=block_size, query_lens=batch.query_lens,
        seq_lens_host=seq_lens,
    )


def _run_both(batch, gen, triton_backend: TritonAttentionBackend):
    """Run both backends on copies of the caches; return outputs and written caches."""
    md = _metadata(batch)
    num_tokens, (_, _, num_kv_heads, head_dim) = batch.q.shape[0], batch.k_cache.shape
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
            .to(batch.q.device, batch.q.dtype) for _ in range(2))
    results = []
    for backend in (triton_backend, TorchAttentionBackend()):
        k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        backend.plan(md)
        out = backend.run(batch.q, k, v, k_cache, v_cache, batch.scale)
        results.append((out, k_cache, v_cache))
    return md, results


@pytest.mark.parametrize(
    ("query_lens", "ctx_lens", "block_size", "gqa", "head_dim", "dtype", "expect_splits"),
    [
        # mixed: fresh prompt, chunk over a cached prefix, decodes (one at context 1)
        ([9, 20, 1, 1], [0, 37, 0, 50], 16, 3, 64, torch.float32, 1),
        ([33, 1, 5], [16, 70, 3], 32, 4, 128, torch.bfloat16, 1),
        # pure decode, single pass and split-K (split_kv_tokens=32 below)
        ([1, 1, 1], [0, 17, 30], 16, 1, 64, torch.float32, 1),
        ([1, 1, 1, 1], [0, 40, 95, 130], 32, 3, 128, torch.bfloat16, 5),
        ([1, 1], [60, 100], 16, 4, 64, torch.float32, 4),
    ],
    ids=_dtype_id,
)
def test_backend_matches_torch_and_reference(make_paged_batch, gen, query_lens, ctx_lens,
                                             block_size, gqa, head_dim, dtype, expect_splits):
    """Same caches written bit-exactly; outputs within tolerance of the float64 reference."""
    batch = make_paged_batch(query_lens, ctx_lens, num_kv_heads=2, gqa=gqa, head_dim=head_dim,
                             block_size=block_size, dtype=dtype)
    backend = TritonAttentionBackend(split_kv_tokens=32, max_splits=5)
    md, [(out, k_cache, v_cache), (torch_out, torch_k, torch_v)] = _run_both(batch, gen, backend)
    assert backend.num_splits == expect_splits
    assert torch.equal(k_cache, torch_k) and torch.equal(v_cache, torch_v)
    ref = reference_paged_attention(batch.q, k_cache, v_cache, md, batch.scale)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < TOL[dtype], f"triton vs reference {rel_error(out, ref):.2e}"
    assert rel_error(torch_out, ref) < TOL[dtype], "torch backend vs reference"
    assert rel_error(out, torch_out) < 2 * TOL[dtype], "triton vs torch backend"


def test_plan_once_run_per_layer(make_paged_batch, gen):
    """One plan serves every layer: each layer's q and caches give that layer's answer."""
    batch = make_paged_batch([4, 1], [12, 20], num_kv_heads=2, gqa=3, head_dim=64,
                             block_size=16, dtype=torch.float32)
    md = _metadata(batch)
    backend = TritonAttentionBackend()
    backend.plan(md)
    for layer in range(2):
        q, k, v, k_cache, v_cache = (
            torch.randn(t.shape, generator=gen).to(t.device) if layer else t.clone()
            for t in (batch.q, batch.q[:, :2], batch.q[:, 2:4], batch.k_cache, batch.v_cache)
        )
        out = backend.run(q, k, v, k_cache, v_cache, batch.scale)
        ref = reference_paged_attention(q, k_cache, v_cache, md, batch.scale)
        assert rel_error(out, ref) < TOL[torch.float32], f"layer {layer}"
