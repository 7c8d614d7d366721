"""BlockManager: exact block ids, LRU eviction order, prefix reuse and KV events."""

from __future__ import annotations

from scission.engine.block_hash import hash_prompt_blocks, hash_seed
from scission.engine.block_manager import BlockManager
from scission.engine.kv_events import KVEvent, KVEventKind

BLOCK_SIZE = 4
SEED = hash_seed("tiny-llama")
STORED, REMOVED, CLEARED = KVEventKind.STORED, KVEventKind.REMOVED, KVEventKind.CLEARED


def make_manager(num_blocks: int = 8, block_size: int = BLOCK_SIZE,
                 enable_prefix_caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks, block_size, SEED, enable_prefix_caching)


def make_tokens(num_tokens: int, start: int = 1000) -> list[int]:
    return list(range(start, start + num_tokens))


def hashes_of(tokens: list[int]) -> list[int]:
    return hash_prompt_blocks(SEED, tokens, BLOCK_SIZE)


def run_request(bm: BlockManager, request_id: str, tokens: list[int]) -> list[int]:
    """Admit like the scheduler (cached prefix first), compute everything, cache full blocks."""
    table: list[int] = []
    prefix = bm.cached_prefix(tokens)
    assert bm.allocate(request_id, table, len(tokens), prefix) is not None
    bm.cache_full_blocks(request_id, table, tokens, len(tokens))
    return table


def test_allocation_takes_exact_block_ids_in_order():
    """Fresh blocks come from the head of the free queue: 0, 1, 2, then 3, 4."""
    bm = make_manager()
    a: list[int] = []
    assert bm.allocate("a", a, 10) == [0, 1, 2] and a == [0, 1, 2]
    b: list[int] = []
    assert bm.allocate("b", b, 5) == [3, 4] and b == [3, 4]
    assert bm.allocate("a", a, 13) == [5] and a == [0, 1, 2, 5]  # grow in place
    assert bm.allocate("a", a, 16) == [] and a == [0, 1, 2, 5]  # still covered
    assert bm.num_free_blocks == 2
    assert [bm.blocks[i].ref_cnt for i in range(8)] == [1, 1, 1, 1, 1, 1, 0, 0]


def test_free_restores_counts_and_keeps_hashes():
    """After every request is freed all blocks are allocatable again, ref counts are 0 and the
    full blocks stay cached (a later prompt can hit them)."""
    bm = make_manager()
    tokens = make_tokens(14)
    table = run_request(bm, "a", tokens)
    assert table == [0, 1, 2, 3] and bm.num_free_blocks == 4
    bm.free("a", table)
    assert table == []
    assert bm.num_free_blocks == 8
    assert all(b.ref_cnt == 0 for b in bm.blocks)
    assert bm.num_cached_blocks == 3  # 14 tokens = 3 full blocks
    assert bm.cached_prefix(tokens) == [0, 1, 2]


def test_eviction_is_lru_and_tail_of_request_first():
    """A freed request's blocks are evicted tail first (blocks 2, 1, 0), and only after every
    never-cached free block was used; each eviction emits one REMOVED with that hash."""
    bm = make_manager()
    tokens = make_tokens(12)
    h = hashes_of(tokens)
    bm.free("a", run_request(bm, "a", tokens))
    assert bm.take_events() == [KVEvent(0, STORED, tuple(h))]
    other: list[int] = []
    assert bm.allocate("b", other, 20) == [3, 4, 5, 6, 7]  # no eviction yet
    assert bm.take_events() == []
    evicted_blocks = []
    for i in range(3):
        table: list[int] = []
        evicted_blocks += bm.allocate(f"c{i}", table, 1)
    assert evicted_blocks == [2, 1, 0]
    assert bm.take_events() == [KVEvent(1, REMOVED, (h[2],)), KVEvent(2, REMOVED, (h[1],)),
                                KVEvent(3, REMOVED, (h[0],))]
    assert bm.num_cached_blocks == 0


