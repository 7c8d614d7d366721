"""Shared fixtures for the kernel tests.

Without a GPU the kernels run under the Triton interpreter. ``triton.jit`` picks the
interpreter when a kernel is *decorated* (``scission.kernels.*`` import time), so the
variable is set here, before any test module imports a kernel; CI also exports it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Caches with more than 2**31 elements: int32 offset arithmetic would wrap. Reserved with
# torch.empty, so only the blocks a test touches are ever paged in.
BIG_NUM_ELEMS = 2**31 + 2**24


@dataclass
class PagedBatch:
    """One batch over a paged KV cache (metadata as in ``AttentionMetadata``)."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32
    query_lens: tuple[int, ...]
    scale: float

    @property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens)


@pytest.fixture
def device() -> torch.device:
    """CUDA when a GPU runs compiled kernels, else CPU (interpreter)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test id: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def make_paged_batch(gen: torch.Generator, device: torch.device) -> Callable[..., PagedBatch]:
    """Factory: random q and a random paged cache for the given ragged lengths.

    Request r's context is ``ctx_lens[r]`` cached tokens plus ``query_lens[r]`` new ones,
    on distinct random blocks; ``big=True`` makes the cache just over 2**31 elements.
    """

    def make(query_lens, ctx_lens, *, num_kv_heads, gqa, head_dim, block_size, dtype,
             big: bool = False) -> PagedBatch:
        seq_lens = [q + c for q, c in zip(query_lens, ctx_lens, strict=True)]
        blocks_per_req = [-(-s // block_size) for s in seq_lens]
        needed = sum(blocks_per_req)
        num_blocks = BIG_NUM_ELEMS // (block_size * num_kv_heads * head_dim) if big else needed + 3
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        ids = _pick_block_ids(shape[0], needed, big, gen)
        k_cache, v_cache = (_make_cache(shape, ids, big, dtype, gen, device) for _ in range(2))
        table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
        for r, chunk in enumerate(ids.split(blocks_per_req)):
            table[r, : len(chunk)] = chunk
        q = torch.randn(sum(query_lens), num_kv_heads * gqa, head_dim, generator=gen)
        cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
        return PagedBatch(
            q.to(device, dtype), k_cache, v_cache, table.to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), cu.to(device),
            tuple(query_lens), head_dim**-0.5,
        )

    return make


def _pick_block_ids(num_blocks: int, needed: int, big: bool, gen: torch.Generator):
    """Distinct random block ids; for huge caches, drawn from the top of the range."""
    if not big:
        return torch.randperm(num_blocks, generator=gen)[:needed].to(torch.int32)
    top = torch.randperm(4 * needed, generator=gen)[:needed]
    return (num_blocks - 1 - top).to(torch.int32)


def _make_cache(shape, ids, big, dtype, gen, device) -> torch.Tensor:
    """A random cache; a huge one is only reserved and its blocks ``ids`` filled."""
    if not big:
        return torch.randn(shape, generator=gen).to(device, dtype)
    try:
        cache = torch.empty(shape, dtype=dtype, device=device)
    except RuntimeError as e:  # cannot reserve the address space: nothing to test
        pytest.skip(f"cannot reserve a {shape} cache: {e}")
    fill = torch.randn(len(ids), *shape[1:], generator=gen)
    cache[ids.to(device).long()] = fill.to(device, dtype)
    return cache
