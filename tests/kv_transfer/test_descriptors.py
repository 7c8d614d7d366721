"""KV cache → NIXL descriptors, without NIXL: layout, regions, runs, UCX env defaults."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from scission.kv_transfer.descriptors import (
    BlockRun,
    describe_kv_caches,
    kv_layout_of,
    merge_block_runs,
    registration_regions,
    run_descriptors,
    validate_block_ids,
)
from scission.kv_transfer.handle import KV_LAYOUT_BLOCK_NHD, KV_LAYOUT_NHD
from scission.kv_transfer.ucx import HOST_ONLY_UCX_TLS, configure_ucx_env

logger = logging.getLogger(__name__)

# shape: [num_blocks, block_size, num_kv_heads, head_dim]
SHAPE = (10, 4, 2, 8)


def separate_caches(num_layers: int = 3, dtype: torch.dtype = torch.bfloat16) -> list:
    return [
        (torch.zeros(SHAPE, dtype=dtype), torch.zeros(SHAPE, dtype=dtype))
        for _ in range(num_layers)
    ]


def view_caches(num_layers: int = 3) -> tuple[torch.Tensor, list]:
    big = torch.zeros((num_layers, 2, *SHAPE), dtype=torch.float32)
    return big, [(big[layer, 0], big[layer, 1]) for layer in range(num_layers)]


def test_merge_block_runs_merges_only_runs_consecutive_on_both_sides() -> None:
    """A run is merged only when remote AND local ids both step by one (taken in remote-id
    order, so runs descending on both sides merge too)."""
    assert merge_block_runs([4, 5, 6, 9], [0, 1, 7, 8]) == [
        BlockRun(4, 0, 2),
        BlockRun(6, 7, 1),
        BlockRun(9, 8, 1),
    ]
    assert merge_block_runs([3, 4, 5], [7, 8, 9]) == [BlockRun(3, 7, 3)]
    assert merge_block_runs([5, 4], [0, 1]) == [BlockRun(4, 1, 1), BlockRun(5, 0, 1)]
    # descending on both sides (blocks freed tail first, then allocated): one run
    assert merge_block_runs([9, 8, 7, 2], [5, 4, 3, 0]) == [BlockRun(2, 0, 1),
                                                            BlockRun(7, 3, 3)]
    assert merge_block_runs([], []) == []
    with pytest.raises(ValueError, match="2 remote block ids vs 1 local"):
        merge_block_runs([1, 2], [1])


def test_describe_kv_caches() -> None:
    """Layout fields come from the tensors; addresses are each layer's block 0."""
    caches = separate_caches()
    layout = describe_kv_caches("w:1", caches)
    assert (layout.num_layers, layout.num_blocks, layout.block_size) == (3, 10, 4)
    assert (layout.num_kv_heads, layout.head_dim, layout.dtype) == (2, 8, "bfloat16")
    assert layout.bytes_per_block == 4 * 2 * 8 * 2
    assert layout.k_base_addrs == tuple(k.data_ptr() for k, _ in caches)
    assert layout.v_base_addrs == tuple(v.data_ptr() for _, v in caches)


def test_views_of_one_tensor_register_as_one_region() -> None:
    """Per-layer views of one contiguous tensor collapse into a single region."""
    big, caches = view_caches()
    assert registration_regions(caches) == [(big.data_ptr(), big.numel() * 4)]


def test_separate_tensors_cover_exactly_their_bytes() -> None:
    """Separate allocations give ≤ 2L regions that cover exactly the caches' bytes."""
    caches = separate_caches()
    regions = registration_regions(caches)
    assert 1 <= len(regions) <= 6
    assert sum(size for _, size in regions) == 6 * int(np.prod(SHAPE)) * 2


@pytest.mark.parametrize(
    "caches, match",
    [
        ([], "empty"),
        ([(torch.zeros(SHAPE), torch.zeros(SHAPE).transpose(0, 1))], "shape"),
        ([(torch.zeros(SHAPE), torch.zeros(SHAPE, dtype=torch.float16))], "float16"),
        ([(torch.zeros(SHAPE), torch.zeros(SHAPE[:3]))], "shape"),
        ([(torch.zeros(SHAPE)[:, :2], torch.zeros(SHAPE)[:, :2])], "contiguous"),
    ],
)
def test_describe_rejects_bad_caches(caches: list, match: str) -> None:
    """Empty, mismatched or non-contiguous caches are a ValueError."""
    with pytest.raises(ValueError, match=match):
        describe_kv_caches("w:1", caches)


def test_describe_rejects_aliased_tensors() -> None:
    """The same tensor as K and V (overlapping memory) is rejected."""
    t = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="overlap"):
        describe_kv_caches("w:1", [(t, t)])


def test_run_descriptors_rows() -> None:
    """Rows are layer-major, K then V, then run: (base + start * bpb, count * bpb, 0)."""
    _, caches = view_caches(num_layers=2)
    layout = describe_kv_caches("w:1", caches)
    bpb = layout.bytes_per_block
    descs = run_descriptors(layout, starts=[3, 7], counts=[2, 1])
    expected = [
        (base + start * bpb, count * bpb, 0)
        for base in (caches[0][0].data_ptr(), caches[0][1].data_ptr(),
                     caches[1][0].data_ptr(), caches[1][1].data_ptr())
        for start, count in ((3, 2), (7, 1))
    ]  # fmt: skip
    assert descs.dtype == np.uint64
    assert [tuple(int(x) for x in row) for row in descs] == expected


