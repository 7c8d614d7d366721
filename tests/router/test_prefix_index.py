"""PrefixIndex: leading-block matching, watch changes, snapshots, speculative TTL; PromptHasher."""

from __future__ import annotations

import msgpack

from scission.engine.block_hash import hash_prompt_blocks, hash_seed
from scission.registry.kv_index_watch import ChangeKind, IndexChange
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.prefix_index import PrefixIndex, PromptBlocks, PromptHasher

STORED, REMOVED = ChangeKind.STORED, ChangeKind.REMOVED


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def make_index(ttl_s: float = 2.0, **entries: list[int]) -> tuple[PrefixIndex, FakeClock]:
    clock = FakeClock()
    index = PrefixIndex(ttl_s, clock)
    index.reset(set(entries), {w: set(h) for w, h in entries.items()})
    return index, clock


def make_info(worker_id: str, model_id: str = "tiny-llama", block_size: int = 4) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.PREFILL, endpoint="127.0.0.1:1",
                      agent_name="a", agent_metadata=b"", kv_layout=msgpack.packb({}),
                      num_blocks=8, block_size=block_size, model_id=model_id,
                      started_at_s=0.0)


def test_match_counts_leading_blocks_per_worker():
    """Each worker's count stops at its first missing block; later blocks do not count."""
    index, _ = make_index(a=[1, 2, 3, 5], b=[1, 2], c=[2, 3])
    assert index.match([1, 2, 3, 4, 5]) == {"a": 3, "b": 2}
    assert index.match([2, 3]) == {"a": 2, "b": 1, "c": 2}
    assert index.match([9, 1]) == {}
    assert index.match([]) == {}
    assert index.match([5]) == {"a": 1}


def test_apply_changes_in_order():
    """STORED adds, REMOVED removes (unknown removals are no-ops), WORKER_REMOVED drops."""
    index, _ = make_index()
    index.apply([IndexChange(STORED, "a", 1), IndexChange(STORED, "a", 2),
                 IndexChange(STORED, "b", 1), IndexChange(REMOVED, "a", 2),
                 IndexChange(REMOVED, "b", 77), IndexChange(ChangeKind.WORKER_ADDED, "c")])
    assert index.match([1, 2]) == {"a": 1, "b": 1}
    assert index.worker_block_counts() == {"a": 1, "b": 1}
    assert index.num_blocks == 1
    index.apply([IndexChange(ChangeKind.WORKER_REMOVED, "a")])
    assert index.match([1]) == {"b": 1}
    assert index.hashes_of("a") == frozenset()
    assert index.num_changes_applied == 7


def test_reset_replaces_confirmed_entries_and_keeps_listed_workers_speculation():
    """A snapshot replaces confirmed entries; speculative entries survive for workers still
    registered and are dropped for the others."""
    index, _ = make_index(a=[1], b=[2])
    index.insert_speculative("a", [7])
    index.insert_speculative("b", [8])
    index.reset({"a"}, {"a": {3}})
    assert index.match([1]) == {}
    assert index.match([3]) == {"a": 1}
    assert index.match([7]) == {"a": 1}
    assert index.match([8]) == {}
    assert index.worker_block_counts() == {"a": 1}


def test_speculative_entries_expire_after_the_ttl():
    """An entry inserted at t lives until t + ttl (exclusive); re-inserting refreshes it."""
    index, clock = make_index(ttl_s=2.0, b=[1])
    index.insert_speculative("a", [1, 2, 3])
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 1}
    clock.now_s += 1.5
    index.insert_speculative("a", [1, 2])  # refresh the first two blocks only
    clock.now_s += 0.5  # the first insertion expires now
    assert index.match([1, 2, 3]) == {"a": 2, "b": 1}
    assert index.num_speculative == 2
    clock.now_s += 1.5  # the refresh expires
    assert index.match([1, 2, 3]) == {"b": 1}
    assert index.num_speculative == 0


def test_speculative_and_confirmed_entries_combine():
    """A worker's leading run may mix confirmed and speculative blocks."""
    index, _ = make_index(a=[1, 2])
    index.insert_speculative("a", [1, 2, 3, 4])
    assert index.match([1, 2, 3, 4, 5]) == {"a": 4}


def test_ttl_zero_disables_speculation():
    """speculative_ttl_s = 0 inserts nothing."""
    index, _ = make_index(ttl_s=0.0)
    index.insert_speculative("a", [1])
    assert index.match([1]) == {} and index.num_speculative == 0


def test_dropped_worker_bit_is_reused_without_stale_entries():
    """A new worker that takes a dropped worker's bit sees none of its entries."""
    index, _ = make_index(a=[1], b=[2])
    index.insert_speculative("a", [5])
    index.drop_worker("a")
    index.apply([IndexChange(STORED, "c", 9)])
    assert index.match([1]) == {} and index.match([5]) == {}
    assert index.match([9]) == {"c": 1} and index.match([2]) == {"b": 1}


def test_prompt_hasher_uses_the_workers_seed_and_block_size():
    """Hashes equal engine.block_hash with the workers' model id and block size."""
    tokens = list(range(11))
    hasher = PromptHasher(lambda: [make_info("w0"), make_info("w1")])
    expected = hash_prompt_blocks(hash_seed("tiny-llama"), tokens, 4)
    assert hasher(tokens) == PromptBlocks(4, expected) and len(expected) == 2
    other = PromptHasher(lambda: [make_info("w0", model_id="other", block_size=8)])
    assert other(tokens) == PromptBlocks(8, hash_prompt_blocks(hash_seed("other"), tokens, 8))
    assert PromptHasher(lambda: [])(tokens) == PromptBlocks(0, [])
