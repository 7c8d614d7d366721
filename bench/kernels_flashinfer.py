"""FlashInfer's paged decode attention as a peer in ``bench/kernels.py`` (optional).

FlashInfer (Ye et al., 2025; ``flashinfer-python``) is used only when importable on a CUDA
machine; its kernels are JIT-compiled on first use unless a prebuilt cache is installed, so
the GPU check runs it as a separate part with its own timeout. The cache layout is scission's
(``NHD``: ``[num_blocks, block_size, num_kv_heads, head_dim]``), which FlashInfer reads as
pages of ``block_size`` tokens: request ``r``'s pages are ``block_table[r]`` in order and its
last page holds ``ctx - (pages - 1) * block_size`` tokens.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

WORKSPACE_BYTES = 128 * 1024**2  # the size FlashInfer's docs allocate


def unavailable_reason(device: str) -> str | None:
    """None when FlashInfer can run here; else why not (for the JSON's notes)."""
    if not device.startswith("cuda"):
        return "flashinfer: needs CUDA"
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer: not installed (flashinfer-python is not importable)"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # a broken install is a skip with its reason, not a crash
        return f"flashinfer: import failed: {e!r}"
    return None


def paged_decode_fn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, ctx: int) -> Callable[[], torch.Tensor]:
    """A no-argument callable running FlashInfer batch decode over scission's paged cache.

    Args:
        q: ``[num_reqs, num_heads, head_dim]``, bf16/fp16, cuda.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD), q's dtype.
        block_table: ``[num_reqs, pages]`` int32; every request has ``ctx`` tokens.
        ctx: context length of every request (tokens), ``1 <= ctx <= pages * block_size``.

    Returns:
        ``fn() -> [num_reqs, num_heads, head_dim]`` in q's dtype (planned once, here).
    """
    import flashinfer

    num_reqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    pages = block_table.shape[1]
    assert 1 <= ctx <= pages * block_size, f"ctx {ctx} vs {pages} pages of {block_size}"
    dev = q.device
    indptr = torch.arange(0, num_reqs * pages + 1, pages, dtype=torch.int32, device=dev)
    indices = block_table.reshape(-1).to(torch.int32).contiguous()
    last_page_len = torch.full((num_reqs,), ctx - (pages - 1) * block_size, dtype=torch.int32,
                               device=dev)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    args = (indptr, indices, last_page_len, num_heads, num_kv_heads, head_dim, block_size)
    if hasattr(wrapper, "plan"):  # flashinfer >= 0.2
        wrapper.plan(*args, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        return lambda: wrapper.run(q, (k_cache, v_cache))
    wrapper.begin_forward(*args, data_type=q.dtype)  # 0.1.x
    return lambda: wrapper.forward(q, (k_cache, v_cache))
