"""Graph mode (``EngineConfig.enforce_eager=False``, engine/compile.py) on the real default
model: compiled == eager tokens, compiled float32 == HF tokens.

One compiled engine for the module (the compile is paid once; the inductor cache lives in a
temporary ``SCISSION_CACHE_DIR`` so the test does not depend on, or fill, the user's cache).
"""

from __future__ import annotations

import pytest
from test_engine_vs_hf import hf_greedy, run_engine

from scission.engine.compile import CompiledDecoder, pad_tokens
from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

NEW_TOKENS = 24


def make_engine(tokenizer, enforce_eager: bool) -> LLMEngine:
    cfg = EngineConfig(num_threads=2, enforce_eager=enforce_eager,
                       cache=CacheConfig(num_blocks=512),
                       scheduler=SchedulerConfig(max_num_batched_tokens=512))
    return LLMEngine(cfg, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def compiled_engine(tokenizer, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SCISSION_CACHE_DIR", str(tmp_path_factory.mktemp("scission_cache")))
    mp.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    try:
        yield make_engine(tokenizer, enforce_eager=False)
    finally:
        mp.undo()


def test_compiled_engine_is_in_graph_mode(compiled_engine):
    assert isinstance(compiled_engine.model.compiled, CompiledDecoder)
    assert compiled_engine.model.compiled.compile_s > 0


def test_compiled_equals_eager_tokens(compiled_engine, tokenizer, chat_prompt_ids):
    """Greedy tokens of 1, 3 and 8 prompts at once (the static batch-1 graph and the dynamic
    graph at several sizes; chunked prefill mixed with decodes) equal the eager engine's."""
    eager = make_engine(tokenizer, enforce_eager=True)
    assert eager.model.compiled is None
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for batch in (chat_prompt_ids[:1], chat_prompt_ids[1:4], chat_prompt_ids[4:12]):
        want = run_engine(eager, batch, params)
        got = run_engine(compiled_engine, batch, params)
        assert got == want, f"batch of {len(batch)} diverged"
    assert len({tuple(t) for t in want}) > 1  # not a degenerate output


def test_compiled_float32_equals_hf(compiled_engine, hf_model, chat_prompt_ids):
    """The compiled float32 path is token-exact vs HF's greedy loop, all prompts batched."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = run_engine(compiled_engine, chat_prompt_ids, params)
    for i, ids in enumerate(chat_prompt_ids):
        assert got[i] == hf_greedy(hf_model, ids, NEW_TOKENS), f"prompt {i} diverged"


def test_int4_graph_mode_equals_int4_eager(tokenizer, chat_prompt_ids, tmp_path, monkeypatch):
    """Quantized linears compile too (their kernels inside the graphs, ``graph_linear``):
    same int4 weights, the eager int4 engine's greedy tokens: exactly for a single stream,
    up to a late near-tie flip when batched (see the bound below)."""
    monkeypatch.setenv("SCISSION_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    def int4_engine(enforce_eager: bool) -> LLMEngine:
        cfg = EngineConfig(num_threads=2, enforce_eager=enforce_eager,
                           weight_quantization="int4", cache=CacheConfig(num_blocks=256),
                           scheduler=SchedulerConfig(max_num_batched_tokens=512))
        return LLMEngine(cfg, tokenizer=tokenizer)

    compiled = int4_engine(enforce_eager=False)
    assert isinstance(compiled.model.compiled, CompiledDecoder)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = chat_prompt_ids[:8]
    got_single = run_engine(compiled, prompts[:1], params)
    got = run_engine(compiled, prompts, params)
    del compiled
    want = run_engine(int4_engine(enforce_eager=True), prompts, params)
    assert got_single == want[:1]
    # Batched, the compiled graphs fuse the float32 norms (another rounding order) ahead of
    # bfloat16 kernel inputs, so a near-tie may flip late: measured 7 of 8 prompts equal for
    # all 24 tokens, the 8th for its first 20 (2026-11-30).
    agree = [next((j for j, (a, b) in enumerate(zip(g, w, strict=True)) if a != b),
                  len(w)) for g, w in zip(got, want, strict=True)]
    assert sum(a == NEW_TOKENS for a in agree) >= len(prompts) - 1, agree
    assert min(agree) >= NEW_TOKENS // 2, agree


def test_pad_tokens_buckets():
    assert [pad_tokens(n) for n in (1, 2, 3, 5, 33, 128, 129)] == [1, 2, 4, 8, 64, 128, 129]
