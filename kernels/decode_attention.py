"""Paged decode attention: one query token per request, GQA, ragged context lengths.

Each program owns one (request, kv head, split) and processes all ``GQA`` query heads that
share the kv head as the rows of one tile, so each K/V tile is read once per kv head. The
context is streamed in ``BLOCK_N``-token tiles gathered through the block table and folded
with the FlashAttention-2 online softmax (Dao, 2023).

Split-K (FlashDecoding, Dao et al. 2023): with ``num_splits > 1`` the context of each
request is cut into ``num_splits`` contiguous ranges; each program writes its normalised
partial output and log-sum-exp, and ``_decode_reduce_kernel`` merges them::

    lse_s = m_s + log2(l_s)                # per split, log2 units
    out   = sum_s 2^(lse_s - max lse) o_s / sum_s 2^(lse_s - max lse)

Empty splits (short contexts) write ``lse = -inf`` and weigh nothing.
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
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, out_ptr,
    mid_o_ptr, mid_lse_ptr, scale_log2,
    stride_qr, stride_qh, stride_qd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_btr, stride_btb,
    stride_or, stride_oh, stride_od,
    stride_mor, stride_moh, stride_mos, stride_mod,
    stride_mlr, stride_mlh, stride_mls,
    GQA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    # tokens_per_split is a multiple of BLOCK_N; split s covers [start, end) of the context:
    #   |-- split 0 --|-- split 1 --| ... |-- split S-1 (short or empty) --|
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_o = (offs_g[:, None] < GQA) & (offs_d[None, :] < HEAD_DIM)  # [G, D]
    heads = kv_head * GQA + offs_g  # the query heads sharing this kv head
    q = tl.load(q_ptr + req * stride_qr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_o, other=0.0)  # [G, D]
    acc, m_i, l_i = attend_paged_range(
        q, start, start, end, k_cache_ptr, v_cache_ptr, block_table_ptr + req * stride_btr,
        stride_btb, kv_head, scale_log2, stride_kcb, stride_kcs, stride_kch, stride_kcd,
        stride_vcb, stride_vcs, stride_vch, stride_vcd, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N,
        BLOCK_SIZE, False, DOT_PRECISION, UPCAST_DOT)

    # -- epilogue --
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # empty split: acc == 0, keep it 0 (no 0/0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        o_off = req * stride_or + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        mo_off = (req * stride_mor + heads[:, None] * stride_moh + split * stride_mos
                  + offs_d[None, :] * stride_mod)
        tl.store(mid_o_ptr + mo_off, o, mask=mask_o)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        ml_off = req * stride_mlr + heads * stride_mlh + split * stride_mls
        tl.store(mid_lse_ptr + ml_off, lse, mask=offs_g < GQA)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_mor, stride_moh, stride_mos, stride_mod,
    stride_mlr, stride_mlh, stride_mls,
    stride_or, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    # -- merge split log-sum-exps --
    lse = tl.load(mid_lse_ptr + req * stride_mlr + head * stride_mlh + offs_s * stride_mls,
                  mask=mask_s, other=float("-inf"))  # [S]; split 0 is never empty
    w = tl.exp2(lse - tl.max(lse, 0))
    mo_off = (req * stride_mor + head * stride_moh + offs_s[:, None] * stride_mos
              + offs_d[None, :] * stride_mod)
    o = tl.load(mid_o_ptr + mo_off, mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [S, D]
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    o_off = req * stride_or + head * stride_oh + offs_d * stride_od
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Attention of one new token per request over its paged context.

    Args:
        q: ``[num_reqs, num_heads, head_dim]``, fp32/bf16/fp16; row ``r`` is the token at
            position ``seq_lens[r] - 1`` (its K/V must already be in the cache).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD), q's dtype.
        block_table: ``[num_reqs, max_blocks_per_req]`` int32.
        seq_lens: ``[num_reqs]`` int32, context length incl. the new token, each >= 1.
        scale: softmax scale, usually ``head_dim ** -0.5``.
        num_splits: split-K factor (FlashDecoding); 1 = single pass, no reduction.
        out: optional ``[num_reqs, num_heads, head_dim]`` output in q's dtype.
        block_n: context tokens per tile (power of two >= 16).

    Returns:
        ``out``: ``[num_reqs, num_heads, head_dim]``, q's dtype.
    """
    check_attention_inputs(q, k_cache, v_cache, block_table, seq_lens)
    num_reqs, num_heads, head_dim = q.shape
    assert seq_lens.shape == (num_reqs,), "one query row per request"
    assert num_splits >= 1 and block_n >= MIN_DOT and block_n & (block_n - 1) == 0
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.dtype == q.dtype
    gqa = num_heads // k_cache.shape[2]
    mid_o = mid_lse = out  # placeholders when NUM_SPLITS == 1 (never touched)
    if num_splits > 1:
        mid_o = q.new_empty(num_reqs, num_heads, num_splits, head_dim, dtype=torch.float32)
        mid_lse = q.new_empty(num_reqs, num_heads, num_splits, dtype=torch.float32)
    _decode_attention_kernel[(num_reqs, k_cache.shape[2], num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, mid_o, mid_lse, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(), *out.stride(),
        *_strides(mid_o, 4), *_strides(mid_lse, 3),
        GQA=gqa, HEAD_DIM=head_dim, BLOCK_G=next_pow2(gqa, MIN_DOT),
        BLOCK_D=next_pow2(head_dim, MIN_DOT),
        BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype),
    )
    if num_splits > 1:
        _reduce_splits(mid_o, mid_lse, out)
    return out


def _reduce_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor) -> None:
    """Merge ``mid_o: [R, H, S, D]`` fp32 / ``mid_lse: [R, H, S]`` fp32 into ``out``."""
    num_reqs, num_heads, num_splits, head_dim = mid_o.shape
    _decode_reduce_kernel[(num_reqs, num_heads)](
        mid_o, mid_lse, out, *mid_o.stride(), *mid_lse.stride(), *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim, MIN_DOT), NUM_SPLITS=num_splits,
        BLOCK_S=next_pow2(num_splits),
    )


def _strides(t: torch.Tensor, ndim: int) -> tuple[int, ...]:
    """``t``'s strides, or zeros when ``t`` is a placeholder of another rank."""
    return tuple(t.stride()) if t.dim() == ndim else (0,) * ndim
