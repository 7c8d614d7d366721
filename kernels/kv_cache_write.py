"""Write this step's K/V rows into the paged cache through ``slot_mapping``.

Token ``t`` goes to ``cache[slot // block_size, slot % block_size]`` with
``slot = slot_mapping[t]``; ``slot == -1`` skips the token (padding, or a prefix already
cached). One program per token copies all kv heads of K and V (as nano-vllm's
``store_kvcache_kernel``). ``slot_mapping`` is int64, so cache offsets are int64 too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    # -- copy k --
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh
                + offs_d[None, :] * stride_kd, mask=mask)  # [H, D]
    kc_off = (block_id * stride_kcb + in_block * stride_kcs + offs_h[:, None] * stride_kch
              + offs_d[None, :] * stride_kcd)
    tl.store(k_cache_ptr + kc_off, k, mask=mask)
    # -- copy v --
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh
                + offs_d[None, :] * stride_vd, mask=mask)  # [H, D]
    vc_off = (block_id * stride_vcb + in_block * stride_vcs + offs_h[:, None] * stride_vch
              + offs_d[None, :] * stride_vcd)
    tl.store(v_cache_ptr + vc_off, v, mask=mask)


def kv_cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``k``/``v`` rows into the caches in place; ``slot_mapping == -1`` skips a row.

    Args:
        k, v: ``[num_tokens, num_kv_heads, head_dim]``, the cache dtype.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD).
        slot_mapping: ``[num_tokens]`` int64, ``block_id * block_size + offset`` or -1.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, f"k/v shapes differ: {k.shape} {v.shape}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches: [N, bs, H_kv, D]"
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), f"{k_cache.shape} vs {k.shape}"
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, "k, v and caches share a dtype"
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (num_tokens,)
    if num_tokens == 0:
        return
    _kv_cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )
