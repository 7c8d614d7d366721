"""The simulated decode/colocated worker (``sim_workers.py`` has the prefill worker, the step
costs and the block rule).

Continuous batching: each step advances every running row one token, ``a + b·rows + c·Σ
context`` ms. KV that arrived (disaggregated) waits for a batch slot (``max_num_seqs``) and
blocks. Prompts placed here (colocated, or local prefill) are prefilled in the same steps, in
the token budget left after the decode rows; a step with both costs ``max(a_p, a_d) + prefill
part + decode part`` (one fixed cost).

Decode without prefill work is simulated in *runs* of steps: between two changes of the batch
(a row finishes or a new one can join) every step has the same rows and the context grows by
``rows`` per step, so the run's duration is closed-form and one event covers it. A request
that can join cuts the run at the end of the step in progress.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING

from scission.bench.sim_workers import SimWorker
from scission.router.worker_pool import WorkerLoad

if TYPE_CHECKING:
    from scission.bench.sim_cluster import ClusterSim
    from scission.bench.sim_workload import SimRequest
    from scission.registry.workers import WorkerInfo


class ServingWorker(SimWorker):
    """Decode or colocated role (a decode worker also prefills a prompt placed on it)."""

    def __init__(self, sim: ClusterSim, info: WorkerInfo, spawned_at_s: float) -> None:
        super().__init__(sim, info, spawned_at_s)
        self.rows: list[tuple[int, int, SimRequest]] = []  # heap of (finish_step, index, req)
        self.context = 0  # Σ over rows of the tokens each holds (prompt + outputs so far)
        self.step_index = 0  # decode steps completed
        self.kv_waiting: deque[SimRequest] = deque()  # KV arrived, waiting for a batch slot
        self.prompts: deque[SimRequest] = deque()  # placed here to prefill, not admitted
        self.prefilling: deque[SimRequest] = deque()  # admitted, prompt partly computed
        self.queued_tokens = 0  # prompt tokens of ``prompts`` + ``prefilling`` not computed
        self.blocks_used = 0  # reserved by rows and admitted prompts (prompt + output)
        self.blocks_waiting = 0  # prompt KV of ``kv_waiting`` (held here or still upstream)
        self.inbound = 0  # placed here, prompt still on a prefill worker
        self.pending_blocks = 0  # blocks (prompt + output) of requests placed, KV not here
        self.in_transit = 0  # prompt done, KV on its way
        self.evicted = False  # past its drain deadline: KV landing here migrates
        # the run in progress: start, first step ms, steps planned, rows; or a mixed step
        self._t0 = 0.0
        self._a_ms = 0.0
        self._k = 0
        self._rows_in_run = 0
        self._mixed: list[tuple[SimRequest, int]] | None = None
        self._mixed_sample = (0, 0, 0, 0.0)

    # -- what the router and the controller see ----------------------------------------------
    def _make_load(self) -> WorkerLoad:
        """``SimConfig.decode_load``: "placed" = from placement on, with the blocks it will
        need (the router counts it from placement: ``router/flows.py``); "pulled" = once its
        prefill is done (the router before that fix)."""
        running = (len(self.rows) + len(self.prefilling) + len(self.prompts)
                   + len(self.kv_waiting) + self.in_transit)
        used = self.blocks_used + self.blocks_waiting
        if self.sim.cfg.decode_load == "placed":
            running += self.inbound
            used += self.pending_blocks
        return WorkerLoad(self.queued_tokens, max(self.num_blocks - used, 0), self.num_blocks,
                          running)

    def is_idle(self) -> bool:
        """Nothing runs or waits here. Requests placed here whose prompt is still on a
        prefill worker (``inbound``) do not count: as on the real worker, whose drain waits
        only for its own requests, they pick another decode worker when their prefill is done
        (``ClusterSim.on_prefilled``)."""
        return (not self.busy and not self.rows and not self.kv_waiting and not self.prompts
                and not self.prefilling and self.in_transit == 0)

    def evict(self) -> list[SimRequest]:
        """The drain deadline passed (``SimConfig.drain_deadline_s``): every request here stops
        and is returned to migrate, its streamed tokens carried (``SimRequest.carry``). A run
        of steps in progress keeps the steps complete by now; a prefill step in progress is
        lost. The worker is then empty (KV in transit to it still lands, and migrates)."""
        if self.busy:
            if self._mixed is None:
                k = min(self._steps_done((self.sim.now - self._t0) * 1e3), self._k)
                if k:
                    self._advance(k)
            self.version += 1  # the scheduled step end is void
            self.busy, self._mixed = False, None
        out = []
        for _, _, req in self.rows:
            req.carry(req.work_output_tokens - (req.finish_step - self.step_index))
            out.append(req)
        for req in self.kv_waiting:
            req.carry(1)  # the prefill worker streamed the first token
            out.append(req)
        for req in (*self.prefilling, *self.prompts):
            req.carry(0)
            out.append(req)
        self.rows, self.context = [], 0
        self.kv_waiting.clear()
        self.prefilling.clear()
        self.prompts.clear()
        self.queued_tokens = self.blocks_used = self.blocks_waiting = 0
        self.evicted = True
        self._load = None
        return out

    # -- intake ------------------------------------------------------------------------------
    def receive_kv(self, req: SimRequest) -> None:
        """A prompt's KV arrived from a prefill worker (this worker still takes it)."""
        self.pending_blocks -= self.blocks(req.work_prompt_tokens + req.work_output_tokens)
        self.blocks_waiting += self.blocks(req.work_prompt_tokens)
        self.kv_waiting.append(req)
        self._load = None
        if not self.busy:
            self._kick()
        elif self._can_admit():
            self._cut_run()

    def submit_prompt(self, req: SimRequest) -> None:
        """A prompt to prefill here (colocated / local prefill)."""
        self.prompts.append(req)
        self.queued_tokens += req.work_prompt_tokens
        self._load = None
        if not self.busy:
            self._kick()
        elif self._can_admit():
            self._cut_run()

    def _can_admit(self) -> bool:
        return len(self.rows) + len(self.prefilling) < self.sim.cfg.max_num_seqs

    def _admit_kv(self) -> None:
        """KV-arrived requests join the batch, FIFO, while slots and blocks allow (an empty
        worker always takes one, so a request larger than the cache still runs)."""
        max_seqs = self.sim.cfg.max_num_seqs
        deadline_s = self.sim.now - self.sim.cfg.request_timeout_s
        while self.kv_waiting and self.kv_waiting[0].arrival_s < deadline_s:
            req = self.kv_waiting.popleft()  # the router gave up on it
            self.blocks_waiting -= self.blocks(req.work_prompt_tokens)
            self.sim.on_timeout(req, placed_here=False)
        while self.prompts and self.prompts[0].arrival_s < deadline_s:
            req = self.prompts.popleft()
            self.queued_tokens -= req.work_prompt_tokens
            self.sim.on_timeout(req, placed_here=False)
        while self.kv_waiting and len(self.rows) + len(self.prefilling) < max_seqs:
            req = self.kv_waiting[0]
            need = self.blocks(req.work_prompt_tokens + req.work_output_tokens)
            if self.blocks_used + need > self.num_blocks and (self.rows or self.prefilling):
                break
            self.kv_waiting.popleft()
            self.blocks_waiting -= self.blocks(req.work_prompt_tokens)
            self.blocks_used += need
            self._add_row(req)

    def _add_row(self, req: SimRequest) -> None:
        """``req`` holds prompt + first token; it finishes after ``output - 1`` more steps."""
        req.finish_step = self.step_index + req.work_output_tokens - 1
        heapq.heappush(self.rows, (req.finish_step, req.index, req))
        self.context += req.work_prompt_tokens + 1

    # -- stepping ----------------------------------------------------------------------------
    def _kick(self) -> None:
        """Start the next step (or run of steps) if there is work; idle otherwise."""
        self._admit_kv()
        if self.prompts or self.prefilling:
            self._start_mixed()
        elif self.rows:
            self._start_run()
        else:
            self._load = None
            if self.is_idle():
                self.sim.on_idle(self)

    def _start_run(self) -> None:
        rows = len(self.rows)
        self._t0 = self.sim.now
        self._a_ms = self.sim.costs.step_ms(0, 0, rows, self.context)
        self._k = self.rows[0][0] - self.step_index
        assert self._k >= 1, "a row outlived its finish step"
        self._rows_in_run = rows
        self._mixed = None
        self._load = None
        self._schedule_end(self._t0 + self._run_ms(self._k) / 1e3)

    def _run_ms(self, k: int) -> float:
        """Duration of the first ``k`` steps of the run: Σ_j (a + c·rows·j), j < k."""
        return k * self._a_ms + self.sim.costs.dc * self._rows_in_run * k * (k - 1) / 2

    def _steps_done(self, dt_ms: float) -> int:
        """Steps of the run complete ``dt_ms`` after it started (largest n: run_ms(n) ≤ dt)."""
        h = self.sim.costs.dc * self._rows_in_run / 2
        if h <= 0.0:
            n = int(dt_ms // self._a_ms)
        else:
            b = self._a_ms - h
            n = int((-b + math.sqrt(b * b + 4 * h * dt_ms)) / (2 * h))
        while self._run_ms(n + 1) <= dt_ms:
            n += 1
        while n > 0 and self._run_ms(n) > dt_ms:
            n -= 1
        return n

    def _cut_run(self) -> None:
        """New work can join: end the run after the step in progress."""
        if self._mixed is not None:
            return  # a single step: the next one takes the new work
        k = self._steps_done((self.sim.now - self._t0) * 1e3) + 1
        if k < self._k:
            self._k = k
            self._schedule_end(self._t0 + self._run_ms(k) / 1e3)

    def _start_mixed(self) -> None:
        """One step: every row decodes; prompts get the budget left, FIFO."""
        cfg, rows = self.sim.cfg, len(self.rows)
        budget, tokens, sq = cfg.prefill_budget_tokens - rows, 0, 0
        chunks: list[tuple[SimRequest, int]] = []
        for req in self.prefilling:
            if budget <= 0:
                break
            tokens, sq, budget = self._chunk(req, budget, tokens, sq, chunks)
        while budget > 0 and self.prompts and rows + len(self.prefilling) < cfg.max_num_seqs:
            req = self.prompts[0]
            need = self.blocks(req.work_prompt_tokens + req.work_output_tokens)
            if self.blocks_used + need > self.num_blocks and (rows or self.prefilling):
                break
            self.prompts.popleft()
            self.blocks_used += need
            self.prefilling.append(req)
            tokens, sq, budget = self._chunk(req, budget, tokens, sq, chunks)
        if not chunks:  # the rows took the whole budget (or no blocks): decode only
            self._start_run()
            return
        step_ms = self.sim.costs.step_ms(tokens, sq, rows, self.context)
        self._mixed = chunks
        self._mixed_sample = (tokens, rows, self.context, step_ms)
        self._load = None
        self._schedule_end(self.sim.now + step_ms / 1e3)

    @staticmethod
    def _chunk(req: SimRequest, budget: int, tokens: int, sq: int,
               chunks: list[tuple[SimRequest, int]]) -> tuple[int, int, int]:
        s = req.prefilled_tokens
        n = min(req.work_prompt_tokens - s, budget)
        e = s + n
        chunks.append((req, n))
        return tokens + n, sq + e * e - s * s, budget - n

    def on_step_end(self) -> None:
        self.busy = False
        if self._mixed is None:
            k, rows = self._k, self._rows_in_run
            mean_ctx = self.context + rows * (k - 1) / 2
            self.sim.on_sample(self, 0, rows, mean_ctx, self._run_ms(k) / k, k)
            self._advance(k)
        else:
            tokens, rows, context, step_ms = self._mixed_sample
            self.sim.on_sample(self, tokens, rows, context, step_ms, 1)
            chunks, self._mixed = self._mixed, None
            if rows:
                self._advance(1)
            self._finish_chunks(chunks)
        self._load = None
        self._kick()

    def _advance(self, k: int) -> None:
        """``k`` decode steps of the current rows are done; finished rows leave."""
        self.step_index += k
        self.context += len(self.rows) * k
        rows, sim = self.rows, self.sim
        while rows and rows[0][0] <= self.step_index:
            req = heapq.heappop(rows)[2]
            self.context -= req.work_prompt_tokens + req.work_output_tokens
            self.blocks_used -= self.blocks(req.work_prompt_tokens + req.work_output_tokens)
            sim.on_finished(req)

    def _finish_chunks(self, chunks: list[tuple[SimRequest, int]]) -> None:
        for req, n in chunks:
            req.prefilled_tokens += n
            self.queued_tokens -= n
            if req.prefilled_tokens < req.work_prompt_tokens:
                continue
            assert self.prefilling[0] is req, "prompts finish in FIFO order"
            self.prefilling.popleft()
            self.sim.on_first_token(req)
            if req.work_output_tokens < 2:
                self.blocks_used -= self.blocks(req.work_prompt_tokens + req.work_output_tokens)
                self.sim.on_finished(req)
            else:
                self._add_row(req)
