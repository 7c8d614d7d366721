"""The planner core on a simulated clock: exact decisions (tick, action, targets) per guard.

Model used throughout (``MODEL``): prefill 1 ms/token, decode 10 ms + 1 ms/row + 0.01 ms/context
token; prompts 100 tokens, outputs 40; SLOs TTFT 300 ms, TPOT 50 ms. One worker then sustains
6.3466 rps of prefill and 9.0726 rps of decode (hand values in test_perf_model.py). Ticks are
``INTERVAL_S`` = 10 s apart; cooldown 60 s = 6 ticks; scale up after 2 ticks, down after 3.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from scission.cluster.planner.core import PlannerConfig, PlannerCore
from scission.cluster.planner.perf_model import DecodeModel, PerformanceModel, PrefillModel
from scission.cluster.planner.predictor import PredictorKind
from scission.cluster.planner.types import (
    Action,
    ForwardSample,
    Loop,
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
CAPACITY_RPS = {
    P: MODEL.max_prefill_rps_per_worker(PROMPT_TOKENS, 300.0),
    D: MODEL.max_decode_rps_per_worker(PROMPT_TOKENS, OUTPUT_TOKENS, 50.0),
}
CAPACITY_RPS[C] = 1.0 / (1.0 / CAPACITY_RPS[P] + 1.0 / CAPACITY_RPS[D])


def make_config(**overrides) -> PlannerConfig:
    base = dict(slo_ttft_ms=300.0, slo_tpot_ms=50.0, max_workers=8, interval_s=INTERVAL_S,
                cooldown_s=60.0, min_worker_lifetime_s=120.0, cold_start_s=30.0,
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
                            if w.worker_id == d.flip_worker_id else w for w in self.workers]
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


def test_step_up_predictive_within_scale_up_ticks():
    """Load 4 → 15 rps at tick 10: the predictive loop sizes both pools within scale_up_ticks
    (N = 2) ticks, at tick 11: prefill ceil(15 / 6.35) = 3, decode ceil(15 / 9.07) = 2."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [4.0] * 10 + [15.0] * 30)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 3, D: 2})]
    assert decisions[11].loop is Loop.PREDICTIVE
    assert "forecast 15.00 rps / 6.35 rps per prefill worker = 3" in decisions[11].reason
    assert "prefill short for 2 ticks" in decisions[11].reason


def test_step_up_reactive_one_worker_per_decision():
    """Reactive only: +1 per decision, the worse p90/SLO first (prefill 2.36 > decode 1.65,
    then decode 1.65 > prefill 1.18), each scale_up_ticks (2) ticks after the cooldown (6)."""
    core = PlannerCore(make_config(predictive=False), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [4.0] * 10 + [15.0] * 30)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 2, D: 1}),
                                  (18, Action.SCALE_UP, {P: 2, D: 2}),
                                  (25, Action.SCALE_UP, {P: 3, D: 2})]
    assert all(decisions[i].loop is Loop.REACTIVE for i in (11, 18, 25))
    assert "ttft attainment 0.50 < 0.90 (ttft_p90 709 ms vs slo 300 ms)" in decisions[11].reason


@pytest.mark.parametrize("predictor", [PredictorKind.CONSTANT, PredictorKind.HOLT])
def test_constant_load_under_slo_never_changes(predictor):
    """15 rps on 3 prefill + 2 decode, all SLOs met, model refitted every tick from steps:
    1,000 ticks of NONE (no oscillation); the fit reproduces the model."""
    core = PlannerCore(make_config(predictor=predictor), MODEL)
    decisions = run(core, SimCluster({P: 3, D: 2}), [15.0] * 1000,
                    samples=lambda i, now: make_samples(i, "p0", now))
    assert changes(decisions) == []
    assert decisions[-1].reason.startswith("steady: prefill 3: forecast 15.00 rps")
    assert core.model.prefill.b_ms_per_token == pytest.approx(1.0, abs=1e-9)
    assert core.model.decode.c_ms_per_context_token == pytest.approx(0.01, abs=1e-9)


def test_constant_load_just_meeting_slo_never_changes():
    """18 rps (94% / 99% of the modelled prefill / decode capacity) with attainment exactly at
    target and p90 exactly at the SLO: 1,000 ticks of NONE."""
    core = PlannerCore(make_config(predictor=PredictorKind.HOLT), MODEL)
    decisions = run(core, SimCluster({P: 3, D: 2}), [18.0] * 1000,
                    slo=lambda i, load: make_slo(load, ttft=(0.9, 300.0), tpot=(0.9, 50.0)))
    assert changes(decisions) == []


