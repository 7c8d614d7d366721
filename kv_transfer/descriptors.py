"""KV cache memory → NIXL descriptors: layout, registration regions, block runs.

Pure functions (torch + numpy, no NIXL) so they are unit-testable without agents.

A worker's cache is ``kv_caches: list[(k_cache, v_cache)]``, one pair per layer, each
``[num_blocks, block_size, num_kv_heads, head_dim]`` (``NHD``) with dims 1..3 dense, on CPU,
in one of two layouts (``engine/kv_cache.py``):

- layer-major (``KV_LAYOUT_NHD``): every tensor contiguous. They may be separate allocations
  or views into one big tensor; registration merges adjacent ones into as few regions as
  possible. A run of blocks is one descriptor per layer and K/V.
- block-major (``KV_LAYOUT_BLOCK_NHD``): strided views of one
  ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` tensor. One region; a
  run of blocks is one descriptor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from scission.kv_transfer.handle import KV_LAYOUT_BLOCK_NHD, KV_LAYOUT_NHD, KVLayoutDescriptor

logger = logging.getLogger(__name__)

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class BlockRun(NamedTuple):
    """``num_blocks`` consecutive blocks: remote ``[remote_start, +n)`` → local
    ``[local_start, +n)``."""

    remote_start: int
    local_start: int
    num_blocks: int


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the ``dtype`` string of the messages)."""
    return str(dtype).removeprefix("torch.")


def _check_kv_caches(kv_caches: KVCaches) -> tuple[torch.Size, torch.dtype]:
    if len(kv_caches) == 0:
        raise ValueError("kv_caches is empty")
    shape, dtype = kv_caches[0][0].shape, kv_caches[0][0].dtype
    for layer, pair in enumerate(kv_caches):
        if len(pair) != 2:
            raise ValueError(f"layer {layer}: expected a (k_cache, v_cache) pair")
        for name, t in zip(("k_cache", "v_cache"), pair, strict=True):
            where = f"layer {layer} {name}"
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                raise ValueError(f"{where}: expected a CPU torch.Tensor")
            if t.dim() != 4 or t.shape != shape or t.dtype != dtype:
                raise ValueError(
                    f"{where}: shape {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype} "
                    "[num_blocks, block_size, num_kv_heads, head_dim]"
                )
            if not _inner_dense(t):
                raise ValueError(f"{where}: dims 1..3 must be dense")
    return shape, dtype


def _inner_dense(t: torch.Tensor) -> bool:
    _, block_size, heads, head_dim = t.shape
    return t.stride(3) == 1 and t.stride(2) == head_dim and t.stride(1) == heads * head_dim


def kv_layout_of(kv_caches: KVCaches) -> str:
    """``KV_LAYOUT_BLOCK_NHD`` if the pairs are the per-layer views of one block-major tensor
    (block stride ``2 * num_layers`` blocks' worth, ``K_0 V_0 K_1 ...`` back to back in a
    block), ``KV_LAYOUT_NHD`` if every tensor is contiguous.

    Raises:
        ValueError: neither (e.g. a sliced or transposed cache), or bad shapes (as
            ``describe_kv_caches``).
    """
    shape, _ = _check_kv_caches(kv_caches)
    elems = shape[1] * shape[2] * shape[3]  # one block of one layer's K (or V)
    nbytes = elems * kv_caches[0][0].element_size()
    base = kv_caches[0][0].data_ptr()
    block_major = all(
        t.stride(0) == 2 * len(kv_caches) * elems and t.data_ptr() == base + (2 * i + j) * nbytes
        for i, pair in enumerate(kv_caches) for j, t in enumerate(pair)
    )
    if block_major:
        return KV_LAYOUT_BLOCK_NHD
    if all(t.is_contiguous() for pair in kv_caches for t in pair):
        return KV_LAYOUT_NHD
    raise ValueError("kv_caches are neither contiguous per layer (layer-major) nor the "
                     "per-layer views of one block-major tensor")