def test_recently_freed_request_survives_longer():
    """LRU across requests: blocks of the request freed first are evicted first."""
    bm = make_manager(num_blocks=4)
    old, new = make_tokens(8, start=0), make_tokens(8, start=500)
    bm.free("old", run_request(bm, "old", old))
    bm.free("new", run_request(bm, "new", new))  # takes blocks 2, 3; queue: 1, 0, 3, 2
    bm.take_events()
    table: list[int] = []
    assert bm.allocate("x", table, 8) == [1, 0]
    assert bm.take_events() == [KVEvent(2, REMOVED, (hashes_of(old)[1],)),
                                KVEvent(3, REMOVED, (hashes_of(old)[0],))]
    assert bm.cached_prefix(new + [1]) == [2, 3]


def test_prefix_reuse_shares_blocks_and_counts_references():
    """A second request with the same 3-block prefix takes blocks 0-2 (ref_cnt 2) plus one new
    block; the shared blocks become free only when both requests are freed."""
    bm = make_manager()
    tokens = make_tokens(13)
    a = run_request(bm, "a", tokens)
    assert a == [0, 1, 2, 3]
    prefix = bm.cached_prefix(tokens)
    assert prefix == [0, 1, 2]
    b: list[int] = []
    assert bm.allocate("b", b, 13, prefix) == [4]
    assert b == [0, 1, 2, 4]
    assert [bm.blocks[i].ref_cnt for i in range(5)] == [2, 2, 2, 1, 1]
    bm.free("a", a)
    assert bm.num_free_blocks == 4  # a's tail block 3 plus the untouched 5, 6, 7
    assert [bm.blocks[i].ref_cnt for i in range(5)] == [1, 1, 1, 0, 1]
    bm.free("b", b)
    assert bm.num_free_blocks == 8


def test_cached_prefix_always_leaves_the_last_token_to_compute():
    """A prompt of exactly 3 full blocks hits at most 2 blocks (the model must produce logits
    for the last prompt token); one more token hits all 3."""
    bm = make_manager()
    tokens = make_tokens(12)
    bm.free("a", run_request(bm, "a", tokens))
    assert bm.cached_prefix(tokens) == [0, 1]
    assert bm.cached_prefix(tokens + [7]) == [0, 1, 2]
    assert bm.cached_prefix(make_tokens(12, start=1)) == []


def test_freed_prefix_blocks_are_taken_back_from_the_free_queue():
    """Reusing cached-but-free blocks moves them out of the free queue (ref_cnt 1) without an
    eviction event; the new block comes from the queue head, and the reused blocks are not
    handed out again as fresh blocks."""
    bm = make_manager()
    tokens = make_tokens(9)
    bm.free("a", run_request(bm, "a", tokens))  # queue: 3, 4, 5, 6, 7, 2, 1, 0
    bm.take_events()
    table: list[int] = []
    assert bm.allocate("b", table, 9, bm.cached_prefix(tokens)) == [3]
    assert table == [0, 1, 3]
    assert bm.take_events() == []
    assert bm.num_free_blocks == 5
    rest: list[int] = []
    assert bm.allocate("c", rest, 20) == [4, 5, 6, 7, 2]  # block 2 was partial: no hash
    assert bm.take_events() == []


def test_allocate_returns_none_on_shortfall_and_changes_nothing():
    """Asking for more blocks than are free returns None: the table, free count, ref counts,
    cached hashes and events are untouched (also when cached prefix blocks would be reused)."""
    bm = make_manager()
    tokens = make_tokens(12)
    bm.free("a", run_request(bm, "a", tokens))  # queue: 3, 4, 5, 6, 7, 2, 1, 0
    held: list[int] = []
    assert bm.allocate("held", held, 1) == [3]
    bm.take_events()
    table = list(held)
    assert bm.allocate("held", table, 33) is None  # 9 blocks: 1 held + 8 > 7 free
    assert table == [3]
    prefix = bm.cached_prefix(tokens + [1])
    assert prefix == [0, 1, 2]
    big: list[int] = []
    assert bm.allocate("c", big, 4 * 10, prefix) is None  # 3 cached + 7 new > 7 free
    assert big == []
    assert bm.num_free_blocks == 7 and bm.num_cached_blocks == 3
    assert [bm.blocks[i].ref_cnt for i in range(4)] == [0, 0, 0, 1]
    assert bm.take_events() == []
    assert bm.allocate("c", big, 4 * 7, prefix) == [4, 5, 6, 7]  # exactly fits: 3 + 4 of 7
    assert big == [0, 1, 2, 4, 5, 6, 7]
    assert bm.num_free_blocks == 0 and bm.take_events() == []


