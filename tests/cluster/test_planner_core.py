"""The planner core on a simulated clock: exact decisions (tick, action, targets) per guard
(hold, pending, cooldown, hysteresis, cold start, min lifetime, consolidation, budget, flip at
the budget). The model and the cluster double are in ``planner_helpers.py``."""

from __future__ import annotations

import random

import pytest
from planner_helpers import (
    MODEL,
    SimCluster,
    changes,
    make_config,
    make_samples,
    make_slo,
    make_worker,
    run,
)

from scission.cluster.planner.core import PlannerCore
from scission.cluster.planner.perf_model import DecodeModel, PerformanceModel, PrefillModel
from scission.cluster.planner.predictor import PredictorKind
from scission.cluster.planner.types import Action, Loop, SloObservation
from scission.registry.workers import WorkerRole

P, D, C = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED


def test_step_up_predictive_within_scale_up_ticks():
    """Load 4 → 15 rps at tick 10: the predictive loop sizes both pools within scale_up_ticks
    (N = 2) ticks, at tick 11: prefill 2 (1.5 busy workers; at 2 Erlang C = 0.643 and
    P(wait > 200 ms) = 0.643·e^(−2·0.5/0.1 s·0.2 s) = 0.087 ≤ 0.1), decode ceil(15 / 8.17) = 2.
    Changed on purpose: the old per-worker M/D/1 sizing asked for 3 prefill workers."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [4.0] * 10 + [15.0] * 30)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 2, D: 2})]
    assert decisions[11].loop is Loop.PREDICTIVE
    assert ("prefill: 15.00 rps x 100 ms per prompt = 1.50 busy workers; ttft p90 <= 300 ms "
            "at utilization <= 0.90: 2") in decisions[11].reason
    assert "decode: 15.00 rps / (0.90 x 18 rows / (40 x 50 ms)) = 2" in decisions[11].reason
    assert "prefill short for 2 ticks" in decisions[11].reason


def test_step_up_reactive_one_worker_per_decision():
    """Reactive only: +1 per decision, the worse p90/SLO first (decode 15/8.17 = 1.84 > prefill
    15/9 = 1.67, then prefill), each scale_up_ticks (2) ticks after the 60 s cooldown."""
    core = PlannerCore(make_config(predictive=False), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [4.0] * 10 + [15.0] * 30)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 1, D: 2}),
                                  (18, Action.SCALE_UP, {P: 2, D: 2})]
    assert all(decisions[i].loop is Loop.REACTIVE for i in (11, 18))
    assert "tpot attainment 0.50 < 0.90 (tpot_p90 92 ms vs slo 50 ms)" in decisions[11].reason


@pytest.mark.parametrize("predictor", [PredictorKind.CONSTANT, PredictorKind.HOLT])


def test_constant_load_under_slo_never_changes(predictor):
    """15 rps on 3 prefill + 2 decode, all SLOs met, model refitted every tick from steps:
    1,000 ticks of NONE (no oscillation: prefill needs 2 but a scale-down needs 2 workers at
    ≤ 0.7 of 9 rps, 15/18 = 0.83); the damped fit reproduces the model."""
    core = PlannerCore(make_config(predictor=predictor), MODEL)
    decisions = run(core, SimCluster({P: 3, D: 2}), [15.0] * 1000,
                    samples=lambda i, now: make_samples(i, "p0", now))
    assert changes(decisions) == []
    assert decisions[-1].reason.startswith("steady: prefill 3: forecast 15.00 rps")
    assert core.model.prefill.b_ms_per_token == pytest.approx(1.0, abs=1e-9)
    assert core.model.decode.c_ms_per_context_token == pytest.approx(0.01, abs=1e-9)


def test_constant_load_just_meeting_slo_never_changes():
    """15 rps on 2 prefill + 2 decode (83% / 92% of their SLO capacity) with attainment exactly
    at target and p90 exactly at the SLO: 1,000 ticks of NONE."""
    core = PlannerCore(make_config(predictor=PredictorKind.HOLT), MODEL)
    decisions = run(core, SimCluster({P: 2, D: 2}), [15.0] * 1000,
                    slo=lambda i, load: make_slo(load, ttft=(0.9, 300.0), tpot=(0.9, 50.0)))
    assert changes(decisions) == []


def test_load_drop_scales_down_after_cooldown_and_consolidation():
    """A predictive scale-up at tick 1 (18 rps: 3 + 3), then 3 rps: nothing inside the 20 s
    cooldown after a predictive change (tick 2) nor while the new workers' SLO windows are cold
    (started at 10 s: until 40 s, tick 3); the first scale-down comes scale_down_ticks (3) ticks
    later (tick 6), one worker per decision, from the role whose N−1 utilization is lowest
    (prefill 3/(2·9) = 0.17 < decode 3/(2·8.17) = 0.18), then every 4 ticks (one blocked by the
    cooldown, three of hysteresis) down to one per role. Changed on purpose: the cooldown after
    a predictive change was 60 s (every 9 ticks); it is ``move_cooldown_s`` = 20 s now."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 2, D: 2}), [18.0] * 2 + [3.0] * 38)
    assert changes(decisions) == [(1, Action.SCALE_UP, {P: 3, D: 3}),
                                  (6, Action.SCALE_DOWN, {P: 2, D: 3}),
                                  (10, Action.SCALE_DOWN, {P: 2, D: 2}),
                                  (14, Action.SCALE_DOWN, {P: 1, D: 2}),
                                  (18, Action.SCALE_DOWN, {P: 1, D: 1})]
    assert "utilization 0.17 <= 0.70" in decisions[6].reason
    assert decisions[2].reason.startswith("cooldown: last change at 10.0 s, 10.0 s left")
    assert "slo window cold" in decisions[3].reason
    assert decisions[5].reason.startswith("steady:")


