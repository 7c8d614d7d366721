"""Fault-injection suite fixtures: the engine-alone reference, a load runner, invariants.

Every scenario runs under concurrent streaming load and asserts the same invariants
(``faults.check_outcomes`` / ``faults.wait_all_free``): each request either completes with the
tokens the engine alone gives (greedy) or fails with a clear status within its deadline;
none hangs; every block and hold is free on every worker afterwards; the cluster serves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))  # serving_helpers

from faults import NEW_TOKENS  # noqa: E402  (after the sys.path insert: it imports serving_helpers)

from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from scission.engine.llm_engine import LLMEngine  # noqa: E402
from scission.engine.request import SamplingParams  # noqa: E402


@pytest.fixture(scope="session")
def fault_prompts(chat_prompt_ids) -> list[list[int]]:
    return chat_prompt_ids[:12]


@pytest.fixture(scope="session")
def fault_reference(tokenizer, fault_prompts) -> list[list[int]]:
    """Greedy tokens (NEW_TOKENS, EOS ignored) of each fault prompt from the engine alone."""
    engine = LLMEngine(EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=512),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=512)),
                       tokenizer=tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(fault_prompts):
        engine.add_request(str(i), ids, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(fault_prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(fault_prompts))]