def test_events_have_increasing_ids_and_exact_contents():
    """STORED is emitted once per newly cached block run, REMOVED per evicted block, and event
    ids increase by one from 0; take_events drains."""
    bm = make_manager(num_blocks=4)
    first = make_tokens(8, start=0)
    table: list[int] = []
    bm.allocate("a", table, 8)
    bm.cache_full_blocks("a", table, first, 4)
    bm.cache_full_blocks("a", table, first, 6)  # no new full block: no event
    bm.cache_full_blocks("a", table, first, 8)
    bm.free("a", table)
    bm.free("b", run_request(bm, "b", make_tokens(12, start=100)))
    events = bm.take_events()
    h, g = hashes_of(first), hashes_of(make_tokens(12, start=100))
    assert events == [
        KVEvent(0, STORED, (h[0],)),
        KVEvent(1, STORED, (h[1],)),
        KVEvent(2, REMOVED, (h[1],)),  # b needs 3 blocks: 2 fresh, then a's tail
        KVEvent(3, STORED, tuple(g)),
    ]
    assert bm.take_events() == []
    assert [e.event_id for e in events] == sorted({e.event_id for e in events})


def test_duplicate_content_is_cached_once():
    """Two requests computing the same blocks concurrently: only the first one's blocks are
    cached (one STORED); the second one's blocks are plain and evicted silently."""
    bm = make_manager()
    tokens = make_tokens(8)
    a, b = [], []
    bm.allocate("a", a, 8)
    bm.allocate("b", b, 8)
    bm.cache_full_blocks("a", a, tokens, 8)
    bm.cache_full_blocks("b", b, tokens, 8)
    assert bm.take_events() == [KVEvent(0, STORED, tuple(hashes_of(tokens)))]
    assert bm.cached_prefix(tokens + [1]) == [0, 1]
    bm.free("b", b)
    bm.free("a", a)
    assert bm.num_cached_blocks == 2


def test_reset_prefix_cache_keeps_referenced_blocks_consistent_with_events():
    """reset_prefix_cache forgets unreferenced cached blocks; blocks still in use keep their
    hashes, and the events say so: CLEARED then STORED of the survivors. Replaying all events
    gives exactly the cached hashes."""
    bm = make_manager()
    kept, dropped = make_tokens(8, start=0), make_tokens(8, start=500)
    running = run_request(bm, "kept", kept)
    bm.free("gone", run_request(bm, "gone", dropped))
    bm.reset_prefix_cache()
    events = bm.take_events()
    assert [e.kind for e in events] == [STORED, STORED, CLEARED, STORED]
    assert events[-1].block_hashes == tuple(hashes_of(kept))
    assert bm.num_cached_blocks == 2
    assert bm.cached_prefix(kept + [1]) == running
    assert bm.cached_prefix(dropped + [1]) == []
    replayed: set[int] = set()
    for e in events:
        if e.kind is CLEARED:
            replayed.clear()
        elif e.kind is STORED:
            replayed |= set(e.block_hashes)
        else:
            replayed -= set(e.block_hashes)
    assert replayed == set(hashes_of(kept))


def test_prefix_caching_disabled_emits_nothing():
    """With prefix caching off nothing is hashed, hit or announced."""
    bm = make_manager(enable_prefix_caching=False)
    tokens = make_tokens(12)
    bm.free("a", run_request(bm, "a", tokens))
    assert bm.cached_prefix(tokens + [1]) == []
    assert bm.num_cached_blocks == 0 and bm.take_events() == []