def block_major_caches(num_layers: int = 3) -> tuple[torch.Tensor, list]:
    """``[num_blocks, num_layers, 2, block_size, H, D]`` float32 and its per-layer views."""
    big = torch.zeros((SHAPE[0], num_layers, 2, *SHAPE[1:]), dtype=torch.float32)
    return big, [(big[:, layer, 0], big[:, layer, 1]) for layer in range(num_layers)]


def test_block_major_layout_and_one_region() -> None:
    """Strided per-layer views of one block-major tensor are recognised as BLOCK_NHD:
    per-layer addresses K_0 V_0 K_1 ... one block apart, a block stride of 2L blocks' worth,
    and the whole tensor is one registration region."""
    big, caches = block_major_caches()
    bpb = 4 * 2 * 8 * 4  # block_size * H * D * float32
    layout = describe_kv_caches("w:1", caches)
    assert (layout.layout, layout.bytes_per_block, layout.block_stride_bytes) == (
        KV_LAYOUT_BLOCK_NHD, bpb, 6 * bpb)
    base = big.data_ptr()
    assert layout.k_base_addrs == (base, base + 2 * bpb, base + 4 * bpb)
    assert layout.v_base_addrs == (base + bpb, base + 3 * bpb, base + 5 * bpb)
    assert registration_regions(caches) == [(base, big.numel() * 4)]
    assert kv_layout_of(view_caches()[1]) == kv_layout_of(separate_caches()) == KV_LAYOUT_NHD


def test_block_major_descriptors_one_per_merged_run() -> None:
    """A fragmented block list in block-major: one row per run merged on both sides, at
    base + start * (2L * bpb), count * 2L * bpb bytes long (hand-computed); the local and
    remote lists have the same row count and lengths."""
    remote_big, remote = block_major_caches()
    local_big, local = block_major_caches()
    runs = merge_block_runs([9, 3, 4, 5, 1], [0, 7, 8, 9, 2])  # 3 runs: (1->2), (3..5->7..9), (9->0)
    assert len(runs) == 3
    rdescs = run_descriptors(describe_kv_caches("r", remote), [r.remote_start for r in runs],
                             [r.num_blocks for r in runs])
    ldescs = run_descriptors(describe_kv_caches("l", local), [r.local_start for r in runs],
                             [r.num_blocks for r in runs])
    stride = 2 * 3 * 256  # K and V of 3 layers, bpb = 4 * 2 * 8 * 4 B
    rb, lb = remote_big.data_ptr(), local_big.data_ptr()
    assert [tuple(int(x) for x in row) for row in rdescs] == [
        (rb + 1 * stride, 1 * stride, 0), (rb + 3 * stride, 3 * stride, 0),
        (rb + 9 * stride, 1 * stride, 0)]
    assert [tuple(int(x) for x in row) for row in ldescs] == [
        (lb + 2 * stride, 1 * stride, 0), (lb + 7 * stride, 3 * stride, 0),
        (lb + 0 * stride, 1 * stride, 0)]


def test_neither_layout_is_refused() -> None:
    """Per-layer tensors that are neither contiguous nor block-major views (here every other
    block of a layer-major cache) are refused, not described wrongly."""
    big, _ = view_caches()
    with pytest.raises(ValueError, match="neither contiguous per layer"):
        describe_kv_caches("w:1", [(big[i, 0, ::2], big[i, 1, ::2]) for i in range(3)])


def test_validate_block_ids() -> None:
    """Ids must be ints in [0, num_blocks)."""
    validate_block_ids([0, 9, np.int64(5)], 10, "remote")
    for bad, match in (([10], "out of range"), ([-1], "out of range"), ([True], "not an int"),
                       ([1.0], "not an int")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            validate_block_ids(bad, 10, "remote")


def test_configure_ucx_env_sets_defaults_only_when_needed() -> None:
    """Host-only: UCX_TLS defaults to tcp,cma,self; an explicit value or an accelerated
    host (RDMA/GPU) leaves the environment alone."""
    env: dict[str, str] = {}
    assert configure_ucx_env(env, accelerated=False) == {"UCX_TLS": HOST_ONLY_UCX_TLS}
    assert env == {"UCX_TLS": "tcp,cma,self"}
    env = {"UCX_TLS": "tcp"}
    assert configure_ucx_env(env, accelerated=False) == {}
    assert env == {"UCX_TLS": "tcp"}
    env = {}
    assert configure_ucx_env(env, accelerated=True) == {}
    assert env == {}


def test_blocks_reused_after_a_free_pull_as_one_run() -> None:
    """Real block managers on both sides of a busy cluster (every block used once, then freed
    tail first, as ``BlockManager.free`` does): the next request's 8 blocks come back in
    descending order on both sides, and its pull is one run per layer and K/V, not 8."""
    from scission.engine.block_hash import hash_seed
    from scission.engine.block_manager import BlockManager

    tables = []
    for num_blocks in (32, 40):  # the two sides hold different block ids
        bm = BlockManager(num_blocks, 16, hash_seed("m"), enable_prefix_caching=False)
        first: list[int] = []
        bm.allocate("first", first, 16 * num_blocks)
        bm.free("first", first)
        table: list[int] = []
        bm.allocate("next", table, 16 * 8)
        tables.append(table)
    remote, local = tables
    assert remote == list(range(31, 23, -1)) and local == list(range(39, 31, -1))
    assert merge_block_runs(remote, local) == [BlockRun(24, 32, 8)]