def _intervals(kv_caches: KVCaches) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` byte intervals of all caches; raises if two overlap."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for pair in kv_caches
        for t in pair
    )
    for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise ValueError("KV cache tensors overlap in memory (a tensor used twice?)")
    return spans


def describe_kv_caches(agent_name: str, kv_caches: KVCaches) -> KVLayoutDescriptor:
    """Validate ``kv_caches`` and describe them for remote readers (layout detected by
    ``kv_layout_of``; raises ``ValueError`` as it does)."""
    shape, dtype = _check_kv_caches(kv_caches)
    layout = kv_layout_of(kv_caches)
    if layout == KV_LAYOUT_NHD:
        _intervals(kv_caches)
    num_blocks, block_size, num_kv_heads, head_dim = shape
    element_size = kv_caches[0][0].element_size()
    return KVLayoutDescriptor(
        agent_name=agent_name,
        num_layers=len(kv_caches),
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype_name(dtype),
        layout=layout,
        bytes_per_block=block_size * num_kv_heads * head_dim * element_size,
        k_base_addrs=tuple(k.data_ptr() for k, _ in kv_caches),
        v_base_addrs=tuple(v.data_ptr() for _, v in kv_caches),
    )


def registration_regions(kv_caches: KVCaches) -> list[tuple[int, int]]:
    """``(addr, num_bytes)`` regions covering all caches, adjacent tensors merged.

    Per-layer views of one big contiguous tensor collapse to a single region; a block-major
    cache is one region.
    """
    if kv_layout_of(kv_caches) == KV_LAYOUT_BLOCK_NHD:
        k0 = kv_caches[0][0]
        return [(k0.data_ptr(), k0.shape[0] * k0.stride(0) * k0.element_size())]
    regions: list[list[int]] = []
    for start, end in _intervals(kv_caches):
        if regions and regions[-1][1] == start:
            regions[-1][1] = end
        else:
            regions.append([start, end])
    return [(start, end - start) for start, end in regions]


def validate_block_ids(block_ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Raise ``ValueError`` unless every id is an int in ``[0, num_blocks)``."""
    for b in block_ids:
        if isinstance(b, bool) or not isinstance(b, int | np.integer):
            raise ValueError(f"{side} block id {b!r} is not an int")
        if not 0 <= b < num_blocks:
            raise ValueError(f"{side} block id {b} out of range [0, {num_blocks})")


def merge_block_runs(
    remote_block_ids: Sequence[int], local_block_ids: Sequence[int]
) -> list[BlockRun]:
    """Pair remote with local block ids and merge runs consecutive on BOTH sides.

    The pairs are taken in remote-id order (a READ's descriptors may come in any order), so
    blocks allocated in descending order on both sides — what the block managers hand out
    after a request's blocks were freed tail first — merge as well as ascending ones: remote
    ``[9, 8, 7]`` → local ``[5, 4, 3]`` is one run ``BlockRun(7, 3, 3)``, not three
    (``bench/README.md`` "KV hand-off": up to 15,360 descriptors for a 4k-token pull).

    Example: remote ``[4, 5, 6, 9]`` → local ``[0, 1, 7, 8]`` gives
    ``[BlockRun(4, 0, 2), BlockRun(6, 7, 1), BlockRun(9, 8, 1)]``.
    """
    if len(remote_block_ids) != len(local_block_ids):
        raise ValueError(
            f"{len(remote_block_ids)} remote block ids vs {len(local_block_ids)} local block ids"
        )
    runs: list[BlockRun] = []
    pairs = sorted(zip(remote_block_ids, local_block_ids, strict=True))
    for r, loc in pairs:
        r, loc = int(r), int(loc)
        if runs:
            last = runs[-1]
            if (
                r == last.remote_start + last.num_blocks
                and loc == last.local_start + last.num_blocks
            ):
                runs[-1] = last._replace(num_blocks=last.num_blocks + 1)
                continue
        runs.append(BlockRun(r, loc, 1))
    return runs


def run_descriptors(
    layout: KVLayoutDescriptor, starts: Sequence[int], counts: Sequence[int]
) -> np.ndarray:
    """NIXL descriptor rows ``(addr, num_bytes, dev_id=0)`` for block runs in ``layout``.

    Layer-major (``NHD``): rows are ordered ``layer-major, K then V, then run``, each
    ``count * bytes_per_block`` bytes. Block-major (``BLOCK_NHD``): one row per run,
    ``k_base_addrs[0] + start * block_stride_bytes``, ``count * block_stride_bytes`` bytes
    (every layer's K and V of those blocks). The local and remote lists of a transfer are
    built with the same ``counts`` (and layout) so row ``i`` of one matches row ``i`` of the
    other.

    Returns:
        shape: ``[2 * num_layers * len(starts), 3]`` (``NHD``) or ``[len(starts), 3]``
        (``BLOCK_NHD``), uint64.
    """
    if layout.is_block_major:
        stride = np.uint64(layout.block_stride_bytes)
        descs = np.zeros((len(counts), 3), dtype=np.uint64)
        descs[:, 0] = np.uint64(layout.k_base_addrs[0]) + np.asarray(starts, np.uint64) * stride
        descs[:, 1] = np.asarray(counts, dtype=np.uint64) * stride
        return descs
    bpb = np.uint64(layout.bytes_per_block)
    # bases: [2 * num_layers], (k_0, v_0, k_1, v_1, ...)
    bases = np.array(
        [a for kv in zip(layout.k_base_addrs, layout.v_base_addrs, strict=True) for a in kv],
        dtype=np.uint64,
    )
    offsets = np.asarray(starts, dtype=np.uint64) * bpb  # [num_runs]
    lengths = np.asarray(counts, dtype=np.uint64) * bpb  # [num_runs]
    descs = np.zeros((bases.size * offsets.size, 3), dtype=np.uint64)
    descs[:, 0] = (bases[:, None] + offsets[None, :]).reshape(-1)
    descs[:, 1] = np.broadcast_to(lengths, (bases.size, offsets.size)).reshape(-1)
    return descs
