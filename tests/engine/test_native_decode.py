"""Native decode (engine/native_decode.py) inside the engine on the default model: when it is
on, that its steps (decode, prefill and mixed) match the torch w4a8 step they replace, that a
request's tokens do not depend on what else is in the batch or when other requests arrive,
and that blocks are all returned.
Accuracy against HF transformers is tests/engine/test_quant_engine.py's (``w4a8``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_helpers import greedy_tokens

from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.native_decode import NativeDecoder, native_decode_unsupported
from scission.engine.quant import W4A8_GEMM_MIN_ROWS
from scission.engine.request import SamplingParams
from scission.kernels.reference import rel_error

CLEAR_MARGIN = 1.0  # logits: a top-1 lead this large must not flip between the two paths
# The two paths round float32 sums in different orders; through 30 layers a few int8
# activation codes then round the other way (a code step is max|x| / 127 of its block), so
# the final hidden states differ by ~1-3 % (measured 0.012-0.032 on the prompts below, AVX2).
# Layer 0's K/V (embedding -> norm -> qkv -> rope) agree to ~1e-7 except where such a code
# flips: measured 1.4e-4 over the whole layer. A wiring error (a wrong weight, row, slot or
# layout) is an O(1) error in both; the kernel's own arithmetic is checked to 1e-5 against
# float64 in tests/kernels/test_llama_decode.py.
HIDDEN_REL_TOL = 0.08
LAYER0_KV_REL_TOL = 2e-3

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "List three prime numbers and explain why they are prime."]


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SCISSION_CACHE_DIR", str(tmp_path_factory.mktemp("scission_cache")))
    try:
        eng = LLMEngine(EngineConfig(num_threads=2, weight_quantization="w4a8",
                                     cache=CacheConfig(num_blocks=128, block_size=16),
                                     scheduler=SchedulerConfig(max_num_batched_tokens=512)),
                        tokenizer=tokenizer)
    finally:
        mp.undo()
    return eng


def test_on_for_w4a8_float32_and_why_not_elsewhere(engine):
    assert isinstance(engine.model.native_decode, NativeDecoder)
    assert native_decode_unsupported(engine.model, engine.kv_cache) is None
    bf16_cache = SimpleNamespace(dtype=torch.bfloat16, tensor=engine.kv_cache.tensor)
    assert "float32" in native_decode_unsupported(engine.model, bf16_cache)
    layer = engine.model.layers[3]
    dense = torch.nn.Linear(layer.down.in_features, layer.down.out_features, bias=False)
    saved, layer.down = layer.down, dense
    try:
        assert native_decode_unsupported(engine.model, engine.kv_cache) == \
            "layer 3 down is Linear, not W4A8Linear"
    finally:
        layer.down = saved


def test_off_when_asked(tokenizer):
    eng = LLMEngine(EngineConfig(num_threads=2, weight_quantization="w4a8", native_decode=False,
                                 cache=CacheConfig(num_blocks=16)), tokenizer=tokenizer)
    assert eng.model.native_decode is None


def test_steps_match_the_torch_step(engine, tokenizer):
    """Every step of a batched run (prefill chunks, then pure decode), computed both ways from
    the same cache: the K/V layer 0 writes agree to float32 rounding, the hidden states to the
    stated tolerance, and the greedy token wherever the torch path's top-1 leads clearly."""
    model, runner, cache = engine.model, engine.runner, engine.kv_cache
    checked: list[tuple[float, float]] = []
    kinds: set[bool] = set()  # is_pure_decode of the steps checked
    execute = runner.execute

    def compare_then_execute(out):
        inp = runner.buffers.fill(out)
        kinds.add(inp.metadata.is_pure_decode)
        runner.attn.plan(inp.metadata)
        before = cache.tensor.clone()
        native = model(inp.input_ids, inp.positions, cache.layers, runner.attn)
        native_kv0 = cache.layer_major()[0].clone()
        cache.tensor.copy_(before)
        decoder, model.native_decode = model.native_decode, None
        try:
            ref = model(inp.input_ids, inp.positions, cache.layers, runner.attn)
        finally:
            model.native_decode = decoder
        checked.append((rel_error(native, ref),
                        rel_error(native_kv0, cache.layer_major()[0])))
        ref_logits, got_logits = model.lm_head(ref), model.lm_head(native)
        top2 = ref_logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) >= CLEAR_MARGIN
        assert torch.equal(got_logits.argmax(-1)[clear], ref_logits.argmax(-1)[clear])
        cache.tensor.copy_(before)
        return execute(out)

    runner.execute = compare_then_execute
    try:
        greedy_tokens(engine, [tokenizer.encode(p) for p in PROMPTS], 24)
    finally:
        del runner.execute
    assert len(checked) >= 20 and kinds == {False, True}
    hidden_err, kv0_err = max(c[0] for c in checked), max(c[1] for c in checked)
    print(f"hidden rel err max {hidden_err:.4f}, layer-0 KV max {kv0_err:.2e}")
    assert kv0_err < LAYER0_KV_REL_TOL
    assert hidden_err < HIDDEN_REL_TOL
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_tokens_do_not_depend_on_the_batch(engine, tokenizer):
    """The native step computes each request's row with the same arithmetic whatever else is
    in the batch (per-row activation quantization, per-request attention, and w4a8_mm and
    w4a8_gemm summing a row in the same order), so greedy tokens of requests decoded together
    (4 rows: w4a8_gemm) equal each request decoded alone (w4a8_mm)."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len(prompts) >= W4A8_GEMM_MIN_ROWS
    together = greedy_tokens(engine, prompts, 24)
    alone = [greedy_tokens(engine, [ids], 24)[0] for ids in prompts]
    assert together == alone
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_tokens_do_not_depend_on_arrival(engine, tokenizer):
    """Requests arriving one per step share steps with the others' prefill chunks (mixed
    steps: decode tokens take the decode attention, chunks the prefill attention, in one C
    call); each request's greedy tokens still equal its tokens decoded alone."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    alone = [greedy_tokens(engine, [ids], 24)[0] for ids in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"late-{i}": [] for i in range(len(prompts))}
    decoder = engine.model.native_decode
    mixed_steps = []  # query lengths of the native steps with decode tokens and a chunk

    def record(h, positions, md):
        if 1 in md.query_lens and max(md.query_lens) > 1:
            mixed_steps.append(md.query_lens)
        return type(decoder).forward_embeds(decoder, h, positions, md)

    decoder.forward_embeds = record
    try:
        for i, ids in enumerate(prompts):  # one arrival per step
            engine.add_request(f"late-{i}", ids, params)
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
    finally:
        del decoder.forward_embeds
    assert len(mixed_steps) >= 2, mixed_steps
    assert [tokens[f"late-{i}"] for i in range(len(prompts))] == alone
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_which_steps_it_takes(engine):
    """Every step, of any size (its linears switch to w4a8_gemm at W4A8_GEMM_MIN_ROWS
    tokens, as W4A8Linear does), pure decode or not."""
    decoder = engine.model.native_decode
    assert decoder.step.gemm_min_rows == W4A8_GEMM_MIN_ROWS
    assert engine.model.layers[0].qkv.max_packed_rows == W4A8_GEMM_MIN_ROWS - 1
    for n in (1, W4A8_GEMM_MIN_ROWS, 256):
        assert decoder.handles(SimpleNamespace(is_pure_decode=True, num_reqs=n))
    assert decoder.handles(SimpleNamespace(is_pure_decode=False, num_reqs=2))


def test_prefill_attention_runs_in_c_and_agrees_with_sdpa(engine, tokenizer):
    """Steps the torch path still runs (image embeddings) take the C prefill attention with
    native decode on (kernels/llama_decode.py: prefill_attention, checked against float64 in
    tests/kernels/test_prefill_attention_cpu.py): with the native step off, the torch path's
    first tokens with it equal SDPA's, a long prompt in several chunks (a context before
    each) included."""
    attn, model = engine.runner.attn, engine.model
    assert attn.native_prefill
    long_text = " ".join(PROMPTS * 12) + " Summarize the above in one word:"  # ~300 tokens
    prompts = [tokenizer.encode(p) for p in [*PROMPTS, long_text]]
    assert len(prompts[-1]) > 256
    decoder, model.native_decode = model.native_decode, None
    try:
        native = greedy_tokens(engine, prompts, 3)
        attn.native_prefill = False
        sdpa = greedy_tokens(engine, prompts, 3)
    finally:
        attn.native_prefill = True
        model.native_decode = decoder
    assert [t[0] for t in native] == [t[0] for t in sdpa]
    assert engine.num_free_blocks == engine.block_manager.num_blocks
