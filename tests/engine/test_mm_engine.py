"""Image inputs inside the engine, independent of any vision tower: embeddings replace token
embeddings at the image positions (also across prefill chunks and prefix-cache hits), and
image hashes key every KV block a segment overlaps."""

from __future__ import annotations

import pytest
import torch
from test_tiny_models import make_engine, save_tiny

from scission.engine.block_hash import NONE_HASH, hash_block, hash_prompt_blocks, hash_seed
from scission.engine.block_manager import BlockManager
from scission.engine.config import AttentionBackendKind
from scission.engine.multimodal import MMInput, block_extra_keys, make_mm_input
from scission.engine.request import SamplingParams

IMAGE_TOKEN = 7  # any id: the test's segments mark their embedding positions with it
A, B = b"a" * 32, b"b" * 32


def test_block_extra_keys_hand_computed():
    """Block size 4: a segment [3, 9) overlaps blocks 0, 1, 2; a second one [9, 10) block 2."""
    mms = [MMInput(9, 1, B, (9,)), MMInput(3, 6, A, (4, 5))]
    assert block_extra_keys(mms, 4, 4) == [A, A, A + B, b""]


def test_prompt_hashes_with_extra_keys_equal_chained_hash_block():
    seed, ids = hash_seed("m"), list(range(40, 52))
    extras = [b"", A, A + B]
    parent, chained = NONE_HASH, []
    for i in range(3):
        parent = hash_block(seed, parent, ids[4 * i : 4 * i + 4], extras[i])
        chained.append(parent)
    assert hash_prompt_blocks(seed, ids, 4, (), extras) == chained
    # continuing after the first two hashes gives the same third one
    assert hash_prompt_blocks(seed, ids, 4, chained[:2], extras) == chained
    assert hash_prompt_blocks(seed, ids, 4)[0] == chained[0]  # no image in block 0
    assert hash_prompt_blocks(seed, ids, 4)[1] != chained[1]


def test_prefix_cache_shares_blocks_only_for_the_same_image():
    """Same tokens, image in block 1: another image hits only block 0; the same image hits
    every block a new request may take (the last prompt token is always computed)."""
    bm = BlockManager(16, 4, hash_seed("m"))
    ids = list(range(100, 113))
    table: list[int] = []
    bm.allocate("first", table, len(ids))
    image_a = [make_mm_input(ids, 4, 4, 105, A)]
    bm.cache_full_blocks("first", table, ids, len(ids), image_a)
    bm.free("first", table)
    assert len(bm.cached_prefix(ids, image_a)) == 3
    assert len(bm.cached_prefix(ids, [make_mm_input(ids, 4, 4, 105, B)])) == 1
    assert len(bm.cached_prefix(ids)) == 1  # text-only request with the same tokens


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mm"), "llama")


def _greedy(engine, prompt: list[int], mm: list[MMInput], n: int = 6) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    rid = f"r{len(engine.requests)}-{id(mm)}"
    engine.add_request(rid, prompt, params, mm_inputs=mm)
    out: list[int] = []
    while engine.has_unfinished():
        out += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return out


@pytest.mark.parametrize("budget_tokens", [256, 5])
def test_embeddings_replace_token_embeddings(tiny_path, tokenizer, budget_tokens):
    """An image whose embeddings are the embedding-table rows of other token ids gives exactly
    the tokens of the text prompt holding those ids: the merge puts row ``i`` at the
    segment's ``i``-th image position, also when a 5-token budget splits the segment over
    several prefill chunks."""
    engine = make_engine(tiny_path, tokenizer, AttentionBackendKind.TORCH, budget_tokens)
    stand_in = [300, 301, 302, 303, 304, 305]
    prompt = [50, 51, 90, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 91, IMAGE_TOKEN, IMAGE_TOKEN,
              IMAGE_TOKEN, 92, 60, 61]
    text = list(prompt)
    positions = [p for p, t in enumerate(prompt) if t == IMAGE_TOKEN]
    for p, t in zip(positions, stand_in, strict=True):
        text[p] = t
    embeds = engine.model.embed.weight[torch.tensor(stand_in)].clone()
    mm = [make_mm_input(prompt, 2, 9, IMAGE_TOKEN, A, embeds)]
    assert _greedy(engine, prompt, mm) == _greedy(engine, text, [])


def test_prefix_hit_inside_an_image_segment(tiny_path, tokenizer):
    """A second request with the same image hits the cached blocks, recomputes the rest of the
    segment from its embeddings, and produces the same tokens; with another image it must
    not reuse the image's blocks (different tokens here, as the embeddings differ)."""
    engine = make_engine(tiny_path, tokenizer, AttentionBackendKind.TORCH, 256)
    prompt = [50 + i for i in range(16)] + [IMAGE_TOKEN] * 24 + [60, 61, 62]
    gen = torch.Generator().manual_seed(0)
    emb_a = torch.randn(24, 64, generator=gen)
    emb_b = torch.randn(24, 64, generator=gen)
    first = _greedy(engine, prompt, [make_mm_input(prompt, 16, 24, IMAGE_TOKEN, A, emb_a)])
    again = _greedy(engine, prompt, [make_mm_input(prompt, 16, 24, IMAGE_TOKEN, A, emb_a)])
    other = _greedy(engine, prompt, [make_mm_input(prompt, 16, 24, IMAGE_TOKEN, B, emb_b)])
    fresh = make_engine(tiny_path, tokenizer, AttentionBackendKind.TORCH, 256)
    assert again == first
    assert other == _greedy(fresh, prompt, [make_mm_input(prompt, 16, 24, IMAGE_TOKEN, B, emb_b)])
    hits = [r for r in engine.block_manager._cached]
    assert len(hits) >= 4  # blocks of both images are cached side by side


def test_bad_mm_inputs_are_refused(tiny_path, tokenizer):
    engine = make_engine(tiny_path, tokenizer, AttentionBackendKind.TORCH, 256)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    prompt = [50, IMAGE_TOKEN, IMAGE_TOKEN, 51]
    with pytest.raises(ValueError, match="leaves the prompt"):
        engine.add_request("x", prompt, params, mm_inputs=[MMInput(3, 4, A, (3,),
                                                                   torch.zeros(1, 64))])
    with pytest.raises(ValueError, match="no embeddings"):
        engine.add_request("y", prompt, params,
                           mm_inputs=[make_mm_input(prompt, 1, 2, IMAGE_TOKEN, A)])
    with pytest.raises(ValueError, match="2 image token positions"):
        make_mm_input(prompt, 1, 2, IMAGE_TOKEN, A, torch.zeros(3, 64))
    assert not engine.requests and engine.num_free_blocks == engine.kv_cache.num_blocks
