"""The C prefill attention over the paged cache (kernels/llama_decode.c:
llama_prefill_attention) against the float64 reference: whole prompts and chunks after a
prefix, GQA, both KV layouts, strided query rows, both builds, and bad input refused."""

from __future__ import annotations

import pytest
import torch

from scission.kernels import llama_decode
from scission.kernels.reference import ref_prefill_attention, rel_error

REL_TOL = 1e-5  # float32 sums of float64-exact terms; measured ~1e-7


def paged(gen, num_blocks, block_size, nkv, d, block_major):
    """(k_cache, v_cache) views laid out as engine/kv_cache.py's two layouts."""
    if block_major:
        t = torch.randn(num_blocks, 2, 2, block_size, nkv, d, generator=gen)  # [N, L, 2, ...]
        return t[:, 1, 0], t[:, 1, 1]
    t = torch.randn(2, 2, num_blocks, block_size, nkv, d, generator=gen)
    return t[1, 0], t[1, 1]


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("block_major", [False, True], ids=["layer_major", "block_major"])
@pytest.mark.parametrize("q_len,kv_len,nh,nkv,d", [
    (1, 1, 2, 1, 8), (37, 37, 9, 3, 64), (70, 70, 4, 4, 64), (13, 45, 6, 2, 64),
    (29, 29, 4, 2, 24), (40, 100, 8, 2, 128),
    # rows per work item (2 tokens x 3 heads above): 6 tokens of 1 head with a 5-token last
    # item; 1 token of 5 heads; 8 heads split into blocks of 6 and 2 rows
    (17, 17, 2, 2, 64), (11, 30, 5, 1, 32), (23, 50, 8, 1, 64)])
def test_matches_float64_reference(portable, block_major, q_len, kv_len, nh, nkv, d):
    gen = torch.Generator().manual_seed(q_len * 7 + kv_len + nh + d)
    bs, num_blocks = 16, 12
    k_cache, v_cache = paged(gen, num_blocks, bs, nkv, d, block_major)
    table = torch.randperm(num_blocks, generator=gen)[: -(-kv_len // bs)].to(torch.int32)
    qkv = torch.randn(q_len, (nh + 2 * nkv) * d, generator=gen)
    q = qkv[:, : nh * d].view(q_len, nh, d)  # strided token rows, as sliced from qkv
    scale = d ** -0.5
    got = llama_decode.prefill_attention(q, k_cache, v_cache, table, kv_len, scale, portable)
    want = ref_prefill_attention(q, k_cache, v_cache, table[None], torch.tensor([kv_len]),
                                 torch.tensor([0, q_len]), scale)
    assert got.shape == (q_len, nh, d) and got.is_contiguous()
    assert rel_error(got, want) < REL_TOL


def test_bad_input_is_refused():
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = paged(gen, 4, 16, 2, 64, False)
    q = torch.randn(5, 4, 64, generator=gen)
    table = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        llama_decode.prefill_attention(q, k_cache, v_cache, torch.tensor([0, 4], dtype=torch.int32),
                                       20, 0.125)  # block id 4 of 4 blocks
    with pytest.raises(ValueError, match="out of range"):
        llama_decode.prefill_attention(q, k_cache, v_cache, table, 3, 0.125)  # kv_len < q_len
    with pytest.raises(ValueError, match="block_table int32"):
        llama_decode.prefill_attention(q, k_cache, v_cache, table.long(), 20, 0.125)
    with pytest.raises(ValueError, match="block_table int32"):
        llama_decode.prefill_attention(q, k_cache, v_cache, table, 40, 0.125)  # table too short
    with pytest.raises(ValueError, match="q float32"):
        llama_decode.prefill_attention(q.double(), k_cache, v_cache, table, 20, 0.125)
