"""Helpers shared by engine tests (importable: ``tests/`` is on ``sys.path`` under pytest)."""

from __future__ import annotations

from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Submit every prompt at once (greedy, ``n`` new tokens, EOS ignored), step the engine
    until all finish; each prompt's generated token ids, in prompt order."""
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"greedy-{i}", ids, params)
    tokens: dict[str, list[int]] = {f"greedy-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[f"greedy-{i}"] for i in range(len(prompts))]
