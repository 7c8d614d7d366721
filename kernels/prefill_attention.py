"""Prefill / extend attention over the paged KV cache, variable-length query chunks.

Request ``r`` owns query rows ``cu_seqlens_q[r]:cu_seqlens_q[r+1]`` (``q_len`` rows); they
are the last ``q_len`` positions of its context of length ``seq_lens[r]``, and their K/V
are already in the cache (written by ``kv_cache_write``), so the cached prefix and the new
tokens are read the same way, through the block table::

    position:  0 ........... ctx_len-1 | ctx_len ........ seq_len-1
               cached prefix            | new tokens (query rows 0 .. q_len-1)
    query row i (position ctx_len + i) sees keys 0 .. ctx_len + i

Grid: ``(num_reqs, cdiv(max_seqlen_q, BLOCK_M), num_heads)``; programs whose query tile
lies past their request's ``q_len`` exit at once (varlen layout as in FlashAttention-2,
Dao 2023). Each program streams ``BLOCK_N``-token K/V tiles up to the causal bound of its
last row and folds them with the online softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scission.kernels.attention_common import (
    LOG2E,
    MIN_DOT,
    attend_paged_range,
    check_attention_inputs,
    dot_precision,
    next_pow2,
    upcast_dot,
)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, cu_seqlens_q_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_btr, stride_btb,
    stride_ot, stride_oh, stride_od,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    tile_m = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + req).to(tl.int64)
    q_len = tl.load(cu_seqlens_q_ptr + req + 1) - q_start
    if tile_m * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # cached prefix length

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_md = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)  # [M, D]
    rows = q_start + offs_m
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)  # [M, D]
    # Keys past the tile's last row are invisible to all its rows: stop there. Key 0 is
    # visible to every row, so no row's softmax is empty.
    kv_end = tl.minimum(seq_len, ctx_len + (tile_m + 1) * BLOCK_M)
    acc, m_i, l_i = attend_paged_range(
        q, ctx_len + offs_m, 0, kv_end, k_cache_ptr, v_cache_ptr,
        block_table_ptr + req * stride_btr, stride_btb, head // GQA, scale_log2,
        stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb, stride_vcs, stride_vch,
        stride_vcd, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION,
        UPCAST_DOT)

    # -- epilogue --
    o = acc / l_i[:, None]
    o_off = rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=mask_md)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of variable-length query chunks over their paged contexts.

    Args:
        q: ``[num_tokens, num_heads, head_dim]``, fp32/bf16/fp16, requests concatenated.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD), q's
            dtype, already holding every query token's K/V.
        block_table: ``[num_reqs, max_blocks_per_req]`` int32.
        seq_lens: ``[num_reqs]`` int32, context length incl. the query tokens.
        cu_seqlens_q: ``[num_reqs + 1]`` int32, ``cu_seqlens_q[-1] == num_tokens``.
        max_seqlen_q: host int, ``max(diff(cu_seqlens_q))`` (sizes the grid).
        scale: softmax scale, usually ``head_dim ** -0.5``.
        out: optional ``[num_tokens, num_heads, head_dim]`` output in q's dtype.
        block_m, block_n: query rows / context tokens per tile (powers of two >= 16).

    Returns:
        ``out``: ``[num_tokens, num_heads, head_dim]``, q's dtype.
    """
    check_attention_inputs(q, k_cache, v_cache, block_table, seq_lens)
    num_tokens, num_heads, head_dim = q.shape
    num_reqs = seq_lens.shape[0]
    assert cu_seqlens_q.shape == (num_reqs + 1,) and cu_seqlens_q.dtype == torch.int32
    assert all(b >= MIN_DOT and b & (b - 1) == 0 for b in (block_m, block_n)), "tiles: 2^k >= 16"
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.dtype == q.dtype
    if num_tokens == 0:
        return out
    grid = (num_reqs, triton.cdiv(max_seqlen_q, block_m), num_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(), *out.stride(),
        GQA=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_D=next_pow2(head_dim, MIN_DOT), BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1],
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype),
    )
    return out
