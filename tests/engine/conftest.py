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
