"""Shared ``@triton.jit`` building blocks for the paged attention kernels.

Paged KV layout (``NHD``): ``cache[block_id, in_block, kv_head, d]`` with
``block_id = block_table[r, pos // BLOCK_SIZE]`` and ``in_block = pos % BLOCK_SIZE`` for
token position ``pos`` of request ``r``.

The softmax is the online (streaming) softmax of FlashAttention-2 (Dao, 2023): scores are
kept in log2 units (``scale * log2(e)`` folded into ``qk``) so the kernels use ``exp2``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16 on NVIDIA GPUs


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs take the exact ``ieee`` path (tf32 would cost ~1e-3); bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """True under ``TRITON_INTERPRET=1`` for bf16: the interpreter (triton 3.9) stores bf16
    as uint16 and its ``tl.dot`` multiplies the raw bit patterns, so ``mma`` upcasts to fp32
    there (exact: bf16 products fit in fp32). Compiled kernels keep the native bf16 dot."""
    return bool(triton.knobs.runtime.interpret) and dtype == torch.bfloat16


def check_attention_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Assert the shapes/dtypes shared by the paged attention wrappers (q: [T, H, D])."""
    assert q.dim() == 3, f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}"
    assert k_cache.dim() == 4, f"cache must be [num_blocks, bs, H_kv, D], got {k_cache.shape}"
    assert k_cache.shape == v_cache.shape, f"k/v caches differ: {k_cache.shape} {v_cache.shape}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"q {q.dtype} / cache {k_cache.dtype} differ"
    assert k_cache.shape[3] == q.shape[2], f"cache head_dim {k_cache.shape[3]} != {q.shape[2]}"
    assert q.shape[1] % k_cache.shape[2] == 0, f"{q.shape[1]} heads vs {k_cache.shape[2]} kv heads"
    assert block_table.dim() == 2 and block_table.dtype == torch.int32, "block_table: [R, B] int32"
    assert seq_lens.shape == (block_table.shape[0],) and seq_lens.dtype == torch.int32


def next_pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def paged_row_offsets(block_table_row_ptr, stride_btb, pos, mask_n, BLOCK_SIZE: tl.constexpr):
    """Physical ``(block_id, in_block)`` of token positions ``pos`` ([BLOCK_N]).

    ``block_id`` is int64 so ``block_id * stride_cache_block`` cannot overflow int32 on
    caches with more than 2**31 elements.
    """
    block_id = tl.load(block_table_row_ptr + (pos // BLOCK_SIZE) * stride_btb, mask=mask_n, other=0)
    return block_id.to(tl.int64), pos % BLOCK_SIZE


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator (see ``upcast_dot`` for ``UPCAST_DOT``)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def load_paged_tile(
    cache_ptr, block_id, in_block, kv_head, offs_d, mask,
    stride_cb, stride_cs, stride_ch, stride_cd,
):
    """``[BLOCK_N, BLOCK_D]`` K or V rows of one kv head (masked entries read 0)."""
    off = (block_id[:, None] * stride_cb + in_block[:, None] * stride_cs + kv_head * stride_ch
           + offs_d[None, :] * stride_cd)
    return tl.load(cache_ptr + off, mask=mask, other=0.0)


@triton.jit
def attend_paged_range(
    q, q_pos, start, end, k_cache_ptr, v_cache_ptr, bt_row_ptr, stride_btb, kv_head, scale_log2,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Stream context positions ``[start, end)`` of one request through the block table.

    q: ``[BLOCK_M, BLOCK_D]`` query rows of one kv head's group; ``q_pos``: ``[BLOCK_M]``
    their positions (used when ``CAUSAL``: row i sees keys ``<= q_pos[i]``). Returns the
    unnormalised ``acc`` ``[BLOCK_M, BLOCK_D]`` fp32, running max ``m_i`` and sum ``l_i``.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < end
        block_id, in_block = paged_row_offsets(bt_row_ptr, stride_btb, pos, mask_n, BLOCK_SIZE)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = load_paged_tile(k_cache_ptr, block_id, in_block, kv_head, offs_d, mask_kv,
                            stride_kcb, stride_kcs, stride_kch, stride_kcd)  # [N, D]
        # -- compute qk --
        qk = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PRECISION,
                 UPCAST_DOT) * scale_log2  # [M, N]
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        v = load_paged_tile(v_cache_ptr, block_id, in_block, kv_head, offs_d, mask_kv,
                            stride_vcb, stride_vcs, stride_vch, stride_vcd)  # [N, D]
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, DOT_PRECISION, UPCAST_DOT)
    return acc, m_i, l_i


@triton.jit
def online_softmax_step(
    acc, m_i, l_i, qk, v, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One FlashAttention-2 update with a [M, N] score tile (log2 units, -inf = masked).

    acc: [M, D] fp32 unnormalised output; m_i: [M] running max; l_i: [M] running sum.
    Every call must see at least one unmasked score per row that matters (callers iterate
    only over tiles that hold a visible key), so ``m_new`` is finite for those rows.
    """
    # -- update running max and rescale --
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    # -- compute p --
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- accumulate pv --
    acc = acc * alpha[:, None]
    acc = mma(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST_DOT)
    return acc, m_new, l_i
