"""Block hashes: stable across processes, chained on the parent, seeded by the model id."""

from __future__ import annotations

import multiprocessing

from scission.engine.block_hash import NONE_HASH, hash_block, hash_prompt_blocks, hash_seed

BLOCK_SIZE = 4
TOKENS = list(range(100, 118))  # 4 full blocks + 2 tokens


def make_hashes(model_id: str = "tiny-llama", tokens: list[int] = TOKENS) -> list[int]:
    return hash_prompt_blocks(hash_seed(model_id), tokens, BLOCK_SIZE)


def _hashes_in_child(model_id: str) -> list[int]:  # runs in a spawned interpreter
    return make_hashes(model_id)


def test_hashes_equal_across_processes():
    """Two freshly spawned interpreters (different hash salts) compute the same hashes as this
    one: nothing depends on Python's per-process ``hash()``."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        child_a, child_b = pool.map(_hashes_in_child, ["tiny-llama", "tiny-llama"])
    assert child_a == child_b == make_hashes()


def test_only_full_blocks_are_hashed_and_values_are_64_bit():
    """18 tokens in blocks of 4 give exactly 4 hashes, each an unsigned 64-bit int."""
    hashes = make_hashes()
    assert len(hashes) == 4
    assert all(0 <= h < 2**64 for h in hashes)
    assert len(set(hashes)) == 4


def test_chain_matches_hash_block():
    """Block i's hash is hash_block(seed, hash of block i-1, its tokens), NONE_HASH first."""
    seed = hash_seed("tiny-llama")
    parent, expected = NONE_HASH, []
    for b in range(4):
        parent = hash_block(seed, parent, TOKENS[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])
        expected.append(parent)
    assert make_hashes() == expected


def test_model_id_changes_every_hash():
    """The same tokens under another model id share no hash (the seed enters every block)."""
    assert not set(make_hashes("tiny-llama")) & set(make_hashes("other-model"))
    assert hash_seed("tiny-llama") != hash_seed("other-model")
    assert len(hash_seed("tiny-llama")) == 16


def test_parent_changes_the_hash():
    """Equal tokens under different parents hash differently, so a block's hash names its
    whole prefix: prompts that differ in block 0 share no later hash."""
    seed = hash_seed("tiny-llama")
    block = TOKENS[:BLOCK_SIZE]
    assert hash_block(seed, NONE_HASH, block) != hash_block(seed, 1, block)
    other = [7] + TOKENS[1:]
    assert not set(make_hashes(tokens=other)) & set(make_hashes())


def test_shared_prefix_shares_leading_hashes():
    """Prompts equal in their first 2 blocks share exactly the first 2 hashes."""
    other = TOKENS[:8] + [9, 9, 9, 9] + TOKENS[12:]
    a, b = make_hashes(), make_hashes(tokens=other)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]


def test_start_hashes_continue_the_chain():
    """Passing the first k hashes as ``start_hashes`` reuses them and gives the full chain."""
    full = make_hashes()
    seed = hash_seed("tiny-llama")
    assert hash_prompt_blocks(seed, TOKENS, BLOCK_SIZE, full[:2]) == full
    assert hash_prompt_blocks(seed, TOKENS, BLOCK_SIZE, full) == full


def test_extra_keys_change_the_hash():
    """Extra keys (e.g. an image hash) make an otherwise equal block hash differently."""
    seed = hash_seed("tiny-llama")
    block = TOKENS[:BLOCK_SIZE]
    assert hash_block(seed, NONE_HASH, block, b"img") != hash_block(seed, NONE_HASH, block)


def test_prompt_hashes_equal_a_plain_blake2b_chain_for_large_ids():
    """The packed fast path equals BLAKE2b(seed | parent u64 LE | ids i32 LE) per block,
    computed here with hashlib directly, for ids up to 2**31 - 1 and block size 32."""
    import hashlib
    import struct

    seed, block_size = hash_seed("big-vocab"), 32
    tokens = [(i * 2654435761) % (2**31 - 1) for i in range(3 * block_size + 5)]
    parent, expected = NONE_HASH, []
    for b in range(3):
        h = hashlib.blake2b(seed, digest_size=8)
        h.update(struct.pack("<Q", parent))
        h.update(struct.pack(f"<{block_size}i", *tokens[b * block_size:(b + 1) * block_size]))
        parent = int.from_bytes(h.digest(), "little")
        expected.append(parent)
    assert hash_prompt_blocks(seed, tokens, block_size) == expected
