"""The engine alone against HF transformers on the real default model."""

from __future__ import annotations

import pytest
import torch

from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

NEW_TOKENS = 64


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain HF greedy loop with its own KV cache; no logits processors (EOS not masked, so it
    matches ``ignore_eos``: EOS may be generated and decoding goes on)."""
    out: list[int] = []
    past, inp = None, torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            res = hf_model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
    return out


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, ids in enumerate(prompts):
        engine.add_request(f"req-{i}", ids, params)
    tokens: dict[str, list[int]] = {f"req-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[f"req-{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def engine(tokenizer):
    cfg = EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=512),
                       scheduler=SchedulerConfig(max_num_batched_tokens=512))
    return LLMEngine(cfg, tokenizer=tokenizer)


def test_greedy_equals_hf_generate(engine, hf_model, chat_prompt_ids):
    """Greedy float32 engine tokens == HF greedy generate, token for token, for every prompt
    (all prompts batched together, so chunked prefill and mixed batches are exercised)."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = run_engine(engine, chat_prompt_ids, params)
    assert len(chat_prompt_ids) >= 20
    for i, ids in enumerate(chat_prompt_ids):
        assert got[i] == hf_greedy(hf_model, ids, NEW_TOKENS), f"prompt {i} diverged"
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_hit_gives_same_tokens(engine, chat_prompt_ids):
    """A repeated prompt reuses its full cached blocks (cached_tokens = full-block length)
    and still produces exactly the tokens of the first run."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ids = chat_prompt_ids[3] + chat_prompt_ids[4]  # long enough for several full blocks
    first = run_engine(engine, [ids], params)
    engine.add_request("again", ids, params)
    req = engine.requests["again"]
    second: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            second.extend(out.new_token_ids)
    bs = engine.kv_cache.block_size
    assert req.num_cached_tokens == (len(ids) - 1) // bs * bs
    assert second == first[0]


def test_preemption_recompute_gives_same_tokens(tokenizer, chat_prompt_ids):
    """With too few blocks for every request at once, the newest requests are preempted and
    recomputed, and every request still gets exactly the greedy tokens of an unconstrained run."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = chat_prompt_ids[:6]
    big = LLMEngine(EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=256)),
                    tokenizer=tokenizer)
    want = run_engine(big, prompts, params)
    need = max(-(-(len(p) + 24) // 16) for p in prompts)
    small = LLMEngine(EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=need * 2,
                                   enable_prefix_caching=False)), tokenizer=tokenizer)
    got = run_engine(small, prompts, params)
    assert got == want
    assert small.num_free_blocks == need * 2