def test_load_drop_scales_down_after_cooldown_and_consolidation():
    """A scale-up at tick 1, then load 3 rps: no scale-down inside the 60 s cooldown; the first
    comes scale_down_ticks (3) ticks after it ends (tick 9), one worker per decision, from the
    role whose N−1 utilization is lowest (prefill 3/(2·6.35) = 0.24 < decode 3/9.07 = 0.33),
    down to one worker per role."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 2, D: 2}), [15.0] * 2 + [3.0] * 38)
    assert changes(decisions) == [(1, Action.SCALE_UP, {P: 3, D: 2}),
                                  (9, Action.SCALE_DOWN, {P: 2, D: 2}),
                                  (17, Action.SCALE_DOWN, {P: 2, D: 1}),
                                  (25, Action.SCALE_DOWN, {P: 1, D: 1})]
    assert "utilization 0.24 <= 0.70" in decisions[9].reason
    assert decisions[8].reason.startswith("steady:")


def test_load_drop_failing_consolidation_keeps_workers():
    """15 → 12 rps on 3 prefill + 2 decode: 2 prefill would run at 12/12.69 = 0.95 > 0.7 and
    1 decode at 1.32, so nothing is removed in 200 ticks."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 3, D: 2}), [15.0] * 5 + [12.0] * 195)
    assert changes(decisions) == []
    assert "utilization at 2 = 0.95" in decisions[-1].reason


def test_min_worker_lifetime_and_cold_start_window():
    """Workers started at t=0: their SLO windows are ignored for cold_start_s (ticks 0-2) and
    none may be removed before min_worker_lifetime_s = 120 s (tick 12); the first scale-down
    comes scale_down_ticks later, at tick 14."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 3, D: 2}, started_at_s=0.0), [3.0] * 15)
    assert changes(decisions) == [(14, Action.SCALE_DOWN, {P: 2, D: 2})]
    assert "slo window cold" in decisions[0].reason


def test_cold_start_slo_window_ignored_for_reactive_loop():
    """A prefill worker started at t=0 misses TTFT badly: the reactive loop ignores its window
    while it is younger than cold_start_s (ticks 0-2) and while no request finished (ticks 3-5),
    then scales up after scale_up_ticks, at tick 7."""
    core = PlannerCore(make_config(predictive=False), MODEL)
    cluster = SimCluster({D: 1})
    cluster.targets[P] = 1
    cluster.workers.append(make_worker("p-new", P, 0.0))

    def bad_ttft(i: int, load: float) -> SloObservation:
        return make_slo(load, ttft=(0.2, 900.0), num_finished=0 if i < 6 else 50)

    decisions = run(core, cluster, [4.0] * 10, slo=bad_ttft)
    assert changes(decisions) == [(7, Action.SCALE_UP, {D: 1, P: 2})]


def test_cold_start_samples_ignored_by_fit():
    """Steps taken in a worker's first cold_start_s seconds (10x slower) leave the model as
    it was; steps after it are fitted (prefill 2 ms/token)."""
    core = PlannerCore(make_config(), MODEL)
    slow = PerformanceModel(PrefillModel(0.0, 10.0, 0.0), DecodeModel(100.0, 10.0, 0.1))
    fast = PerformanceModel(PrefillModel(0.0, 2.0, 0.0), DecodeModel(10.0, 1.0, 0.01))
    cluster = SimCluster({P: 1, D: 1}, started_at_s=0.0)
    run(core, cluster, [4.0] * 3, samples=lambda i, now: make_samples(i, "p0", now, slow))
    assert core.model == MODEL
    core2 = PlannerCore(make_config(), MODEL)
    run(core2, SimCluster({P: 1, D: 1}, started_at_s=0.0), [4.0] * 20,
        samples=lambda i, now: make_samples(i, "p0", now, slow if now < 30 else fast))
    assert core2.model.prefill.b_ms_per_token == pytest.approx(2.0, abs=1e-9)
    assert core2.model.decode.a_ms == pytest.approx(10.0, abs=1e-9)


@pytest.mark.parametrize("predictive", [True, False])
def test_budget_never_exceeded_random_loads(predictive):
    """Seeded random loads (0-60 rps, a new level every 1-30 ticks) with max_workers = 5: the
    total target never exceeds 5, every role keeps >= 1 worker, a scale-down removes exactly
    one, and a flip keeps the total."""
    rng = random.Random(1234)
    loads: list[float] = []
    while len(loads) < 2000:
        loads += [rng.uniform(0.0, 60.0)] * rng.randint(1, 30)
    core = PlannerCore(make_config(max_workers=5, predictive=predictive), MODEL)
    cluster = SimCluster({P: 1, D: 1})
    decisions = run(core, cluster, loads[:2000])
    before = {P: 1, D: 1}
    for d in decisions:
        assert sum(d.targets.values()) <= 5 and min(d.targets.values()) >= 1
        if d.action is Action.SCALE_DOWN:
            assert sum(before.values()) - sum(d.targets.values()) == 1
        if d.action is Action.FLIP:
            assert sum(before.values()) == sum(d.targets.values())
        before = d.targets
    assert {d.action for d in decisions} >= {Action.SCALE_UP, Action.SCALE_DOWN}
    assert (Action.FLIP in {d.action for d in decisions}) is predictive


def test_operator_hold_respected():
    """Hold until 100 s: ticks 0-9 are NONE with the hold as reason, although load needs 3+2;
    hysteresis restarts after it, so the scale-up lands at tick 11."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 20, hold_until_s=100.0)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 3, D: 2})]
    assert all(d.reason.startswith("operator hold until 100.0 s") for d in decisions[:10])


