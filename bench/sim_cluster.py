"""The discrete-event core of the cluster simulator: one run of one contender.

A heap of events on a simulated clock (no threads, no sleeping). Arrivals are placed by the
real ``router.placement.Placer`` over a ``WorkerView`` of the simulated workers (what the
router's ``WorkerPool`` would report: queued prompt tokens, free KV blocks, running requests).
A prefilled prompt's KV reaches its decode worker ``kv_transfer_s`` later. Finished requests go
into the router's own ``SloTracker`` (``router/slo.py``) on the simulated clock; every
``interval_s`` its cluster window, the workers and the engine steps since the last tick become a
``TickInput`` for the real ``PlannerCore.on_tick`` (when the contender has a planner), and the
decision goes to the simulated controller (``sim_controller.py``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from scission.bench.sim_controller import SimController
from scission.bench.sim_serving import ServingWorker
from scission.bench.sim_workers import PrefillWorker, SimWorker, StepCosts, WorkerState
from scission.bench.sim_workload import SimRequest
from scission.cluster.planner.adapter import combine_windows
from scission.cluster.planner.core import PlannerCore
from scission.cluster.planner.perf_model import PerformanceModel
from scission.cluster.planner.types import (
    Action,
    ForwardSample,
    TickInput,
    WorkerObservation,
)
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.config import PlacementConfig
from scission.router.placement import NoWorkersError, Placer
from scission.router.slo import RequestRecord, SloTracker
from scission.router.worker_pool import WorkerLoad

_STEP_END, _KV_READY, _READY, _FLIP_DONE, _TICK, _DRAIN_DEADLINE = range(6)


@dataclass(frozen=True)
class SimConfig:
    ttft_slo_ms: float = 8000.0
    tpot_slo_ms: float = 250.0
    num_blocks: int = 728  # KV blocks per worker (the engine's 512 MiB default, float32)
    block_size: int = 16
    prefill_budget_tokens: int = 1024  # tokens per step (SchedulerConfig default)
    max_num_seqs: int = 64  # rows per step (SchedulerConfig default)
    kv_transfer_s: float = 0.02  # prefill done -> KV on the decode worker
    start_delay_s: float = 15.0  # a new worker loads the model
    flip_delay_s: float = 1.0  # drained -> serving as the new role
    # A draining or flipping worker's requests migrate this long after its drain began
    # (ClusterConfig.drain_deadline_s): decode rows recompute prompt + streamed tokens on
    # another decode worker, queued prompts are placed again. None = they all finish there.
    drain_deadline_s: float | None = 60.0
    interval_s: float = 10.0  # planner tick (and timeline sample) period
    slo_window_s: float = 60.0  # the router's SLO window
    shape_window_s: float = 20.0  # the router's load-shape window (arrivals; SloTracker)
    # The router learns each request's max_tokens at arrival: True = clients ask for exactly
    # the tokens they get (as ``bench/loadgen.py`` sends them: max_tokens = output,
    # ignore_eos); False = not given, the planner sees output lengths only when requests finish.
    max_tokens_known: bool = True
    prefill_timeout_s: float = 120.0  # RouterConfig: an unstarted prompt then fails
    request_timeout_s: float = 600.0  # RouterConfig: a request not yet running then fails
    tail_s: float = 600.0  # after the last arrival, run at most this long
    max_samples_per_tick: int = 512  # engine steps handed to the planner per tick (latest)
    # When a request starts to count on its decode worker in the router's view (the decode
    # worker is chosen at arrival, by most free blocks): "placed" = at placement, with its
    # blocks (today's router counts it from placement: ``router/flows.py``); "pulled" = only
    # after its prefill (the router before that fix). ``sim_serving.ServingWorker._make_load``.
    decode_load: str = "placed"
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.ttft_slo_ms, self.tpot_slo_ms, self.interval_s, self.slo_window_s,
               self.shape_window_s) <= 0:
            raise ValueError("SLOs, interval and windows must be > 0")
        if min(self.num_blocks, self.block_size, self.prefill_budget_tokens,
               self.max_num_seqs) < 1:
            raise ValueError("worker sizes must be >= 1")
        if self.decode_load not in ("placed", "pulled"):
            raise ValueError(f"decode_load must be placed or pulled, got {self.decode_load!r}")


@dataclass
class Decision:
    at_s: float
    action: str
    loop: str
    targets: dict[str, int]
    reason: str
    flip_worker_id: str | None = None
    flip_worker_ids: list[str] = field(default_factory=list)


@dataclass
class SimRun:
    """What one run produced (requests are annotated in place)."""

    requests: list[SimRequest]
    timeline: list[dict] = field(default_factory=list)  # one row per tick
    decisions: list[Decision] = field(default_factory=list)  # changes only
    max_live_workers: int = 0
    num_migrated: int = 0  # requests moved off a worker at its drain deadline
    end_s: float = 0.0
    num_events: int = 0


class SimPool:
    """``placement.WorkerView`` over the simulated workers (serving ones only)."""

    def __init__(self, controller: SimController) -> None:
        self.controller = controller
        self._workers = controller.workers  # the same dict, updated in place
        self.by_role: dict[WorkerRole, list[WorkerInfo]] = {r: [] for r in WorkerRole}

    def refresh(self) -> None:
        self.by_role = {r: self.controller.routable(r) for r in WorkerRole}

    def workers(self, role: WorkerRole) -> list[WorkerInfo]:
        return self.by_role[role]

    def load(self, info: WorkerInfo) -> WorkerLoad:
        w = self._workers[info.worker_id]
        return w._load or w.load()  # the cached load, without a call (hot path)


class ClusterSim:
    def __init__(self, cfg: SimConfig, model: PerformanceModel, requests: list[SimRequest],
                 initial: dict[WorkerRole, int], budget: int,
                 planner: PlannerCore | None = None,
                 placement: PlacementConfig | None = None) -> None:
        self.cfg = cfg
        self.costs = StepCosts(model)
        self.requests = requests
        self.planner = planner
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = itertools.count()
        self.controller = SimController(self, budget)
        self.pool = SimPool(self.controller)
        self.placer = Placer(placement or PlacementConfig(), self.pool, seed=cfg.seed)
        self.tracker = SloTracker(cfg.ttft_slo_ms, cfg.tpot_slo_ms, cfg.slo_window_s,
                                  clock=lambda: self.now, wall_clock=lambda: self.now,
                                  shape_window_s=min(cfg.shape_window_s, cfg.slo_window_s))
        cap = max(cfg.max_samples_per_tick // 2, 1)
        self._samples = {True: deque(maxlen=cap), False: deque(maxlen=cap)}  # prefill?
        self.num_open = 0
        self.run_out = SimRun(requests)
        self.controller.start_initial(initial)

    # -- scheduling (called by workers and the controller) ------------------------------------
    def schedule_step_end(self, at_s: float, worker: SimWorker, version: int) -> None:
        heapq.heappush(self._heap, (at_s, next(self._seq), _STEP_END, worker, version))

    def schedule_ready(self, at_s: float, worker: SimWorker) -> None:
        heapq.heappush(self._heap, (at_s, next(self._seq), _READY, worker, 0))

    def schedule_flip(self, at_s: float, worker: SimWorker) -> None:
        heapq.heappush(self._heap, (at_s, next(self._seq), _FLIP_DONE, worker, 0))

    def schedule_drain_deadline(self, at_s: float, worker: SimWorker) -> None:
        heapq.heappush(self._heap, (at_s, next(self._seq), _DRAIN_DEADLINE, worker, 0))

    def refresh_pool(self) -> None:
        self.pool.refresh()

    # -- the loop ----------------------------------------------------------------------------
    def run(self, duration_s: float) -> SimRun:
        reqs, heap, pop = self.requests, self._heap, heapq.heappop
        n, i, events = len(reqs), 0, 0
        end_s = duration_s + self.cfg.tail_s
        heapq.heappush(heap, (self.cfg.interval_s, next(self._seq), _TICK, None, 0))
        while i < n or self.num_open > 0:
            t_arr = reqs[i].arrival_s if i < n else math.inf
            if heap[0][0] <= t_arr:
                t, _, kind, obj, version = pop(heap)
                if t > end_s:
                    break
                self.now = t
                events += 1
                if kind == _STEP_END:
                    if obj.version == version and obj.state is not WorkerState.GONE:
                        obj.on_step_end()
                elif kind == _KV_READY:
                    self._kv_ready(obj)
                elif kind == _TICK:
                    self._tick()
                    heapq.heappush(heap, (t + self.cfg.interval_s, next(self._seq), _TICK,
                                          None, 0))
                elif kind == _READY:
                    self.controller.on_ready(obj)
                elif kind == _DRAIN_DEADLINE:
                    self._drain_deadline(obj)
                else:
                    self.controller.on_flip_done(obj)
            else:
                self.now = t_arr
                self._arrive(reqs[i])
                i += 1
        self.run_out.end_s = self.now
        self.run_out.num_events = events + n
        self.run_out.max_live_workers = self.controller.max_live
        return self.run_out

    # -- request path ------------------------------------------------------------------------
    def _arrive(self, req: SimRequest) -> None:
        self.tracker.arrive(self.now, num_prompt_tokens=req.prompt_tokens,
                            max_tokens=req.output_tokens if self.cfg.max_tokens_known else 0)
        self.num_open += 1
        self._dispatch(req)

    def _dispatch(self, req: SimRequest) -> None:
        """Place a request that has streamed nothing yet (on arrival, or again after its
        prefill worker's drain deadline) and hand it to its worker(s)."""
        try:
            placement = self.placer.place(req.prompt_tokens, [], self.cfg.block_size)
        except NoWorkersError:
            self._unavailable(req)
            return
        workers = self.controller.workers
        dec = workers[placement.decode.worker_id]
        assert isinstance(dec, ServingWorker), "decode placement on a prefill worker"
        req.decode_worker = dec
        if placement.prefill is None:
            dec.submit_prompt(req)
            return
        pre = workers[placement.prefill.worker_id]
        assert isinstance(pre, PrefillWorker), "prefill placement on a serving worker"
        req.prefill_worker = pre
        self._count_on(dec, req, 1)
        pre.submit(req)

    def _unavailable(self, req: SimRequest) -> None:
        req.failed = True
        self.num_open -= 1
        self.tracker.finish(RequestRecord("unavailable", req.prompt_tokens, 0, 0.0))

    @staticmethod
    def _count_on(dec: ServingWorker, req: SimRequest, sign: int) -> None:
        """``dec`` starts (+1) or stops (-1) counting ``req``: placed there, prompt not yet
        pulled (``inbound`` and the blocks it will need)."""
        dec.inbound += sign
        dec.pending_blocks += sign * dec.blocks(req.work_prompt_tokens + req.work_output_tokens)
        dec._load = None

    def _unplace(self, req: SimRequest) -> None:
        """Its decode worker stops counting it (placed there, prompt not yet pulled)."""
        self._count_on(req.decode_worker, req, -1)
        self._maybe_idle(req.decode_worker)

    def on_prefilled(self, req: SimRequest, pre: PrefillWorker) -> None:
        """The prompt ran on a prefill worker: the first token streams now. A decode worker
        that stopped serving meanwhile (drained, flipped) is replaced by another, as the
        router re-checks its choice when the prefill returns (``router/flows.py``)."""
        req.first_token_s = self.now
        if req.decode_worker.state is not WorkerState.SERVING:
            self._unplace(req)
            try:
                placement = self.placer.place_decode()
            except NoWorkersError:
                pre.release(req)
                self._unavailable(req)
                self._maybe_idle(pre)
                return
            req.decode_worker = self.controller.workers[placement.decode.worker_id]
            self._count_on(req.decode_worker, req, 1)
        dec = req.decode_worker
        dec.inbound -= 1
        if req.output_tokens < 2:
            dec.pending_blocks -= dec.blocks(req.work_prompt_tokens + req.work_output_tokens)
            dec._load = None
            pre.release(req)
            self.on_finished(req)
            self._maybe_idle(dec)
            return
        dec.in_transit += 1
        dec._load = None
        heapq.heappush(self._heap, (self.now + self.cfg.kv_transfer_s, next(self._seq),
                                    _KV_READY, req, 0))

    def _kv_ready(self, req: SimRequest) -> None:
        pre, dec = req.prefill_worker, req.decode_worker
        pre.release(req)
        dec.in_transit -= 1
        if dec.evicted:  # past its drain deadline: the request migrates
            dec._load = None
            req.carry(1)
            self._migrate(req)
            self._maybe_idle(dec)
        else:
            dec.receive_kv(req)
        self._maybe_idle(pre)

    def _migrate(self, req: SimRequest) -> None:
        """Continue an evicted request on the decode-capable worker with the most free blocks
        (``Placer.place_decode``), recomputing prompt + streamed tokens there."""
        try:
            placement = self.placer.place_decode()
        except NoWorkersError:
            self._unavailable(req)
            return
        dec = self.controller.workers[placement.decode.worker_id]
        req.decode_worker, req.prefill_worker = dec, None
        dec.submit_prompt(req)

    def _drain_deadline(self, w: SimWorker) -> None:
        """``SimConfig.drain_deadline_s`` after ``w`` began to drain or flip."""
        if self.controller.workers.get(w.worker_id) is not w or \
                w.state not in (WorkerState.DRAINING, WorkerState.FLIPPING):
            return  # it left or flipped already
        evicted = w.evict()
        for req in evicted:
            if isinstance(w, PrefillWorker):
                self._unplace(req)
                self._dispatch(req)
            else:
                self._migrate(req)
        self.run_out.num_migrated += len(evicted)
        self._maybe_idle(w)

    def on_timeout(self, req: SimRequest, placed_here: bool) -> None:
        """The router's deadline passed before the request ran (``placed_here``: it was still
        queued on its prefill worker, counted on its decode worker)."""
        req.failed = True
        self.num_open -= 1
        if placed_here:
            self._unplace(req)
        self.tracker.finish(RequestRecord("deadline_exceeded", req.prompt_tokens, 0,
                                          (self.now - req.arrival_s) * 1e3))

    def on_first_token(self, req: SimRequest) -> None:
        if req.first_token_s < 0:
            req.first_token_s = self.now

    def on_finished(self, req: SimRequest) -> None:
        req.finish_s = self.now
        self.num_open -= 1
        n = req.output_tokens
        ttft_ms = (req.first_token_s - req.arrival_s) * 1e3
        e2e_ms = (self.now - req.arrival_s) * 1e3
        tpot_ms = (e2e_ms - ttft_ms) / (n - 1) if n > 1 else None
        self.tracker.finish(RequestRecord("ok", req.prompt_tokens, n, e2e_ms, ttft_ms=ttft_ms,
                                          tpot_ms=tpot_ms))

    def on_sample(self, worker: SimWorker, tokens: int, rows: int, context: float,
                  step_ms: float, num_steps: int) -> None:
        """An engine step (or ``num_steps`` identical-batch steps, averaged) ended now."""
        if self.planner is not None:
            self._samples[tokens > 0].append((worker.worker_id, worker.role, self.now, tokens,
                                              rows, round(context), step_ms))

    def on_idle(self, worker: SimWorker) -> None:
        if worker.state is not WorkerState.SERVING:
            self.controller.on_idle(worker)

    def _maybe_idle(self, worker: SimWorker) -> None:
        if worker.state is not WorkerState.SERVING and worker.is_idle():
            self.controller.on_idle(worker)

    # -- planner tick ------------------------------------------------------------------------
    def _tick(self) -> None:
        window = self.tracker.windows("sim")[0]
        ctl = self.controller
        self.run_out.timeline.append({
            "t_s": self.now,
            **{f"{r.value}_serving": ctl.count(r, WorkerState.SERVING) for r in WorkerRole},
            **{f"{r.value}_target": ctl.targets.get(r, 0) for r in WorkerRole},
            "live": len(ctl.workers), "arrival_rps": window.arrival_rps,
            "num_finished": window.num_finished, "ttft_p90_ms": window.ttft_p90_ms,
            "tpot_p90_ms": window.tpot_p90_ms, "attainment": window.attainment,
            "goodput_rps": window.goodput_rps})
        if self.planner is None:
            return
        slo = combine_windows([window])  # as the adapter reads the routers' windows
        samples = [ForwardSample(*s) for q in self._samples.values() for s in q]
        for q in self._samples.values():
            q.clear()
        inp = TickInput(now_s=self.now, targets=dict(ctl.targets), workers=self._observe(),
                        slo=slo, samples=samples, pending_change=ctl.pending())
        d = self.planner.on_tick(inp)
        if d.action is Action.NONE:
            return
        self.run_out.decisions.append(Decision(
            self.now, d.action.value, d.loop.value, {r.value: n for r, n in d.targets.items()},
            d.reason, d.flip_worker_id, list(d.flip_worker_ids)))
        ctl.apply(d.targets, d.flip_worker_ids, d.flip_to_role)

    def _observe(self) -> list[WorkerObservation]:
        """Registered workers (serving, or draining before they leave or flip)."""
        out = []
        for w in self.controller.workers.values():
            if w.state is WorkerState.STARTING:
                continue
            load = w.load()
            # what the worker itself reports (the engine's queues), not the router's view
            if isinstance(w, PrefillWorker):
                waiting, running = len(w.queue), w.num_held
            else:
                waiting, running = len(w.kv_waiting) + len(w.prompts), \
                    len(w.rows) + len(w.prefilling)
            out.append(WorkerObservation(
                worker_id=w.worker_id, role=w.role, started_at_s=w.role_since_s,
                draining=w.state is not WorkerState.SERVING,
                num_running=running, num_waiting=waiting,
                queued_prefill_tokens=load.queued_prefill_tokens,
                kv_usage=load.blocks_in_use / max(load.num_blocks, 1),
                kv_capacity_tokens=w.num_blocks * w.block_size))
        return out
