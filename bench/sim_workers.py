"""Simulated workers of the cluster simulator: step times from a fitted ``PerformanceModel``.

- ``PrefillWorker`` (here): a FIFO of prompts, chunked prefill with a token budget per step; a
  finished prompt's KV stays held (its blocks count as in use) until the decode worker pulled
  it. Step ms = ``a + b·T + c·Σ(e² − s²)`` over the step's chunks ``[s, e)`` (T = Σ(e − s)):
  the fitted ``a + b·t + c·t²`` for a whole prompt, and causal attention's cost for a chunk.
- ``ServingWorker`` (decode or colocated role; ``sim_serving.py``): continuous batching.

Blocks: a request reserves ``ceil((prompt + output) / block_size)`` blocks when it joins the
decode batch, if they are free (no preemption; the engine grows the table per block and
preempts instead). KV waiting for a batch slot is not bounded by the cache (as if it stayed on
the prefill worker until there is room), but it counts as used in what the router sees.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING

from scission.cluster.planner.perf_model import PerformanceModel
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.worker_pool import WorkerLoad

if TYPE_CHECKING:
    from scission.bench.sim_cluster import ClusterSim
    from scission.bench.sim_workload import SimRequest


class WorkerState(enum.Enum):
    STARTING = "starting"  # loading the model: not registered yet
    SERVING = "serving"
    DRAINING = "draining"  # leaving: takes no new request, stops when idle
    FLIPPING = "flipping"  # draining, then serves as ``to_role``
    GONE = "gone"


class StepCosts:
    """The model's coefficients as plain floats (hot path)."""

    def __init__(self, model: PerformanceModel) -> None:
        p, d = model.prefill, model.decode
        self.pa, self.pb, self.pc = p.a_ms, p.b_ms_per_token, p.c_ms_per_token2
        self.da, self.db, self.dc = d.a_ms, d.b_ms_per_request, d.c_ms_per_context_token

    def step_ms(self, tokens: int, sq: int, rows: int, context: int) -> float:
        """One step with ``tokens`` prompt tokens (``sq`` = Σ(e² − s²) of their chunks) and
        ``rows`` decode rows holding ``context`` tokens."""
        if tokens and rows:
            return (max(self.pa, self.da) + self.pb * tokens + self.pc * sq
                    + self.db * rows + self.dc * context)
        if tokens:
            return self.pa + self.pb * tokens + self.pc * sq
        return self.da + self.db * rows + self.dc * context


class SimWorker:
    """State shared by both kinds; ``version`` invalidates scheduled step ends."""

    def __init__(self, sim: ClusterSim, info: WorkerInfo, spawned_at_s: float) -> None:
        self.sim = sim
        self.info = info
        self.spawned_at_s = spawned_at_s
        self.role_since_s = spawned_at_s  # its start, or its last flip (WorkerInfo.role_since_s)
        self.state = WorkerState.STARTING
        self.to_role: WorkerRole | None = None
        self.flip_scheduled = False
        self.busy = False
        self.version = 0
        self.num_blocks = info.num_blocks
        self.block_size = info.block_size
        self._load: WorkerLoad | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> WorkerRole:
        return self.info.role

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def load(self) -> WorkerLoad:
        """What the router sees (cached until the worker's state changes)."""
        if self._load is None:
            self._load = self._make_load()
        return self._load

    def _make_load(self) -> WorkerLoad:
        raise NotImplementedError

    def _schedule_end(self, at_s: float) -> None:
        self.version += 1
        self.busy = True
        self.sim.schedule_step_end(at_s, self, self.version)


class PrefillWorker(SimWorker):
    def __init__(self, sim: ClusterSim, info: WorkerInfo, spawned_at_s: float) -> None:
        super().__init__(sim, info, spawned_at_s)
        self.queue: deque[SimRequest] = deque()  # head may be partly prefilled
        self.queued_tokens = 0  # prompt tokens not yet computed
        self.held_blocks = 0  # blocks of prompts being computed or waiting for their pull
        self.num_held = 0  # prompts computed, KV not yet pulled
        self._chunks: list[tuple[SimRequest, int]] = []

    def _make_load(self) -> WorkerLoad:
        return WorkerLoad(self.queued_tokens, max(self.num_blocks - self.held_blocks, 0),
                          self.num_blocks, len(self.queue) + self.num_held)

    def is_idle(self) -> bool:
        return not self.busy and not self.queue and self.num_held == 0

    def submit(self, req: SimRequest) -> None:
        self.queue.append(req)
        self.queued_tokens += req.prompt_tokens
        self._load = None
        if not self.busy:
            self._start_step()

    def release(self, req: SimRequest) -> None:
        """The decode worker pulled the prompt's KV."""
        self.held_blocks -= self.blocks(req.prompt_tokens)
        self.num_held -= 1
        self._load = None

    def evict(self) -> list[SimRequest]:
        """The drain deadline passed: queued prompts (the head maybe partly computed; a step in
        progress is lost) are returned to be placed again, nothing streamed yet. Computed KV
        stays held until its decode worker pulls it."""
        in_step = {id(req) for req, _ in self._chunks} if self.busy else set()
        if self.busy:
            self.version += 1  # the scheduled step end is void
            self.busy = False
        out = list(self.queue)
        for req in out:
            if req.prefilled_tokens > 0 or id(req) in in_step:  # its blocks were taken
                self.held_blocks -= self.blocks(req.prompt_tokens)
            req.prefilled_tokens = 0
        self.queue.clear()
        self.queued_tokens = 0
        self._load = None
        return out

    def _expire(self) -> None:
        """The router gave up (``prefill_timeout_s`` after arrival) on unstarted prompts."""
        deadline_s = self.sim.now - self.sim.cfg.prefill_timeout_s
        queue = self.queue
        head = queue.popleft() if queue and queue[0].prefilled_tokens > 0 else None
        while queue and queue[0].arrival_s < deadline_s:  # FIFO: the oldest come first
            req = queue.popleft()
            self.queued_tokens -= req.prompt_tokens
            self._load = None
            self.sim.on_timeout(req, placed_here=True)
        if head is not None:  # partly prefilled: it runs to the end
            queue.appendleft(head)

    def _start_step(self) -> None:
        self._expire()
        if not self.queue:
            if self.is_idle():
                self.sim.on_idle(self)
            return
        budget, tokens, sq = self.sim.cfg.prefill_budget_tokens, 0, 0
        chunks = self._chunks = []
        for req in self.queue:
            s = req.prefilled_tokens
            if s == 0:
                self.held_blocks += self.blocks(req.prompt_tokens)
            n = min(req.prompt_tokens - s, budget)
            e = s + n
            sq += e * e - s * s
            tokens += n
            budget -= n
            chunks.append((req, n))
            if budget == 0:
                break
        self._load = None
        self._step_ms = self.sim.costs.step_ms(tokens, sq, 0, 0)
        self._step_tokens = tokens
        self._schedule_end(self.sim.now + self._step_ms / 1e3)

    def on_step_end(self) -> None:
        sim = self.sim
        self.busy = False
        for req, n in self._chunks:
            req.prefilled_tokens += n
            self.queued_tokens -= n
            if req.prefilled_tokens == req.prompt_tokens:
                assert self.queue[0] is req, "prompts finish in FIFO order"
                self.queue.popleft()
                self.num_held += 1
                sim.on_prefilled(req, self)
        self._load = None
        sim.on_sample(self, self._step_tokens, 0, 0, self._step_ms, 1)
        if self.queue:
            self._start_step()
        elif self.is_idle():
            sim.on_idle(self)
