"""The contenders of the cluster simulator and the sweep that runs and scores them.

``Sweep.run`` runs one contender over the whole workload (memoized by name) and scores it per
phase and overall (``sim_report.score_run``). ``Sweep.run_isolated`` runs a static contender on
each phase's requests alone, from a cold start (no backlog from the phase before): the best
static per phase there is the per-phase optimum a planner could at most reach; the best static
per phase *in the continuous run* (``hindsight``) carries the previous phase's backlog, as the
planner does.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from scission.bench.sim_cluster import ClusterSim, SimConfig, SimRun
from scission.bench.sim_report import format_table, hindsight, score_run
from scission.bench.sim_workload import (
    Phase,
    SimRequest,
    shifting_workload,
    trace_workload,
)
from scission.bench.traces import TraceKind
from scission.cluster.planner.core import PlannerConfig, PlannerCore
from scission.cluster.planner.perf_model import PerformanceModel
from scission.registry.workers import WorkerRole

logger = logging.getLogger(__name__)

PLANNER, COLOCATED = "planner", "colocated"


@dataclass(frozen=True)
class Contender:
    name: str
    initial: dict[WorkerRole, int]
    planner: bool = False

    @classmethod
    def static(cls, prefill: int, budget: int) -> Contender:
        return cls(f"static {prefill}P:{budget - prefill}D",
                   {WorkerRole.PREFILL: prefill, WorkerRole.DECODE: budget - prefill})


class Workload:
    """The requests as plain tuples (each run gets fresh ``SimRequest`` objects)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.info: dict = {"trace": args.trace, "rate_rps": args.rate}
        if args.trace == "shifting":
            reqs, self.phases = shifting_workload(args.rate, args.duration_s, args.phase_s,
                                                  seed=args.seed)
        else:
            reqs, self.phases, info = trace_workload(
                TraceKind(args.trace), args.rate, args.duration_s, args.phase_s,
                args.length_scale, args.max_context_tokens)
            self.info.update(info)
        self.rows = [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.phase) for r in reqs]
        self.info.update(num_requests=len(self.rows),
                         mean_prompt_tokens=sum(r[1] for r in self.rows) / len(self.rows),
                         mean_output_tokens=sum(r[2] for r in self.rows) / len(self.rows))

    def requests(self) -> list[SimRequest]:
        return [SimRequest(i, *row) for i, row in enumerate(self.rows)]

    def requests_in(self, phase: Phase) -> list[SimRequest]:
        """The phase's requests alone, arrivals shifted to start at 0."""
        rows = [r for r in self.rows if phase.start_s <= r[0] < phase.end_s]
        return [SimRequest(i, t - phase.start_s, p, o, 0) for i, (t, p, o, _) in enumerate(rows)]


def sim_config(args: argparse.Namespace) -> SimConfig:
    return SimConfig(ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms,
                     kv_transfer_s=args.kv_transfer_ms / 1e3, start_delay_s=args.start_delay_s,
                     flip_delay_s=args.flip_delay_s, interval_s=args.interval_s,
                     slo_window_s=args.slo_window_s, shape_window_s=args.shape_window_s,
                     max_tokens_known=args.max_tokens_known, decode_load=args.decode_load,
                     seed=args.seed)


def run_one(c: Contender, cfg: SimConfig, model: PerformanceModel, workload: Workload,
            args: argparse.Namespace) -> tuple[SimRun, float]:
    planner = None
    if c.planner:
        planner = PlannerCore(PlannerConfig(slo_ttft_ms=cfg.ttft_slo_ms,
                                            slo_tpot_ms=cfg.tpot_slo_ms,
                                            max_workers=args.workers,
                                            interval_s=cfg.interval_s), model=model)
    start = time.perf_counter()
    sim = ClusterSim(cfg, model, workload.requests(), c.initial, args.workers, planner)
    run = sim.run(args.duration_s)
    wall_s = time.perf_counter() - start
    logger.info("%s: %d events in %.1f s wall, %d changes", c.name, run.num_events, wall_s,
                len(run.decisions))
    return run, wall_s


def scaled(model: PerformanceModel, speedup: float) -> PerformanceModel:
    """Every step ``speedup`` times faster (a faster worker of the same shape)."""
    d = model.to_dict()
    for part in ("prefill", "decode"):
        d[part] = {k: v / speedup for k, v in d[part].items()}
    return PerformanceModel.from_dict(d)


def static_grid(spec: str, budget: int) -> list[int]:
    if spec == "all":
        return list(range(1, budget))
    if spec.startswith("step:"):
        step = int(spec[5:])
        return sorted({*range(step, budget, step), 1, budget - 1})
    return sorted({int(x) for x in spec.split(",")})


