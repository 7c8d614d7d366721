"""The Triton kernels compiled on a CUDA GPU against the float64 references (``gpu`` marker).

Every test in tests/kernels/ already runs compiled on CUDA when a GPU is present (the
``device`` fixture). This file adds what only a GPU run can show: fp16 (the CPU grids have
fp32/bf16), the heads of real models (SmolLM2-135M: 9 q / 3 kv heads of 64; Llama-3-8B:
32 / 8 of 128) at batch and context sizes the engine runs, compiled bf16 rounding (round to
nearest even, where the interpreter truncates), and decode attention captured in a CUDA
graph and replayed on new inputs written in place, as the engine's CUDA-graph mode does.
Skipped without a GPU; ``SCISSION_GPU_TESTS_ON_CPU=1`` runs them under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from scission.kernels.decode_attention import decode_attention
from scission.kernels.kv_cache_write import kv_cache_write
from scission.kernels.prefill_attention import prefill_attention
from scission.kernels.reference import (
    ref_cos_sin_cache,
    ref_decode_attention,
    ref_kv_cache_write,
    ref_prefill_attention,
    ref_rms_norm,
    ref_rotary,
    ref_silu_mul,
    rel_error,
)
from scission.kernels.rms_norm import rms_norm
from scission.kernels.rotary import rotary_embedding
from scission.kernels.silu_mul import silu_mul

pytestmark = pytest.mark.gpu

# ||out - ref|| / ||ref||: attention (one softmax, two dots) and elementwise (one or two
# roundings of 2**-8 bf16 / 2**-11 fp16).
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
ELEM_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SMOLLM2, LLAMA8B = (9, 3, 64), (32, 8, 128)  # (num_heads, num_kv_heads, head_dim)


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return {SMOLLM2: "smollm2", LLAMA8B: "llama8b"}.get(v)


@pytest.mark.parametrize(
    ("heads", "dtype", "num_splits"),
    [(SMOLLM2, torch.bfloat16, 1), (SMOLLM2, torch.float16, 4), (LLAMA8B, torch.bfloat16, 1),
     (LLAMA8B, torch.float16, 8), (LLAMA8B, torch.float32, 16)],
    ids=_id,
)
def test_decode_model_heads(make_paged_batch, heads, dtype, num_splits):
    """Contexts 1 .. 1501 (tile and block edges, more splits than tiles) in one batch."""
    num_heads, num_kv_heads, head_dim = heads
    ctx = [0, 1, 15, 16, 63, 64, 200, 777, 1500]  # seq_len = ctx + 1
    batch = make_paged_batch([1] * len(ctx), ctx, num_kv_heads=num_kv_heads,
                             gqa=num_heads // num_kv_heads, head_dim=head_dim, block_size=16,
                             dtype=dtype)
    out = torch.full_like(batch.q, float("nan"))
    decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                     batch.scale, num_splits=num_splits, out=out)
    ref = ref_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                               batch.seq_lens, batch.scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert rel_error(out, ref) < ATTN_TOL[dtype], f"relative error {rel_error(out, ref):.2e}"


@pytest.mark.parametrize(("heads", "dtype"),
                         [(SMOLLM2, torch.float16), (LLAMA8B, torch.bfloat16),
                          (LLAMA8B, torch.float16)], ids=_id)
def test_prefill_model_heads(make_paged_batch, heads, dtype):
    """A 300-token chunk over a 700-token prefix, a fresh 64-token prompt, decode rows."""
    num_heads, num_kv_heads, head_dim = heads
    batch = make_paged_batch([1, 300, 64, 1], [0, 700, 0, 1000], num_kv_heads=num_kv_heads,
                             gqa=num_heads // num_kv_heads, head_dim=head_dim, block_size=16,
                             dtype=dtype)
    out = torch.full_like(batch.q, float("nan"))
    prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                      batch.cu_seqlens_q, batch.max_seqlen_q, batch.scale, out=out)
    ref = ref_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                                batch.seq_lens, batch.cu_seqlens_q, batch.scale)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    assert rel_error(out, ref) < ATTN_TOL[dtype], f"relative error {rel_error(out, ref):.2e}"


@pytest.mark.parametrize("hidden", [576, 4096])
def test_fp16_elementwise_kernels(gen, device, hidden):
    """rms_norm (fused), silu_mul, rotary and kv_cache_write in fp16 at model widths."""
    dtype, tokens = torch.float16, 33
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    res = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    ref_out, ref_res = ref_rms_norm(x, w, 1e-5, res)
    out, _ = rms_norm(x, w, 1e-5, res)
    assert rel_error(out, ref_out) < ELEM_TOL[dtype]
    torch.testing.assert_close(res, ref_res, rtol=2**-10, atol=0)  # one fp16 rounding

    gate_up = (3 * torch.randn(tokens, 2 * hidden, generator=gen)).to(device, dtype)
    assert rel_error(silu_mul(gate_up), ref_silu_mul(gate_up)) < ELEM_TOL[dtype]

    num_heads, num_kv_heads, head_dim = SMOLLM2 if hidden == 576 else LLAMA8B
    pos = torch.randint(0, 8192, (tokens,), generator=gen)
    q = torch.randn(tokens, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    cache = ref_cos_sin_cache(8192, head_dim, 500000.0)
    ref_q, ref_k = ref_rotary(pos, q, cache), ref_rotary(pos, k, cache)
    rotary_embedding(pos.to(device), q, k, theta=500000.0)
    assert rel_error(q, ref_q) < ELEM_TOL[dtype] and rel_error(k, ref_k) < ELEM_TOL[dtype]

    k_cache = torch.randn(8, 16, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(8, 16, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    slots = torch.randperm(8 * 16, generator=gen)[:tokens]
    slots[3] = -1
    ref_kc, ref_vc = ref_kv_cache_write(k, q[:, :num_kv_heads], k_cache, v_cache, slots)
    kv_cache_write(k, q[:, :num_kv_heads], k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache, ref_kc) and torch.equal(v_cache, ref_vc)


def test_bf16_residual_rounds_to_nearest_even(gen, device):
    """Compiled, the fused residual sum rounds fp32 -> bf16 to nearest even: bit-exact
    against float64 rounded once (the interpreter truncates, hence a tolerance on CPU)."""
    if device.type != "cuda":
        pytest.skip("the Triton interpreter truncates fp32 -> bf16")
    x = torch.randn(64, 4096, generator=gen).to(device, torch.bfloat16)
    res = torch.randn(64, 4096, generator=gen).to(device, torch.bfloat16)
    w = torch.ones(4096, dtype=torch.bfloat16, device=device)
    _, ref_res = ref_rms_norm(x, w, 1e-5, res)
    rms_norm(x, w, 1e-5, res)
    assert torch.equal(res, ref_res)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_cuda_graph_replay(make_paged_batch, gen, device, num_splits):
    """Captured once, replayed on new q, context lengths and block tables written in place
    (static buffers, as CUDA-graph mode feeds the engine): each replay matches the reference
    for its own inputs, and differs from the previous replay's output."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    num_heads, num_kv_heads, head_dim = SMOLLM2
    batch = make_paged_batch([1] * 6, [40, 3, 500, 90, 16, 250], num_kv_heads=num_kv_heads,
                             gqa=num_heads // num_kv_heads, head_dim=head_dim, block_size=16,
                             dtype=torch.bfloat16)
    q, table, lens = batch.q.clone(), batch.block_table.clone(), batch.seq_lens.clone()
    out = torch.empty_like(q)

    def step():
        decode_attention(q, batch.k_cache, batch.v_cache, table, lens, batch.scale,
                         num_splits=num_splits, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    previous, capacity = None, batch.seq_lens.cpu()  # tokens each table row holds
    for _ in range(3):
        perm = torch.randperm(len(capacity), generator=gen)  # rows move to other requests
        new_lens = (torch.rand(len(perm), generator=gen) * capacity[perm]).int().clamp(min=1)
        q.copy_(torch.randn(q.shape, generator=gen).to(device, q.dtype))
        table.copy_(batch.block_table[perm.to(device)])
        lens.copy_(new_lens.to(device))
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_decode_attention(q, batch.k_cache, batch.v_cache, table, lens, batch.scale)
        assert rel_error(out, ref) < ATTN_TOL[torch.bfloat16]
        assert previous is None or not torch.equal(out, previous), "replay used stale inputs"
        previous = out.clone()
