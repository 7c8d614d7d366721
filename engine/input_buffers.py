"""Persistent host buffers for one step's model inputs, filled in place every step.

Rebuilding ``input_ids``, ``positions``, ``slot_mapping``, the block table and the sequence
lengths from Python lists costs a dozen tensor constructions per step. ``InputBuffers`` keeps
one numpy array per input, shared with a torch tensor (``torch.from_numpy``), sized for the
largest step; a step writes the requests' values into the front of each array and hands out
views of the used part (as vLLM v1's ``GPUModelRunner`` input batch). Positions and slots are
computed with vectorized numpy from the per-request starts and lengths::

    positions  start_r + (t - cu_seqlens_q[r])           for token t of request r
    slot       block_table[r, pos // block_size] * block_size + pos % block_size

The buffers grow (to the next power of two) when a step needs more room. The views handed out
stay valid until the next ``fill``: a ``ModelInput`` lives for one step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from scission.engine.attention import AttentionMetadata
from scission.engine.request import Request
from scission.engine.scheduler import SchedulerOutput


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

    @property
    def samples_every_row(self) -> bool:
        """Every token row is sampled, in order (pure decode): ``hidden`` needs no gather."""
        return len(self.sampled_requests) == self.input_ids.shape[0]


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


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


class InputBuffers:
    """Preallocated int buffers for up to ``max_tokens`` tokens of ``max_reqs`` requests with
    block tables of up to ``max_blocks`` entries (each grows on demand).

    Args:
        block_size: tokens per KV block.
        device: where the model runs; on a non-CPU device the used part of each buffer is
            copied there (non-blocking) after filling.
    """

    def __init__(self, block_size: int, max_tokens: int = 256, max_reqs: int = 64,
                 max_blocks: int = 64, device: str | torch.device = "cpu") -> None:
        self.block_size = block_size
        self.device = torch.device(device)
        self._alloc_tokens(max_tokens)
        self._alloc_reqs(max_reqs, max_blocks)

    def _alloc_tokens(self, n: int) -> None:
        self.ids = np.zeros(n, np.int64)
        self.positions = np.zeros(n, np.int64)
        self.slots = np.zeros(n, np.int64)
        self._t = {k: torch.from_numpy(getattr(self, k)) for k in ("ids", "positions", "slots")}

    def _alloc_reqs(self, n: int, max_blocks: int) -> None:
        self.table = np.zeros((n, max_blocks), np.int32)
        self.cu = np.zeros(n + 1, np.int32)
        self.seq_lens = np.zeros(n, np.int32)
        self.logits_idx = np.zeros(n, np.int64)
        self._r = {k: torch.from_numpy(getattr(self, k))
                   for k in ("table", "cu", "seq_lens", "logits_idx")}

    def _ensure(self, num_tokens: int, num_reqs: int, max_blocks: int) -> None:
        if num_tokens > len(self.ids):
            self._alloc_tokens(_pow2_at_least(num_tokens, len(self.ids)))
        if num_reqs > len(self.seq_lens) or max_blocks > self.table.shape[1]:
            self._alloc_reqs(_pow2_at_least(num_reqs, len(self.seq_lens)),
                             _pow2_at_least(max_blocks, self.table.shape[1]))

    def fill(self, out: SchedulerOutput) -> ModelInput:
        """Flatten the step's requests into the buffers (see the module docstring)."""
        sched = out.scheduled
        num_reqs = len(sched)
        query_lens = [n for _, n in sched]
        starts = [req.num_computed_tokens for req, _ in sched]
        max_blocks = max(len(req.block_table) for req, _ in sched)
        num_tokens = sum(query_lens)
        self._ensure(num_tokens, num_reqs, max_blocks)
        ids, table = self.ids, self.table
        cu = self.cu
        cu[0] = 0
        np.cumsum(query_lens, out=cu[1 : num_reqs + 1])
        sampled: list[Request] = []
        mm_rows: list[int] = []
        mm_embeds: list[torch.Tensor] = []
        for i, (req, n) in enumerate(sched):
            start, row0 = starts[i], int(cu[i])
            if n == 1:
                ids[row0] = req.all_token_ids[start]
            else:
                ids[row0 : row0 + n] = req.all_token_ids[start : start + n]
            if req.mm_inputs:
                rows, embeds = gather_mm_embeddings(req, start, n, row0)
                mm_rows += rows
                mm_embeds += embeds
            bt = req.block_table
            table[i, : len(bt)] = bt
            table[i, len(bt) : max_blocks] = 0
            if start + n == req.num_tokens:
                self.logits_idx[len(sampled)] = row0 + n - 1
                sampled.append(req)
        seq_lens = np.add(starts, query_lens, out=self.seq_lens[:num_reqs],
                          dtype=np.int32, casting="unsafe")
        pos, slots = self.positions[:num_tokens], self.slots[:num_tokens]
        if num_tokens == num_reqs:  # pure decode: one token per request
            np.subtract(seq_lens, 1, out=pos, casting="unsafe")
            req_idx = np.arange(num_reqs)
        else:
            req_idx = np.repeat(np.arange(num_reqs), query_lens)
            np.subtract(np.arange(num_tokens), np.repeat(cu[:num_reqs] - np.asarray(starts),
                                                         query_lens), out=pos)
        bs = self.block_size
        np.add(table[req_idx, pos // bs].astype(np.int64) * bs, pos % bs, out=slots)
        md = AttentionMetadata(
            cu_seqlens_q=self._dev(self._r["cu"][: num_reqs + 1]),
            seq_lens=self._dev(self._r["seq_lens"][:num_reqs]),
            block_table=self._dev(self._r["table"][:num_reqs, :max_blocks]),
            slot_mapping=self._dev(self._t["slots"][:num_tokens]),
            max_seqlen_q=max(query_lens),
            max_seq_len=int(seq_lens.max()),
            block_size=bs,
            query_lens=tuple(query_lens),
            seq_lens_host=tuple(seq_lens.tolist()),
            slots_all_valid=True,
        )
        return ModelInput(
            self._dev(self._t["ids"][:num_tokens]), self._dev(self._t["positions"][:num_tokens]),
            md, self._dev(self._r["logits_idx"][: len(sampled)]), tuple(sampled),
            self._dev(torch.tensor(mm_rows, dtype=torch.int64)) if mm_rows else None,
            torch.cat(mm_embeds) if mm_embeds else None)

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)


def build_model_input(out: SchedulerOutput, block_size: int) -> ModelInput:
    """One step's inputs in fresh buffers (tests and one-off callers; the runner reuses its
    ``InputBuffers``)."""
    return InputBuffers(block_size, max_tokens=1, max_reqs=1, max_blocks=1).fill(out)
