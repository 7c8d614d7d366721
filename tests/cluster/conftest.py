"""Cluster fixtures: reference tokens from the engine alone, and a gRPC helper."""

from __future__ import annotations

import pytest

from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

NEW_TOKENS = 64


@pytest.fixture(scope="session")
def engine_reference(tokenizer, chat_prompt_ids) -> list[list[int]]:
    """Greedy tokens (64, EOS ignored) of every chat prompt from the engine alone."""
    engine = LLMEngine(EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=512),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=512)),
                       tokenizer=tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(chat_prompt_ids):
        engine.add_request(str(i), ids, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(chat_prompt_ids))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(chat_prompt_ids))]
