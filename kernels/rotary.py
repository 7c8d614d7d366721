"""Rotary position embedding (RoFormer, Su et al. 2021), neox / ``rotate_half`` layout.

For each head vector ``x = [x1 | x2]`` (halves of ``head_dim``) at position ``p``::

    out = [x1 * cos - x2 * sin | x2 * cos + x1 * sin],   angle_i = p * inv_freq_i

``cos``/``sin`` come from a precomputed ``cos_sin_cache[p] = [cos | sin]`` (any rope
scaling baked in, as vLLM's ``RotaryEmbedding``) or are computed in-kernel from
``inv_freq_i = theta ** (-2i / head_dim)``, built in fp32 exactly as HF Llama does.
Math in fp32, one rounding to the input dtype. In place on ``q`` and ``k``; one program
per token rotates all its q and k heads.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, token, stride_xt, stride_xh, stride_xd, cos, sin,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate the ``[NUM_HEADS, 2 * HALF]`` row block of one token in place."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    base = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh
    x1 = tl.load(base + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    x2 = tl.load(base + (offs_d[None, :] + HALF) * stride_xd, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = x1f * cos[None, :] - x2f * sin[None, :]
    o2 = x2f * cos[None, :] + x1f * sin[None, :]
    tl.store(base + offs_d[None, :] * stride_xd, o1.to(x1.dtype), mask=mask)
    tl.store(base + (offs_d[None, :] + HALF) * stride_xd, o2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr, inv_freq_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_cp,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_COS_SIN_CACHE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    # -- cos / sin of this position --
    if USE_COS_SIN_CACHE:
        row = cos_sin_ptr + pos.to(tl.int64) * stride_cp
        cos = tl.load(row + offs, mask=mask, other=1.0).to(tl.float32)
        sin = tl.load(row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        inv_freq = tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
        angle = pos.to(tl.float32) * inv_freq
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    # -- rotate q and k --
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, stride_qd, cos, sin,
                  NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, stride_kd, cos, sin,
                  NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_HALF)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``[head_dim // 2]`` fp32, bit-identical to HF ``LlamaRotaryEmbedding.inv_freq``."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / (theta**exponent)).to(device)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    cos_sin_cache: torch.Tensor | None = None,
    theta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply neox rotary embedding to ``q`` and ``k`` in place; exactly one of
    ``cos_sin_cache`` / ``theta`` is given.

    Args:
        positions: ``[num_tokens]`` int64 (or int32) token positions.
        q: ``[num_tokens, num_heads, head_dim]``, fp32/bf16/fp16.
        k: ``[num_tokens, num_kv_heads, head_dim]``, q's dtype.
        cos_sin_cache: ``[max_position, head_dim]`` float, ``[cos | sin]`` per position.
        theta: rope base (e.g. 10000.0 or 500000.0).

    Returns:
        ``(q, k)``, rotated in place.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, f"k {k.shape}"
    assert q.dtype == k.dtype and head_dim % 2 == 0, "q/k share a dtype; head_dim is even"
    assert positions.shape == (num_tokens,) and not positions.is_floating_point()
    assert (cos_sin_cache is None) != (theta is None), "pass exactly one of cos_sin_cache/theta"
    if cos_sin_cache is not None:
        assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim
        assert cos_sin_cache.stride(1) == 1, "cos_sin_cache rows must be contiguous"
        table, inv_freq = cos_sin_cache, cos_sin_cache  # inv_freq: placeholder, never read
    else:
        inv_freq = _inv_freq(head_dim, float(theta), q.device)
        table = inv_freq  # placeholder, never read
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, table, inv_freq, *q.stride(), *k.stride(), table.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), USE_COS_SIN_CACHE=cos_sin_cache is not None,
    )
    return q, k
