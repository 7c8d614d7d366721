"""The engine on both KV cache layouts against HF transformers (real default model)."""

from __future__ import annotations

import pytest
from test_engine_vs_hf import hf_greedy, run_engine

from scission.engine.config import CacheConfig, EngineConfig, KVLayout, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

NEW_TOKENS = 24


@pytest.mark.parametrize("layout", list(KVLayout), ids=lambda v: v.value)
def test_greedy_equals_hf_on_each_kv_layout(layout, tokenizer, hf_model, chat_prompt_ids):
    """Greedy float32 tokens == HF greedy, token for token, with the cache in ``layout``:
    six prompts batched (chunked prefill, mixed and batched decode over scattered blocks),
    then one prompt alone (batch-1 decode over consecutive blocks: the torch backend's
    view path, a copy in block-major)."""
    engine = LLMEngine(EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=256,
                                                                    kv_layout=layout),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=256)),
                       tokenizer=tokenizer)
    assert engine.kv_cache.layout is layout
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = chat_prompt_ids[:6]
    got = run_engine(engine, prompts, params)
    solo = chat_prompt_ids[7] + chat_prompt_ids[8]
    got_solo = run_engine(engine, [solo], params)[0]
    for i, ids in enumerate(prompts):
        assert got[i] == hf_greedy(hf_model, ids, NEW_TOKENS), f"prompt {i} diverged"
    assert got_solo == hf_greedy(hf_model, solo, NEW_TOKENS)
    assert engine.num_free_blocks == engine.block_manager.num_blocks