class Sweep:
    """Runs contenders once each and scores them (memoized by name)."""

    def __init__(self, args: argparse.Namespace, model: PerformanceModel) -> None:
        self.args, self.model = args, model
        self.cfg = sim_config(args)
        self.workload = Workload(args)
        self.runs: dict[str, SimRun] = {}
        self.scores: dict[str, dict] = {}
        self.wall_s: dict[str, float] = {}
        self.initial: dict[str, dict[WorkerRole, int]] = {}
        self.isolated: dict[str, dict[str, dict]] = {}  # static -> phase -> scores

    @property
    def phases(self) -> list[Phase]:
        return self.workload.phases

    def run(self, c: Contender) -> None:
        if c.name in self.runs:
            return
        run, self.wall_s[c.name] = run_one(c, self.cfg, self.model, self.workload, self.args)
        self.runs[c.name], self.initial[c.name] = run, c.initial
        self.scores[c.name] = score_run(
            run, self.phases, self.cfg.ttft_slo_ms, self.cfg.tpot_slo_ms,
            {r.value: n for r, n in c.initial.items()},
            self.args.oscillation_intervals * self.cfg.interval_s)

    def run_isolated(self, c: Contender) -> None:
        """``c`` on each phase's requests alone (``tail_s`` after its last arrival)."""
        if c.name in self.isolated:
            return
        out = self.isolated[c.name] = {}
        for phase in self.phases:
            window = Phase(phase.name, 0.0, phase.duration_s)
            sim = ClusterSim(self.cfg, self.model, self.workload.requests_in(phase), c.initial,
                             self.args.workers)
            run = sim.run(phase.duration_s)
            out[phase.name] = score_run(run, [window], self.cfg.ttft_slo_ms,
                                        self.cfg.tpot_slo_ms, {}, 0.0)[phase.name]

    def statics(self) -> list[str]:
        return [n for n in self.runs if n.startswith("static")]

    def sweep_statics(self) -> None:
        n, spec = self.args.workers, self.args.static
        for p in static_grid(spec, n):
            self.run(Contender.static(p, n))
        if not spec.startswith("step:"):
            return
        step = int(spec[5:])
        offsets = sorted({d for d in (step // 2, step // 4) if d >= 1})
        windows = [p.name for p in self.phases] + ["all"]
        best = hindsight(self.scores, self.statics(), windows)
        for w in windows:  # refine around each window's best: ±K/2 and ±K/4
            p0 = int(best[w]["best_static"].split()[1].split("P")[0])
            for p in sorted({p0 + s * d for d in offsets for s in (-1, 1)}):
                if 1 <= p < n:
                    self.run(Contender.static(p, n))


def run_contenders(args: argparse.Namespace, model: PerformanceModel) -> Sweep:
    sweep = Sweep(args, model)
    kinds = set(args.contenders.split(","))
    n = args.workers
    if "static" in kinds:
        sweep.sweep_statics()
        if args.isolated:
            for p in static_grid("all" if args.static == "all" else args.static, n):
                sweep.run_isolated(Contender.static(p, n))
    if COLOCATED in kinds:
        sweep.run(Contender(COLOCATED, {WorkerRole.COLOCATED: n}))
    if PLANNER in kinds:
        p = args.planner_start if args.planner_start is not None else n // 2
        sweep.run(Contender(PLANNER, {WorkerRole.PREFILL: p, WorkerRole.DECODE: n - p},
                            planner=True))
    return sweep


def summarize(sweep: Sweep) -> tuple[dict, str, list[str]]:
    """Hindsight per window (continuous and isolated), the verdicts, the table, and the
    contenders shown in it."""
    windows = [p.name for p in sweep.phases] + ["all"]
    statics = sweep.statics()
    best = hindsight(sweep.scores, statics, windows) if statics else {}
    shown = list(dict.fromkeys([best[w]["best_static"] for w in windows] if best else []))
    shown += [c for c in (COLOCATED, PLANNER) if c in sweep.runs]
    isolated = {}
    if sweep.isolated:
        phases = windows[:-1]
        dynamic = {c: sweep.scores[c] for c in (COLOCATED, PLANNER) if c in sweep.scores}
        isolated = hindsight({**sweep.isolated, **dynamic}, list(sweep.isolated), phases)
    verdict: dict = {}
    if best and PLANNER in sweep.runs:
        planner = sweep.scores[PLANNER]

        def within(table: dict) -> dict:
            return {w: (table[w]["vs_best"][PLANNER] or 0.0) >= 0.9 for w in windows[:-1]}

        verdict = {
            "planner_within_10pct_of_best_static_per_phase": within(best),
            "planner_above_every_static_overall": all(
                planner["all"]["goodput_rps"] > sweep.scores[s]["all"]["goodput_rps"]
                for s in statics),
        }
        if isolated:
            verdict["planner_within_10pct_of_best_isolated_static_per_phase"] = within(isolated)
    table = format_table(sweep.scores, shown, windows, best) if best else ""
    return {"hindsight": best, "hindsight_isolated": isolated, "verdict": verdict}, table, shown
