"""Paged KV block allocation with reference counts and an LRU prefix cache.

Follows vLLM v1's ``KVCacheManager`` / ``BlockPool``: every block has a ``ref_cnt``;
a block whose ``ref_cnt`` drops to 0 goes to the tail of the free queue but keeps its
hash, so a later request with the same prefix can take it back (a prefix-cache hit).
Allocation pops the head of the free queue (least recently freed), evicting its hash.
Requests free their blocks in reverse order, so a request's tail blocks are evicted
before its head blocks (shared prefixes survive longest).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from scission.engine.block_hash import hash_prompt_blocks
from scission.engine.kv_events import KVEvent, KVEventKind
from scission.engine.multimodal import MMInput, block_extra_keys


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` tokens.

    Capacity shortfall returns ``None`` (the scheduler preempts); it never raises.
    """

    def __init__(
        self, num_blocks: int, block_size: int, hash_seed: bytes, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block_hash -> block_id
        self._req_hashes: dict[str, list[int]] = {}  # request_id -> hashes of its full blocks
        self._events: list[KVEvent] = []
        self._event_ids = itertools.count()

    # -- queries ------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (free, cached-but-unreferenced included)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def cached_prefix(self, token_ids: list[int], mm_inputs: Sequence[MMInput] = (),
                      max_blocks: int | None = None) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids``.

        At most ``max_blocks``, by default ``(len(token_ids) - 1) // block_size`` blocks: the
        last prompt token is always computed so the model produces logits for it (a decode
        worker receiving a prompt's KV needs no logits and may take every full block).
        ``mm_inputs``: the request's images, whose hashes key the blocks they overlap.
        """
        if not self.enable_prefix_caching:
            return []
        if max_blocks is None:
            max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = hash_prompt_blocks(self.hash_seed, token_ids[: max_blocks * self.block_size],
                                    self.block_size, (), self._extra_keys(mm_inputs, max_blocks))
        hit: list[int] = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    # -- allocation ---------------------------------------------------------------
    def allocate(self, request_id: str, block_table: list[int], num_tokens: int,
                 prefix_blocks: list[int] = ()) -> list[int] | None:
        """Grow ``block_table`` so it covers ``num_tokens`` tokens.

        Args:
            block_table: the request's current table (extended in place on success).
            prefix_blocks: cached blocks to take first (only when ``block_table`` is empty).
        Returns:
            The newly allocated block ids, or ``None`` if there are not enough free blocks
            (nothing changes then).
        """
        num_needed = -(-num_tokens // self.block_size) - len(block_table) - len(prefix_blocks)
        reusable = sum(1 for b in prefix_blocks if self.blocks[b].ref_cnt == 0)
        if num_needed > self.num_free_blocks - reusable:
            return None
        for b in prefix_blocks:
            self._touch(b)
        block_table.extend(prefix_blocks)
        new = [self._pop_free() for _ in range(max(num_needed, 0))]
        block_table.extend(new)
        if prefix_blocks:
            self._req_hashes[request_id] = [self.blocks[b].block_hash for b in prefix_blocks]
        return new

    def free(self, request_id: str, block_table: list[int]) -> None:
        """Drop the request's references; tail blocks become evictable first."""
        for b in reversed(block_table):
            block = self.blocks[b]
            assert block.ref_cnt > 0, f"double free of block {b}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[b] = None
        block_table.clear()
        self._req_hashes.pop(request_id, None)

    def cache_full_blocks(self, request_id: str, block_table: list[int], token_ids: list[int],
                          num_computed_tokens: int, mm_inputs: Sequence[MMInput] = ()) -> None:
        """Register hashes of the request's blocks that are full and computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(block_table))
        hashes = self._req_hashes.setdefault(request_id, [])
        if num_full <= len(hashes):
            return
        hashes[:] = hash_prompt_blocks(self.hash_seed, token_ids[: num_full * self.block_size],
                                       self.block_size, hashes,
                                       self._extra_keys(mm_inputs, num_full))
        stored = []
        for b, h in zip(block_table, hashes, strict=False):
            block = self.blocks[b]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = b
                stored.append(h)
        if stored:
            self._emit(KVEventKind.STORED, stored)

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block.

        Emits ``CLEARED`` and then ``STORED`` with the hashes still cached in referenced blocks
        (they keep their hashes), so a consumer that applies CLEARED as "forget everything"
        ends up with exactly ``_cached`` again.
        """
        for b in self._free:
            self._uncache(self.blocks[b], emit=False)
        self._emit(KVEventKind.CLEARED, [])
        if self._cached:
            self._emit(KVEventKind.STORED, list(self._cached))

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # -- internals ----------------------------------------------------------------
    def _extra_keys(self, mm_inputs: Sequence[MMInput], num_blocks: int) -> list[bytes]:
        return block_extra_keys(mm_inputs, num_blocks, self.block_size) if mm_inputs else []

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self._free[block_id]
        block.ref_cnt += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._uncache(block, emit=True)
        block.ref_cnt = 1
        return block_id

    def _uncache(self, block: Block, emit: bool) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
            if emit:
                self._emit(KVEventKind.REMOVED, [block.block_hash])
        block.block_hash = None

    def _emit(self, kind: KVEventKind, hashes: list[int]) -> None:
        self._events.append(KVEvent(next(self._event_ids), kind, tuple(hashes)))
