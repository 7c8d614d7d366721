"""Turns a ``SchedulerOutput`` into model inputs, runs the model and samples.

Index arithmetic for a request scheduled ``n`` tokens this step::

    positions  num_computed_tokens ........ num_computed_tokens + n - 1
    slot       block_table[pos // block_size] * block_size + pos % block_size
    sample     only if num_computed_tokens + n == num_tokens (the chunk reaches the end)
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from scission.engine.attention import AttentionBackend, AttentionMetadata
from scission.engine.kv_cache import KVCache
from scission.engine.model import LlamaForCausalLM
from scission.engine.request import Request
from scission.engine.sampler import Sampler
from scission.engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64, rows of the flattened batch
    sampled_requests: tuple[Request, ...]  # requests that get a token this step
    # Image embeddings replacing the token embeddings of their rows; None without images.
    mm_rows: torch.Tensor | None = None  # [num_mm_rows] int64, rows of the flattened batch
    mm_embeds: torch.Tensor | None = None  # [num_mm_rows, hidden_size], model dtype


def gather_mm_embeddings(req: Request, start: int, n: int, row0: int
                         ) -> tuple[list[int], list[torch.Tensor]]:
    """Rows (of the flattened batch) and embeddings of the request's image positions in the
    chunk ``[start, start + n)``, whose first token is batch row ``row0``::

        prompt     |..... segment [offset, end) .....|
        chunk           |<-- [start, start + n) -->|
        rows            row0 + (p - start) for image positions p inside the chunk
    """
    rows: list[int] = []
    embeds: list[torch.Tensor] = []
    for mm in req.mm_inputs:
        if mm.end <= start or mm.offset >= start + n:
            continue
        lo = bisect.bisect_left(mm.embed_positions, start)
        hi = bisect.bisect_left(mm.embed_positions, start + n)
        if lo < hi:
            rows.extend(row0 + p - start for p in mm.embed_positions[lo:hi])
            embeds.append(mm.embeddings[lo:hi])
    return rows, embeds


def build_model_input(out: SchedulerOutput, block_size: int) -> ModelInput:
    """Flatten the step's requests into one token batch (see the module docstring)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens, seq_lens, logits_idx, sampled = [], [], [], []
    mm_rows: list[int] = []
    mm_embeds: list[torch.Tensor] = []
    max_blocks = max(len(r.block_table) for r, _ in out.scheduled)
    table = torch.zeros(len(out.scheduled), max_blocks, dtype=torch.int32)
    for i, (req, n) in enumerate(out.scheduled):
        start = req.num_computed_tokens
        if req.mm_inputs:
            rows, embeds = gather_mm_embeddings(req, start, n, len(ids))
            mm_rows += rows
            mm_embeds += embeds
        ids.extend(req.all_token_ids[start : start + n])
        pos = range(start, start + n)
        positions.extend(pos)
        bt = req.block_table
        slots.extend(bt[p // block_size] * block_size + p % block_size for p in pos)
        table[i, : len(bt)] = torch.tensor(bt, dtype=torch.int32)
        query_lens.append(n)
        seq_lens.append(start + n)
        if start + n == req.num_tokens:
            logits_idx.append(len(ids) - 1)
            sampled.append(req)
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0)
    md = AttentionMetadata(
        cu_seqlens_q=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_seqlen_q=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_lens=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )
    return ModelInput(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions),
                      md, torch.tensor(logits_idx, dtype=torch.int64), tuple(sampled),
                      torch.tensor(mm_rows, dtype=torch.int64) if mm_rows else None,
                      torch.cat(mm_embeds) if mm_embeds else None)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, attn: AttentionBackend) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attn = attn
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns request_id -> sampled token id for requests that sample."""
        inp = build_model_input(out, self.kv_cache.block_size)
        self.attn.plan(inp.metadata)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_cache.layers, self.attn,
                            inp.mm_rows, inp.mm_embeds)
        if not inp.sampled_requests:
            return {}
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        params = [r.sampling_params for r in inp.sampled_requests]
        positions = [r.num_output_tokens for r in inp.sampled_requests]
        tokens = self.sampler.sample(logits, params, positions).tolist()
        return {r.request_id: t for r, t in zip(inp.sampled_requests, tokens, strict=True)}
