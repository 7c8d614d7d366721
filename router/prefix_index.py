"""The router's in-memory prefix index: block hash -> workers holding it (DESIGN: KV index).

Fed by ``cluster.kv_index_watch.KVIndexWatcher`` (etcd snapshot + watch) on its thread; read
by placement on request threads without touching etcd. Workers are bits of an int mask, so one
dict entry per block serves any number of workers and ``match`` is an AND per prompt block.

Speculative entries: when the router places a request it inserts the prompt's block hashes for
the chosen worker with a TTL (``PlacementConfig.speculative_ttl_s``), so a burst of same-prefix
requests lands on the same worker before that worker's KV events come back through etcd.

``PromptHasher`` computes a prompt's block hashes exactly as the workers do (seed from
``WorkerInfo.model_id``, ``WorkerInfo.block_size``; ``engine.block_hash``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from scission.engine.block_hash import hash_prompt_blocks, hash_seed
from scission.engine.multimodal import MMInput, block_extra_keys
from scission.registry.kv_index_watch import ChangeKind, IndexChange
from scission.registry.workers import WorkerInfo

logger = logging.getLogger(__name__)


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    """block_hash -> set of worker_ids (as a bit mask), plus each worker's set of hashes.

    Args:
        speculative_ttl_s: lifetime of ``insert_speculative`` entries (0 = never insert).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, speculative_ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.speculative_ttl_s = speculative_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._bit: dict[str, int] = {}  # worker_id -> bit number
        self._worker_of_bit: dict[int, str] = {}
        self._free_bits: list[int] = []
        self._holders: dict[int, int] = {}  # block_hash -> mask of workers (from etcd)
        self._hashes: dict[str, set[int]] = {}  # worker_id -> its block hashes (from etcd)
        self._spec_mask: dict[int, int] = {}  # block_hash -> mask of speculative holders
        self._spec_expiry: dict[int, dict[int, float]] = {}  # bit -> block_hash -> expiry
        self._spec_queue: collections.deque[tuple[float, int, tuple[int, ...]]] = \
            collections.deque()  # (expiry, bit, hashes) in insertion (= expiry) order
        self.num_changes_applied = 0
        self.num_resets = 0

    # -- sink (watch thread) -------------------------------------------------------------
    def reset(self, workers: set[str], entries: Mapping[str, set[int]]) -> None:
        """Replace the confirmed contents (an etcd snapshot). Speculative entries of workers
        in ``workers`` are kept; those of other workers are dropped."""
        with self._lock:
            for worker_id in [w for w in self._bit if w not in workers and w not in entries]:
                self._drop(worker_id)
            self._holders.clear()
            self._hashes = {w: set(hashes) for w, hashes in entries.items()}
            for worker_id, hashes in self._hashes.items():
                flag = 1 << self._bit_of(worker_id)
                holders = self._holders
                for h in hashes:
                    holders[h] = holders.get(h, 0) | flag
            self.num_resets += 1

    def apply(self, changes: Sequence[IndexChange]) -> None:
        """Apply watch changes in order (``WORKER_REMOVED`` drops the worker at once)."""
        with self._lock:
            for change in changes:
                match change.kind:
                    case ChangeKind.STORED:
                        self._store(change.worker_id, change.block_hash)
                    case ChangeKind.REMOVED:
                        self._remove(change.worker_id, change.block_hash)
                    case ChangeKind.WORKER_ADDED:
                        pass  # entries arrive as STORED; nothing to do until then
                    case ChangeKind.WORKER_REMOVED:
                        self._drop(change.worker_id)
                    case _:
                        raise ValueError(f"unknown index change {change.kind!r}")
            self.num_changes_applied += len(changes)

    def drop_worker(self, worker_id: str) -> None:
        """Forget every entry of ``worker_id``, confirmed and speculative."""
        with self._lock:
            self._drop(worker_id)

    # -- router (request threads) --------------------------------------------------------
    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker_id -> number of leading ``block_hashes`` the worker holds (confirmed or
        speculative); workers with no leading hit are absent. Never touches etcd."""
        hits: dict[str, int] = {}
        if not block_hashes:
            return hits
        with self._lock:
            self._expire(self._clock())
            holders, spec = self._holders, self._spec_mask
            alive = holders.get(block_hashes[0], 0) | spec.get(block_hashes[0], 0)
            for i in range(1, len(block_hashes)):
                if not alive:
                    break
                h = block_hashes[i]
                mask = holders.get(h, 0) | spec.get(h, 0)
                lost = alive & ~mask
                if lost:
                    hits.update((self._worker_of_bit[b], i) for b in _bits(lost))
                    alive &= mask
            hits.update((self._worker_of_bit[b], len(block_hashes)) for b in _bits(alive))
        return hits

    def insert_speculative(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        """Pretend ``worker_id`` holds ``block_hashes`` for ``speculative_ttl_s`` seconds."""
        if not block_hashes or self.speculative_ttl_s <= 0:
            return
        with self._lock:
            now = self._clock()
            self._expire(now)
            bit = self._bit_of(worker_id)
            expiry = now + self.speculative_ttl_s
            hashes = tuple(block_hashes)
            self._spec_expiry.setdefault(bit, {}).update(dict.fromkeys(hashes, expiry))
            flag, spec = 1 << bit, self._spec_mask
            for h in hashes:
                spec[h] = spec.get(h, 0) | flag
            self._spec_queue.append((expiry, bit, hashes))

    # -- introspection ----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Distinct block hashes held by at least one worker (confirmed entries)."""
        with self._lock:
            return len(self._holders)

    def worker_block_counts(self) -> dict[str, int]:
        """worker_id -> confirmed blocks it holds."""
        with self._lock:
            return {w: len(hashes) for w, hashes in self._hashes.items() if hashes}

    def hashes_of(self, worker_id: str) -> frozenset[int]:
        with self._lock:
            return frozenset(self._hashes.get(worker_id, ()))

    @property
    def num_speculative(self) -> int:
        """Live (unexpired) speculative (block, worker) entries."""
        with self._lock:
            self._expire(self._clock())
            return sum(len(entries) for entries in self._spec_expiry.values())

    # -- internals (lock held) ----------------------------------------------------------
    def _bit_of(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else len(self._bit)
            self._bit[worker_id] = bit
            self._worker_of_bit[bit] = worker_id
        return bit

    def _store(self, worker_id: str, block_hash: int) -> None:
        flag = 1 << self._bit_of(worker_id)
        self._hashes.setdefault(worker_id, set()).add(block_hash)
        self._holders[block_hash] = self._holders.get(block_hash, 0) | flag

    def _remove(self, worker_id: str, block_hash: int) -> None:
        hashes = self._hashes.get(worker_id)
        if hashes is None or block_hash not in hashes:
            return
        hashes.discard(block_hash)
        mask = self._holders[block_hash] & ~(1 << self._bit[worker_id])
        if mask:
            self._holders[block_hash] = mask
        else:
            del self._holders[block_hash]

    def _drop(self, worker_id: str) -> None:
        bit = self._bit.pop(worker_id, None)
        if bit is None:
            return
        keep = ~(1 << bit)
        for h in self._hashes.pop(worker_id, ()):
            mask = self._holders[h] & keep
            if mask:
                self._holders[h] = mask
            else:
                del self._holders[h]
        for h in self._spec_expiry.pop(bit, {}):
            self._clear_spec_bit(h, keep)
        self._spec_queue = collections.deque(e for e in self._spec_queue if e[1] != bit)
        del self._worker_of_bit[bit]
        self._free_bits.append(bit)

    def _expire(self, now: float) -> None:
        queue = self._spec_queue
        while queue and queue[0][0] <= now:
            expiry, bit, hashes = queue.popleft()
            keep, entries = ~(1 << bit), self._spec_expiry.get(bit, {})
            for h in hashes:
                if entries.get(h) == expiry:  # not refreshed since
                    del entries[h]
                    self._clear_spec_bit(h, keep)

    def _clear_spec_bit(self, block_hash: int, keep: int) -> None:
        mask = self._spec_mask.get(block_hash, 0) & keep
        if mask:
            self._spec_mask[block_hash] = mask
        else:
            self._spec_mask.pop(block_hash, None)


class PromptBlocks(NamedTuple):
    block_size: int  # tokens per block of the serving workers (0 = no worker known)
    block_hashes: list[int]  # one per full block of the prompt


class PromptHasher:
    """A prompt's block hashes as the workers compute them.

    ``workers()`` returns the registered workers; the first one's ``model_id`` (hash seed) and
    ``block_size`` are used (a deployment serves one model; a mismatch is logged once).
    """

    def __init__(self, workers: Callable[[], list[WorkerInfo]]) -> None:
        self._workers = workers
        self._seeds: dict[str, bytes] = {}
        self._warned = False

    def __call__(self, token_ids: Sequence[int],
                 segments: Sequence[tuple[int, int, bytes]] = ()) -> PromptBlocks:
        """``segments``: the prompt's images as ``(offset, length, image_hash)``: their hashes
        key the blocks they overlap, as on the workers (``engine.multimodal``)."""
        workers = self._workers()
        if not workers:
            return PromptBlocks(0, [])
        first = workers[0]
        if not self._warned and any((w.model_id, w.block_size) != (first.model_id,
                                                                   first.block_size)
                                    for w in workers):
            self._warned = True
            logger.warning("workers disagree on model_id/block_size; hashing with %s/%d",
                           first.model_id, first.block_size)
        seed = self._seeds.get(first.model_id)
        if seed is None:
            seed = self._seeds[first.model_id] = hash_seed(first.model_id)
        extra = block_extra_keys([MMInput(o, n, h, ()) for o, n, h in segments],
                                 len(token_ids) // first.block_size, first.block_size) \
            if segments else ()
        return PromptBlocks(first.block_size,
                            hash_prompt_blocks(seed, token_ids, first.block_size, (), extra))
