"""Both attention backends on both KV cache layouts (``KVLayout``) against the float64
reference: block-major per-layer caches are strided views, which the kernels and the torch
backend must read and write through their strides."""

from __future__ import annotations

import pytest
import torch

from scission.engine.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    reference_paged_attention,
)
from scission.engine.attention_triton import TritonAttentionBackend
from scission.engine.config import KVLayout, ModelConfig
from scission.engine.kv_cache import KVCache
from scission.kernels.reference import rel_error

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, GQA, HEAD_DIM = 3, 24, 16, 2, 3, 64
LAYER = 1  # the layer under test; the others must stay untouched
TOL = 1e-5  # float32, ||out - ref|| / ||ref||


def _cache(layout: KVLayout, gen: torch.Generator) -> KVCache:
    model = ModelConfig(vocab_size=1, hidden_size=NUM_KV_HEADS * GQA * HEAD_DIM,
                        intermediate_size=1, num_layers=NUM_LAYERS,
                        num_heads=NUM_KV_HEADS * GQA, num_kv_heads=NUM_KV_HEADS,
                        head_dim=HEAD_DIM, rope_theta=1.0, rms_norm_eps=1e-5,
                        max_position_embeddings=1)
    cache = KVCache(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, layout=layout)
    cache.layer_major().copy_(torch.randn(cache.layer_major().shape, generator=gen))
    return cache


def _metadata(query_lens, seq_lens, tables) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = []
    for r, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        pos = torch.arange(seq_len - q_len, seq_len)
        slots.append(table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        slot_mapping=torch.cat(slots), max_seqlen_q=max(query_lens), max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE, query_lens=tuple(query_lens), seq_lens_host=tuple(seq_lens))


CASES = {
    # mixed batch: a fresh prompt, a chunk over a cached prefix, a decode row
    "mixed": ([9, 20, 1], [9, 57, 50], [[3, 11], [20, 2, 7, 9], [0, 5, 6, 15]]),
    # pure decode, scattered blocks (split-K in triton: split_kv_tokens=32)
    "decode": ([1, 1], [70, 33], [[8, 1, 19, 4, 22], [12, 13, 10]]),
    # batch-1 decode over consecutive blocks: the torch backend's view/copy path
    "decode_one_contiguous": ([1], [61], [[4, 5, 6, 7]]),
}


@pytest.mark.parametrize("layout", list(KVLayout), ids=lambda v: v.value)
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_backends_on_both_layouts_match_reference(layout, backend_name, case, gen):
    """Outputs within 1e-5 of the float64 reference; the written cache (as layer-major
    values) equals the same run on a layer-major cache bit for bit, layer ``LAYER`` only."""
    query_lens, seq_lens, tables = CASES[case]
    md = _metadata(query_lens, seq_lens, tables)
    n = sum(query_lens)
    q = torch.randn(n, NUM_KV_HEADS * GQA, HEAD_DIM, generator=gen)
    k, v = (torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    caches = {lay: _cache(lay, torch.Generator().manual_seed(seed))
              for lay in (KVLayout.LAYER_MAJOR, layout)}
    outs = {}
    for lay, cache in caches.items():
        backend = (TorchAttentionBackend() if backend_name == "torch"
                   else TritonAttentionBackend(split_kv_tokens=32, max_splits=4))
        backend.plan(md)
        k_cache, v_cache = cache.layers[LAYER]
        outs[lay] = backend.run(q, k, v, k_cache, v_cache, HEAD_DIM**-0.5)
    cache = caches[layout]
    assert torch.equal(cache.layer_major(), caches[KVLayout.LAYER_MAJOR].layer_major())
    before = _cache(layout, torch.Generator().manual_seed(seed)).layer_major()
    changed = (cache.layer_major() != before).flatten(1).any(1)  # [num_layers]
    assert changed.tolist() == [i == LAYER for i in range(NUM_LAYERS)]
    ref = reference_paged_attention(q, *cache.layers[LAYER], md, HEAD_DIM**-0.5)
    assert rel_error(outs[layout], ref) < TOL, f"{rel_error(outs[layout], ref):.2e}"
    assert rel_error(outs[layout], outs[KVLayout.LAYER_MAJOR]) < TOL
