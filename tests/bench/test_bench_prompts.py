"""Prompts of exact token counts from the real corpus and tokenizer, with shared prefixes."""

from __future__ import annotations

import numpy as np
import pytest

from scission.bench.prompts import PromptBuilder, default_corpus_path
from scission.bench.traces import TraceScaling
from scission.bench.workload import (
    LengthConfig,
    LengthDist,
    WorkloadConfig,
    WorkloadKind,
    build_workload,
    synthetic_requests,
)


@pytest.mark.parametrize("num_tokens", [1, 17, 512, 5000, 400_000])
def test_exact_token_counts(prompt_builder: PromptBuilder, num_tokens: int) -> None:
    """A prompt has exactly the requested number of ids, all corpus ids (400k > corpus wraps)."""
    ids = prompt_builder.prompt(num_tokens, request_index=3)
    assert len(ids) == num_tokens
    assert set(ids) <= set(prompt_builder.corpus_ids.tolist())


def test_windows_are_real_text(prompt_builder: PromptBuilder, bench_tokenizer) -> None:
    """A window cut at token boundaries decodes to a contiguous passage of the corpus."""
    corpus = default_corpus_path().read_text(encoding="utf-8")
    for start in (0, 1234, 200_000):
        text = bench_tokenizer.decode(prompt_builder.window(start, 64))
        assert len(text) > 64 and text in corpus


def test_shared_hash_ids_share_exact_prefix(prompt_builder: PromptBuilder) -> None:
    """Requests with equal leading hash ids have equal leading blocks and differ after the first
    differing id; the mapping is deterministic across builders with the same seed."""
    a = prompt_builder.prompt(100, 0, prefix_hash_ids=(0, 1, 2, 3), block_tokens=32)
    b = prompt_builder.prompt(90, 1, prefix_hash_ids=(0, 1, 7), block_tokens=32)
    assert a[:64] == b[:64]
    assert a[64:90] != b[64:90]
    again = PromptBuilder(prompt_builder.corpus_ids, seed=0).prompt(100, 0, (0, 1, 2, 3), 32)
    assert again == a
    other_seed = PromptBuilder(prompt_builder.corpus_ids, seed=1).prompt(100, 0, (0, 1, 2, 3), 32)
    assert other_seed[:32] != a[:32]


def test_unshared_prompts_differ(prompt_builder: PromptBuilder) -> None:
    """Without hash ids, different request indices get different prompts (no accidental
    prefix hits); the same index gets the same prompt."""
    prompts = [prompt_builder.prompt(32, i) for i in range(50)]
    assert len({tuple(p[:16]) for p in prompts}) == 50
    assert prompt_builder.prompt(32, 7) == prompts[7]


def test_mooncake_workload_prefixes(prompt_builder: PromptBuilder) -> None:
    """Mooncake rows 0 and 1 share hash id 0 only: scaled by 1/16 (32-token blocks), their
    prompts share exactly the first 32 tokens; lengths are the scaled trace lengths."""
    config = WorkloadConfig(
        kind=WorkloadKind.MOONCAKE_CONV,
        num_requests=2,
        scaling=TraceScaling(max_context_tokens=8192, length_scale=1 / 16),
    )
    first, second = build_workload(config, prompt_builder).requests
    assert len(first.prompt_token_ids) == round(6758 / 16) and first.output_tokens == 31
    assert len(second.prompt_token_ids) == round(7322 / 16)
    assert first.prompt_token_ids[:32] == second.prompt_token_ids[:32]
    assert first.prompt_token_ids[32:64] != second.prompt_token_ids[32:64]
    assert (first.request_id, second.request_id) == ("bench-0", "bench-1")


def test_synthetic_lengths() -> None:
    """Fixed lengths are constant; uniform lies in [mean - spread, mean + spread]; normal has
    its mean within 3 standard errors; the same seed gives the same lengths."""
    fixed = synthetic_requests(5, LengthConfig(64), LengthConfig(8), seed=1)
    assert [(r.input_tokens, r.output_tokens) for r in fixed] == [(64, 8)] * 5
    uniform = LengthConfig(100, LengthDist.UNIFORM, 20)
    normal = LengthConfig(300, LengthDist.NORMAL, 50)
    requests = synthetic_requests(2000, uniform, normal, seed=2)
    inputs = [r.input_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    assert min(inputs) == 80 and max(inputs) == 120
    assert abs(np.mean(outputs) - 300) < 3 * 50 / np.sqrt(2000)
    assert synthetic_requests(2000, uniform, normal, seed=2) == requests
    assert synthetic_requests(2000, uniform, normal, seed=3) != requests
