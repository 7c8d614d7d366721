"""Tiny random-weight checkpoints saved as HF safetensors directories: the loader's
safetensors path, logits against HF transformers, and Triton vs torch attention backends."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_tokens

from scission.engine.config import AttentionBackendKind, CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

VOCAB = 49152  # the default tokenizer's vocabulary, so the engine can detokenize


def save_tiny(tmp_path, arch: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # random init has tiny logits; widen them so argmax is meaningful
        model.lm_head.weight.mul_(20)
    path = tmp_path / arch
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def make_engine(path: str, tokenizer, backend: AttentionBackendKind,
                budget_tokens: int = 24) -> LLMEngine:
    cfg = EngineConfig(model_path=path, attention_backend=backend, num_threads=2,
                       cache=CacheConfig(block_size=16, num_blocks=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget_tokens))
    return LLMEngine(cfg, tokenizer=tokenizer)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_hf(tmp_path, tokenizer, arch):
    """Our model loaded from an HF safetensors directory gives HF's logits (float32, 1e-4)
    for every position of a prompt (Qwen2 exercises q/k/v biases; untied lm_head)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path, arch)
    engine = make_engine(path, tokenizer, AttentionBackendKind.TORCH, budget_tokens=256)
    ids = list(range(100, 140))
    engine.add_request("x", ids, SamplingParams(temperature=0.0, max_tokens=1))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    from scission.engine.attention import TorchAttentionBackend
    from scission.engine.model_runner import build_model_input

    sched = engine.scheduler.schedule()
    inp = build_model_input(sched, 16)
    attn = TorchAttentionBackend()
    attn.plan(inp.metadata)
    hidden = engine.model(inp.input_ids, inp.positions, engine.kv_cache.layers, attn)
    logits = engine.model.compute_logits(hidden)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_triton_backend_equals_torch_backend(tmp_path, tokenizer):
    """Under the Triton interpreter, the engine's greedy tokens with the Triton attention
    backend equal the torch backend's, with chunked prefill (24-token budget) mixing prefill
    chunks and decodes of ragged prompts."""
    path = save_tiny(tmp_path, "llama")
    prompts = [list(range(200, 237)), list(range(300, 305)), list(range(400, 417))]
    want = greedy_tokens(make_engine(path, tokenizer, AttentionBackendKind.TORCH), prompts, 8)
    got = greedy_tokens(make_engine(path, tokenizer, AttentionBackendKind.TRITON), prompts, 8)
    assert got == want
    assert len({tuple(t) for t in want}) > 1  # not a degenerate model
