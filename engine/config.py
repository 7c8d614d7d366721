"""Frozen configuration dataclasses for the model executor.

One config per component (STYLE §3): ``ModelConfig`` is read from the checkpoint,
``CacheConfig`` sizes the paged KV cache, ``SchedulerConfig`` bounds each step,
``EngineConfig`` ties them together for one worker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

# EngineConfig.weight_quantization's values (engine/quant.py; "none" = the model's dtype).
WEIGHT_QUANTIZATION_CHOICES = ("none", "int4", "int8", "w8a8", "w4a8")


class KVLayout(enum.Enum):
    """Memory order of the paged KV cache (``engine/kv_cache.py``; both expose per-layer
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` views).

    ``LAYER_MAJOR``: ``[num_layers, 2, num_blocks, ...]``: a layer's K (or V) cache is one
    contiguous tensor; a run of blocks is ``2 * num_layers`` byte ranges.
    ``BLOCK_MAJOR``: ``[num_blocks, num_layers, 2, ...]``: one block's K and V of every layer
    are one byte range, so a KV transfer needs one descriptor per run of blocks
    (``bench/README.md`` "KV transfer"); per-layer views are strided over blocks.
    """

    LAYER_MAJOR = "layer_major"
    BLOCK_MAJOR = "block_major"


class AttentionBackendKind(enum.Enum):
    """Which attention implementation runs over the paged KV cache."""

    AUTO = "auto"  # torch on CPU, triton on CUDA
    TORCH = "torch"
    TRITON = "triton"  # forced (e.g. under TRITON_INTERPRET=1 on CPU)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family checkpoint (Llama, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_id: str = "unknown"

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
        assert self.head_dim % 2 == 0, "rotary embedding needs an even head_dim"

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of K plus V for one block across all layers."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    ``num_blocks`` wins when set; otherwise it is derived from ``kv_cache_bytes``
    (``ModelConfig.kv_bytes_per_block``).
    """

    block_size: int = 16
    kv_cache_bytes: int = 512 * 1024**2
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # Block-major by measurement (bench/README.md "KV layout"): fragmented pulls 2.7-3.1x
    # faster at >= 4k tokens, engine steps within 0.5-2.1 % of layer-major.
    kv_layout: KVLayout = KVLayout.BLOCK_MAJOR

    def __post_init__(self) -> None:
        if not isinstance(self.kv_layout, KVLayout):  # a CLI / config string: "block_major"
            object.__setattr__(self, "kv_layout", KVLayout(self.kv_layout))
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets for continuous batching with chunked prefill."""

    max_num_seqs: int = 64  # requests in the running batch
    max_num_batched_tokens: int = 1024  # tokens (prefill chunks + decodes) per step

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("scheduler budgets must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one worker's engine needs. ``model_path`` None = the default model."""

    model_path: str | None = None
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    device: str = "cpu"
    attention_backend: AttentionBackendKind = AttentionBackendKind.AUTO
    num_threads: int | None = None  # torch intra-op threads; None = torch default
    # "none" | "int4" | "int8": weight-only quantized decoder linears + LM head (engine/quant.py,
    # CPU; int4 = 4-bit groups of 32, int8 = one scale per output row); "w8a8": int8 weights per
    # row and int8 activations per token through an int32 GEMM (engine/quant_w8a8.py, CPU);
    # "w4a8": 4-bit groups of 32 times int8 activations per 32 (llama.cpp's Q4_1 x Q8_1, a C
    # kernel built at start: kernels/w4a8.py, CPU). One of WEIGHT_QUANTIZATION_CHOICES.
    weight_quantization: str = "none"
    # Unquantized linears: "auto" = oneDNN with weights prepacked at load for float32/bfloat16
    # on CPU, eager and graph mode (engine/dense_linear.py), "onednn" = the same but an error
    # where unavailable, "torch" = plain F.linear.
    linear_backend: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # True = plain eager forward; False = graph mode (engine/compile.py: torch.compile of the
    # dense parts between attention calls, compiled at start, cache on disk).
    enforce_eager: bool = True
    # w4a8 only: every text step (decode, prefill, mixed) runs the decoder stack as one C call
    # (engine/native_decode.py, kernels/llama_decode.c); steps with image embeddings keep the
    # path above. False = torch.
    native_decode: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.weight_quantization not in WEIGHT_QUANTIZATION_CHOICES:
            raise ValueError(f"weight_quantization must be one of "
                             f"{', '.join(WEIGHT_QUANTIZATION_CHOICES)}, "
                             f"got {self.weight_quantization!r}")
        if self.linear_backend not in ("auto", "onednn", "torch"):
            raise ValueError(f"linear_backend must be auto, onednn or torch, "
                             f"got {self.linear_backend!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)
