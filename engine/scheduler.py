"""Continuous batching with chunked prefill and recompute preemption.

NOTE on the scheduling algorithm (as in vLLM v1): there is no separate prefill and
decode phase. Each request has ``num_computed_tokens`` and ``num_tokens``; a step gives
each scheduled request some of the difference, within one token budget
(``max_num_batched_tokens``). Running requests go first, oldest first, so decodes
(1 token each) and unfinished prefill chunks keep making progress. A running request
that cannot get a block preempts the newest running request (its blocks are freed and
it re-enters the front of the waiting queue to be recomputed later). Waiting requests
are admitted FIFO while budget, ``max_num_seqs`` and blocks allow, each starting after
its longest cached prefix. A prefill larger than the remaining budget is chunked.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from scission.engine.block_manager import BlockManager
from scission.engine.config import SchedulerConfig
from scission.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[tuple[Request, int], ...]  # (request, num_scheduled_tokens), batch order
    preempted: tuple[str, ...]  # request ids preempted this step

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add_request(self, request: Request) -> None:
        """Queue a request; a request with its prompt KV already in place may run at once."""
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        for req in list(self.running):
            if req.status != RequestStatus.RUNNING or budget == 0:
                continue
            n = min(req.num_tokens_to_compute, budget)
            while not self._grow(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n is None:
                break
            self.waiting.popleft()
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
        assert budget >= 0, "token budget overrun"
        assert len(self.running) <= self.config.max_num_seqs, "max_num_seqs overrun"
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def finish(self, request: Request, status: RequestStatus, keep_blocks: bool = False) -> None:
        """Remove a request; its blocks are freed unless ``keep_blocks`` (prefill hold)."""
        assert status.is_finished, f"{status} is not a finished status"
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if not keep_blocks:
            self.block_manager.free(request.request_id, request.block_table)

    # -- helpers ------------------------------------------------------------------
    def _grow(self, req: Request, n: int) -> bool:
        total = req.num_computed_tokens + n
        return self.block_manager.allocate(req.request_id, req.block_table, total) is not None

    def _admit(self, req: Request, budget: int) -> int | None:
        """Allocate blocks for the request's first chunk; returns its size or None."""
        prefix: list[int] = []
        if req.num_computed_tokens == 0:
            prefix = self.block_manager.cached_prefix(req.all_token_ids, req.mm_inputs)
        num_computed = req.num_computed_tokens or len(prefix) * self.block_manager.block_size
        n = min(req.num_tokens - num_computed, budget)
        if self.block_manager.allocate(req.request_id, req.block_table, num_computed + n,
                                       prefix) is None:
            return None
        if prefix:
            req.num_computed_tokens = num_computed
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_computed
        req.status = RequestStatus.RUNNING
        return n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req.request_id, req.block_table)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.warning("preempted request %s (recompute; %d preemptions)",
                       req.request_id, req.num_preemptions)