def test_load_drop_failing_consolidation_keeps_workers():
    """15 → 13 rps on 3 prefill + 2 decode: 2 prefill would run at 13/18 = 0.72 > 0.7 and
    1 decode at 13/8.17 = 1.59, so nothing is removed in 200 ticks."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 3, D: 2}), [15.0] * 5 + [13.0] * 195)
    assert changes(decisions) == []
    assert "utilization at 2 = 0.72" in decisions[-1].reason


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
    it was; steps after it are fitted (prefill 2 ms/token; fit_weight 1: no damping)."""
    core = PlannerCore(make_config(fit_weight=1.0), MODEL)
    slow = PerformanceModel(PrefillModel(0.0, 10.0, 0.0), DecodeModel(100.0, 10.0, 0.1))
    fast = PerformanceModel(PrefillModel(0.0, 2.0, 0.0), DecodeModel(10.0, 1.0, 0.01))
    cluster = SimCluster({P: 1, D: 1}, started_at_s=0.0)
    run(core, cluster, [4.0] * 3, samples=lambda i, now: make_samples(i, "p0", now, slow))
    assert core.model == MODEL
    core2 = PlannerCore(make_config(fit_weight=1.0), MODEL)
    run(core2, SimCluster({P: 1, D: 1}, started_at_s=0.0), [4.0] * 20,
        samples=lambda i, now: make_samples(i, "p0", now, slow if now < 30 else fast))
    assert core2.model.prefill.b_ms_per_token == pytest.approx(2.0, abs=1e-9)
    assert core2.model.decode.a_ms == pytest.approx(10.0, abs=1e-9)


@pytest.mark.parametrize("predictive", [True, False])


def test_budget_never_exceeded_random_loads(predictive):
    """Seeded random loads (0-60 rps, a new level every 1-30 ticks) with max_workers = 5: the
    total target never exceeds 5, every role keeps >= 1 worker, a scale-down removes exactly
    one, and a flip takes from one role exactly the workers it moves and never lowers the total
    (it may grant the budget left in the same decision). Changed on purpose: the reactive loop
    flips too now (when both roles are short, toward the one further from its SLO); it never
    did in this run before."""
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
            assert sum(d.targets.values()) >= sum(before.values())
            donor = D if d.flip_to_role is P else P
            assert before[donor] - d.targets[donor] == len(d.flip_worker_ids) >= 1
        before = d.targets
    assert {d.action for d in decisions} >= {Action.SCALE_UP, Action.SCALE_DOWN}
    assert Action.FLIP in {d.action for d in decisions}