def test_flip_at_budget():
    """Budget 4 = 1 prefill + 3 decode at 12 rps: prefill needs ceil(12/6.35) = 2, decode has
    slack (2 x 9.07 rps at utilization 0.66 <= 0.7), so at tick 1 the least-loaded eligible
    decode worker flips to prefill: not d1 (draining), not d2 (younger than 120 s), d3 (3
    running) rather than d0 (5 running)."""
    core = PlannerCore(make_config(max_workers=4), MODEL)
    cluster = SimCluster({P: 1})
    cluster.targets[D] = 3
    cluster.workers += [make_worker("d0", D, -1000.0, num_running=5),
                        make_worker("d1", D, -1000.0, num_running=1, draining=True),
                        make_worker("d2", D, -60.0, num_running=2),
                        make_worker("d3", D, -1000.0, num_running=3)]
    decisions = run(core, cluster, [12.0] * 2)
    assert changes(decisions) == [(1, Action.FLIP, {P: 2, D: 2})]
    assert (decisions[1].flip_worker_id, decisions[1].flip_to_role) == ("d3", P)


def test_at_budget_without_slack_holds():
    """Budget 4 = 1 prefill + 3 decode at 15 rps: decode has no slack (15/18.15 = 0.83 > 0.7),
    so no flip and no scale-up: NONE with the reason."""
    core = PlannerCore(make_config(max_workers=4), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 3}), [15.0] * 20)
    assert changes(decisions) == []
    assert "at budget 4 workers: prefill short" in decisions[1].reason
    assert decisions[1].reason.endswith("no other role has slack")


def test_pending_change_blocks_until_timeout():
    """The controller never reaches its targets: decisions are blocked for pending_timeout_s
    (100 s, ticks 0-9), the scale-up lands at tick 11, and the next 100 s (ticks 12-20) are
    blocked again although load jumps to 40 rps."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 12 + [40.0] * 10,
                    pending=lambda i: True)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 3, D: 2})]
    assert all(d.reason.startswith("pending change since") for d in decisions[:10])
    assert all(d.reason.startswith("pending change since 110.0 s") for d in decisions[12:21])
    assert decisions[21].reason.startswith("steady:")


def test_pending_change_reached_unblocks():
    """Pending for ticks 0-2 only: hysteresis starts at tick 3, scale-up at tick 4."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 8, pending=lambda i: i < 3)
    assert changes(decisions) == [(4, Action.SCALE_UP, {P: 3, D: 2})]


def test_colocated_only_scales_colocated_pool():
    """Targets {colocated: 1} at 5 rps: one colocated worker sustains 1/(1/6.35 + 1/9.07) =
    3.73 rps, so it scales to ceil(5/3.73) = 2 colocated, no prefill/decode pool appears."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({C: 1}), [5.0] * 5)
    assert changes(decisions) == [(1, Action.SCALE_UP, {C: 2})]


def test_below_minimum_is_repaired():
    """A needed role at 0 (decode missing) is raised to min_workers_per_role at once."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1}), [4.0])
    assert changes(decisions) == [(0, Action.SCALE_UP, {P: 1, D: 1})]


@pytest.mark.parametrize("field,value", [("slo_ttft_ms", 0.0), ("max_workers", 0),
                                         ("scale_up_ticks", 0), ("attainment_target", 1.5),
                                         ("scale_down_utilization", 0.0), ("cooldown_s", -1.0)])
def test_config_validation(field, value):
    """Out-of-range settings raise ValueError in __post_init__."""
    with pytest.raises(ValueError):
        make_config(**{field: value})
