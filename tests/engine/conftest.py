"""HF transformers reference model for engine tests (the real default model, loaded once)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_model_path), gguf_file=os.path.basename(default_model_path),
        dtype=torch.float32,
    ).eval()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> str:
    """A tiny random LLaVA checkpoint directory (tests/engine/mm_fixtures.py), once a session."""
    from mm_fixtures import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory) -> str:
    """A tiny random Idefics3 (SmolVLM-style) checkpoint directory, once a session."""
    from mm_fixtures import make_tiny_idefics3

    return make_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))
