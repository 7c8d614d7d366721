"""Helpers for the planner core tests (not collected: no test_ prefix).

Model used throughout (``MODEL``): prefill 1 ms/token, decode 10 ms + 1 ms/row + 0.01 ms/context
token; prompts 100 tokens, outputs 40; SLOs TTFT 300 ms, TPOT 50 ms; attainment target 0.9,
utilization at most 0.9. Sizing (``sizing.size_role``; hand values in test_perf_model.py):

- prefill: 100 ms per prompt, the pool one M/D/c queue with P(wait > 300 − 100 ms) ≤ 0.1 and
  utilization ≤ 0.9: 1 worker up to 4 rps, 2 up to 15 rps, 3 at 16-22 rps; 9 rps per worker.
- decode: 18 rows per worker (step 49.6 ms at context 120), 0.9 x 18 / (40 x 49.6 ms) = 8.17 rps
  per worker: ceil(load / 8.17).

Ticks are ``INTERVAL_S`` = 10 s apart; cooldown 60 s after a reactive change, 20 s after a
predictive one; scale up after 2 ticks, down after 3.
"""

from __future__ import annotations

import dataclasses

from scission.cluster.planner.core import PlannerConfig, PlannerCore
from scission.cluster.planner.perf_model import DecodeModel, PerformanceModel, PrefillModel
from scission.cluster.planner.predictor import PredictorKind
from scission.cluster.planner.sizing import LoadShape, SloTargets, size_role
from scission.cluster.planner.types import (
    Action,
    ForwardSample,
    PoolDecision,
    SloObservation,
    TickInput,
    WorkerObservation,
)
from scission.registry.workers import WorkerRole

P, D, C = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED
INTERVAL_S = 10.0
PROMPT_TOKENS, OUTPUT_TOKENS = 100.0, 40.0
MODEL = PerformanceModel(PrefillModel(0.0, 1.0, 0.0), DecodeModel(10.0, 1.0, 0.01))
_SHAPE = LoadShape(PROMPT_TOKENS, PROMPT_TOKENS, OUTPUT_TOKENS, "test")
_TARGETS = SloTargets(300.0, 50.0, 0.9)
# requests/s one worker serves within the SLOs at utilization 0.9 (what SimCluster plays back)
CAPACITY_RPS = {role: size_role(MODEL, role, 1.0, _SHAPE, _TARGETS).capacity_rps
                for role in (P, D, C)}


def make_config(**overrides) -> PlannerConfig:
    base = dict(slo_ttft_ms=300.0, slo_tpot_ms=50.0, max_workers=8, interval_s=INTERVAL_S,
                cooldown_s=60.0, move_cooldown_s=20.0, min_worker_lifetime_s=120.0,
                cold_start_s=30.0,
                scale_up_ticks=2, scale_down_ticks=3, scale_down_utilization=0.7,
                pending_timeout_s=100.0, attainment_target=0.9,
                predictor=PredictorKind.CONSTANT)
    return PlannerConfig(**{**base, **overrides})


def make_worker(worker_id: str, role: WorkerRole, started_at_s: float,
                **kw) -> WorkerObservation:
    return WorkerObservation(worker_id=worker_id, role=role, started_at_s=started_at_s, **kw)


def make_slo(arrival_rps: float, ttft=(0.95, 240.0), tpot=(0.95, 40.0),
             num_finished: int = 100) -> SloObservation:
    """``ttft``/``tpot`` = (attainment, p90 ms)."""
    return SloObservation(window_s=60.0, num_finished=num_finished, arrival_rps=arrival_rps,
                          mean_prompt_tokens=PROMPT_TOKENS, mean_output_tokens=OUTPUT_TOKENS,
                          ttft_p90_ms=ttft[1], tpot_p90_ms=tpot[1], ttft_attainment=ttft[0],
                          tpot_attainment=tpot[0], attainment=min(ttft[0], tpot[0]),
                          goodput_rps=arrival_rps * min(ttft[0], tpot[0]))


def make_samples(tick: int, worker_id: str, at_s: float, model=MODEL) -> list[ForwardSample]:
    """Noise-free engine steps of ``model``: one prefill and one decode step per tick."""
    t, n, k = 50 * (tick % 5 + 1), tick % 7 + 1, 300 * (tick % 11 + 1)
    return [ForwardSample(worker_id, P, at_s, t, 0, 0, model.prefill.step_ms(t)),
            ForwardSample(worker_id, D, at_s, 0, n, k, model.decode.step_ms(n, k))]


class SimCluster:
    """Workers that follow the targets at once; latency from utilization of the model."""

    def __init__(self, targets: dict[WorkerRole, int], started_at_s: float = -1000.0) -> None:
        self.targets, self.workers, self._next = dict(targets), [], 0
        for role, n in targets.items():
            for _ in range(n):
                self._add(role, started_at_s)

    def _add(self, role: WorkerRole, at_s: float) -> None:
        self.workers.append(make_worker(f"{role.value[0]}{self._next}", role, at_s))
        self._next += 1

    def apply(self, d: PoolDecision, now_s: float) -> None:
        if d.action is Action.FLIP:
            self.workers = [dataclasses.replace(w, role=d.flip_to_role)
                            if w.worker_id in d.flip_worker_ids else w for w in self.workers]
        for role, n in d.targets.items():
            while sum(w.role is role for w in self.workers) < n:
                self._add(role, now_s)
            while sum(w.role is role for w in self.workers) > n:
                youngest = max((w for w in self.workers if w.role is role),
                               key=lambda w: w.started_at_s)
                self.workers.remove(youngest)
        self.targets = dict(d.targets)

    def slo(self, load_rps: float) -> SloObservation:
        """Meets an SLO (attainment 0.95, p90 0.8·SLO·util) while utilization ≤ 1, else
        attainment 0.5 and p90 = SLO·utilization."""
        def window(role: WorkerRole, slo_ms: float) -> tuple[float, float]:
            n = sum(w.role in (role, C) for w in self.workers)
            util = load_rps / max(n * CAPACITY_RPS[C if self.targets.get(C) else role], 1e-9)
            return (0.95, 0.8 * slo_ms * util) if util <= 1.0 else (0.5, slo_ms * util)
        return make_slo(load_rps, ttft=window(P, 300.0), tpot=window(D, 50.0))


def run(core: PlannerCore, cluster: SimCluster, loads: list[float], *, slo=None,
        samples=None, hold_until_s: float = 0.0, pending=None) -> list[PoolDecision]:
    """Tick ``i`` at ``i · INTERVAL_S`` with load ``loads[i]``; decisions applied at once."""
    decisions = []
    for i, load in enumerate(loads):
        now_s = i * INTERVAL_S
        inp = TickInput(now_s=now_s, targets=dict(cluster.targets),
                        workers=list(cluster.workers),
                        slo=slo(i, load) if slo else cluster.slo(load),
                        samples=samples(i, now_s) if samples else [],
                        hold_until_s=hold_until_s,
                        pending_change=pending(i) if pending else False)
        decisions.append(core.on_tick(inp))
        cluster.apply(decisions[-1], now_s)
    return decisions


def changes(decisions: list[PoolDecision]) -> list[tuple[int, Action, dict]]:
    return [(i, d.action, d.targets) for i, d in enumerate(decisions) if d.action is not Action.NONE]