def test_operator_hold_respected():
    """Hold until 100 s: ticks 0-9 are NONE with the hold as reason, although load needs 2+2;
    hysteresis restarts after it, so the scale-up lands at tick 11."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 20, hold_until_s=100.0)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 2, D: 2})]
    assert all(d.reason.startswith("operator hold until 100.0 s") for d in decisions[:10])


def test_flip_at_budget():
    """Budget 4 = 1 prefill + 3 decode at 12 rps: prefill needs 2, decode needs ceil(12/8.17)
    = 2 of its 3 (a flip keeps the worker in the budget: the donor may go down to its predictive
    size), so at tick 1 the least-loaded eligible decode worker flips to prefill: not d1
    (draining), not d2 (younger than 120 s), d3 (3 running) rather than d0 (5 running)."""
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
    assert decisions[1].flip_worker_ids == ("d3",)
    assert "decode can spare 1 (3 workers, needs 2)" in decisions[1].reason


def test_pending_change_blocks_until_timeout():
    """The controller never reaches its targets: decisions are blocked for pending_timeout_s
    (100 s, ticks 0-9), the scale-up lands at tick 11, and the next 100 s (ticks 12-20) are
    blocked again although load jumps to 40 rps."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 12 + [40.0] * 10,
                    pending=lambda i: True)
    assert changes(decisions) == [(11, Action.SCALE_UP, {P: 2, D: 2})]
    assert all(d.reason.startswith("pending change since") for d in decisions[:10])
    assert all(d.reason.startswith("pending change since 110.0 s") for d in decisions[12:21])
    assert decisions[21].reason.startswith("steady:")


def test_pending_change_reached_unblocks():
    """Pending for ticks 0-2 only: hysteresis starts at tick 3, scale-up at tick 4."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 8, pending=lambda i: i < 3)
    assert changes(decisions) == [(4, Action.SCALE_UP, {P: 2, D: 2})]


def test_reactive_loop_waits_for_the_window_after_a_predictive_change():
    """A predictive scale-up at tick 1 (15 rps: 2 + 2); prefill then measures short for good
    (a window that still shows the old pools). A predictive decision could come after the 20 s
    cooldown, but the reactive loop waits cooldown_s = 60 s after any change: its +1 lands at
    tick 7 (70 s; hysteresis ran from tick 3), the next at tick 14 (60 s of cooldown after a
    reactive change, then 2 ticks)."""
    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 16,
                    slo=lambda i, load: make_slo(load, ttft=(0.5, 600.0) if i >= 2 else
                                                 (0.95, 240.0)))
    assert changes(decisions) == [(1, Action.SCALE_UP, {P: 2, D: 2}),
                                  (7, Action.SCALE_UP, {P: 3, D: 2}),
                                  (14, Action.SCALE_UP, {P: 4, D: 2})]
    assert [decisions[i].loop for i in (1, 7, 14)] == [Loop.PREDICTIVE, Loop.REACTIVE,
                                                       Loop.REACTIVE]
    assert decisions[6].reason.startswith("steady:")


def test_colocated_only_scales_colocated_pool():
    """Targets {colocated: 1} at 5 rps: one colocated worker sustains 1/(1/9 + 1/8.17) =
    4.28 rps, so it scales to ceil(5/4.28) = 2 colocated, no prefill/decode pool appears."""
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
                                         ("scale_down_utilization", 0.0), ("cooldown_s", -1.0),
                                         ("move_cooldown_s", -1.0), ("max_utilization", 0.0),
                                         ("fit_weight", 1.5), ("prefill_budget_tokens", 0)])


def test_config_validation(field, value):
    """Out-of-range settings raise ValueError in __post_init__."""
    with pytest.raises(ValueError):
        make_config(**{field: value})
