"""Worker test helpers (not a test module): a tiny random-weight Llama saved with the default
tokenizer, a ``WorkerConfig`` over it, and a bounded wait."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from scission.engine.config import AttentionBackendKind, CacheConfig, EngineConfig, SchedulerConfig
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole
from scission.worker.runtime import WorkerConfig


def save_tiny_llama(path: str, tokenizer) -> str:
    """A 2-layer random-weight Llama (the default tokenizer's vocabulary) + that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.hf.save_pretrained(path)
    return path


def tiny_worker_config(tmp_path, tokenizer, etcd_server, etcd_prefix, worker_id: str,
                       role: WorkerRole = WorkerRole.COLOCATED, **overrides) -> WorkerConfig:
    """A worker (colocated unless ``role``) on the tiny model: 64 blocks of 16, 24 tokens
    per step."""
    model_path = save_tiny_llama(str(tmp_path / f"tiny-{worker_id}"), tokenizer)
    return WorkerConfig(
        worker_id=worker_id, role=role,
        etcd=EtcdClientConfig(endpoints=(etcd_server.endpoint,)),
        registry=RegistryConfig(prefix=etcd_prefix),
        engine=EngineConfig(model_path=model_path, num_threads=1,
                            attention_backend=AttentionBackendKind.TORCH,
                            cache=CacheConfig(block_size=16, num_blocks=64),
                            scheduler=SchedulerConfig(max_num_batched_tokens=24)),
        **overrides)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
