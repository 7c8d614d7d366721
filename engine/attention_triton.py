"""Triton attention backend over the paged KV cache (CUDA default; CPU via TRITON_INTERPRET=1).

Per layer, ``run`` writes this step's K/V through ``slot_mapping`` (``kv_cache_write``) and
then picks one attention kernel for the whole batch, decided once in ``plan``:

- pure decode (every request has one query token): ``decode_attention``, split-K
  (FlashDecoding) when the longest context exceeds ``split_kv_tokens``, so long contexts
  still fill the GPU when the batch is small;
- otherwise (prefill chunks, possibly mixed with decodes): ``prefill_attention``, which
  treats a decode row as a chunk of length 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from scission.engine.attention import AttentionBackend, AttentionMetadata
from scission.kernels.decode_attention import decode_attention
from scission.kernels.kv_cache_write import kv_cache_write
from scission.kernels.prefill_attention import prefill_attention


@dataclass(frozen=True)
class _Plan:
    """What ``plan`` decided for one batch."""

    metadata: AttentionMetadata
    is_pure_decode: bool
    num_splits: int  # split-K factor for decode; 1 = single pass


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with the ``scission.kernels`` Triton kernels.

    Args:
        split_kv_tokens: context tokens per split-K partition in decode; contexts up to
            this length run in a single pass.
        max_splits: upper bound on the split-K factor.
    """

    def __init__(self, *, split_kv_tokens: int = 1024, max_splits: int = 16) -> None:
        assert split_kv_tokens > 0 and max_splits >= 1
        self.split_kv_tokens = split_kv_tokens
        self.max_splits = max_splits
        self._plan: _Plan | None = None

    def plan(self, metadata: AttentionMetadata) -> None:
        """Choose the kernel (and the split-K factor) for this batch; no device syncs."""
        pure_decode = metadata.is_pure_decode
        if pure_decode:
            assert all(n == 1 for n in metadata.query_lens), "decode rows must have q_len == 1"
        num_splits = 1
        if pure_decode and metadata.max_seq_len > self.split_kv_tokens:
            wanted = triton.cdiv(metadata.max_seq_len, self.split_kv_tokens)
            num_splits = min(self.max_splits, wanted)
        self._plan = _Plan(metadata, pure_decode, num_splits)

    @property
    def num_splits(self) -> int:
        """Split-K factor of the planned batch (1 for prefill/mixed batches)."""
        assert self._plan is not None, "plan() must be called first"
        return self._plan.num_splits

    def run(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]; rows past the batch undefined
        plan = self._plan
        assert plan is not None, "plan() must be called before run()"
        md = plan.metadata
        assert k_cache.shape[1] == md.block_size, f"cache block_size {k_cache.shape[1]} != plan"
        kv_cache_write(k, v, k_cache, v_cache, md.slot_mapping)
        out = torch.empty_like(q)
        if plan.is_pure_decode:
            n = md.num_reqs  # row r of q is request r's token
            decode_attention(q[:n], k_cache, v_cache, md.block_table, md.seq_lens, scale,
                             num_splits=plan.num_splits, out=out[:n])
        else:
            prefill_attention(q, k_cache, v_cache, md.block_table, md.seq_lens,
                              md.cu_seqlens_q, md.max_seqlen_q, scale, out=out)
        return out
