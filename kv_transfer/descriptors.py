"""KV cache memory → NIXL descriptors: layout, registration regions, block runs.

Pure functions (torch + numpy, no NIXL) so they are unit-testable without agents.

A worker's cache is ``kv_caches: list[(k_cache, v_cache)]``, one pair per layer, each
``[num_blocks, block_size, num_kv_heads, head_dim]`` (``NHD``), contiguous, on CPU. The
tensors may be separate allocations or views into one big tensor; registration merges
adjacent ones into as few regions as possible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from scission.kv_transfer.handle import KV_LAYOUT_NHD, KVLayoutDescriptor

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
            if not t.is_contiguous():
                raise ValueError(f"{where}: must be contiguous")
    return shape, dtype


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
    """Validate ``kv_caches`` and describe them for remote readers."""
    shape, dtype = _check_kv_caches(kv_caches)
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
        layout=KV_LAYOUT_NHD,
        bytes_per_block=block_size * num_kv_heads * head_dim * element_size,
        k_base_addrs=tuple(k.data_ptr() for k, _ in kv_caches),
        v_base_addrs=tuple(v.data_ptr() for _, v in kv_caches),
    )


def registration_regions(kv_caches: KVCaches) -> list[tuple[int, int]]:
    """``(addr, num_bytes)`` regions covering all caches, adjacent tensors merged.

    Per-layer views of one big contiguous tensor collapse to a single region.
    """
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

    Rows are ordered ``layer-major, K then V, then run``; the local and remote lists of a
    transfer are built with the same ``counts`` so row ``i`` of one matches row ``i`` of
    the other.

    Returns:
        shape: ``[2 * num_layers * len(starts), 3]``, uint64.
    """
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
