"""Model fixtures shared by engine tests: the real default model, loaded once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = json.loads((Path(__file__).parents[1] / "data" / "chat_prompts.json").read_text())


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from scission.engine.tokenizer import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from scission.engine.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path)


@pytest.fixture(scope="session")
def chat_prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_model_path), gguf_file=os.path.basename(default_model_path),
        dtype=torch.float32,
    ).eval()
