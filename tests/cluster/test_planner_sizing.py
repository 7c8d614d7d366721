"""The planner core's sizing and flips on a simulated clock: whole-gap flips, scale-up and
flips in one decision, the split when both roles are short and its veto, backlogs, the load's
shape from arrivals, the damped fit. The model and the cluster double are in
``planner_helpers.py``."""

from __future__ import annotations

import dataclasses

import pytest
from planner_helpers import MODEL, SimCluster, changes, make_config, make_slo, make_worker, run

from scission.cluster.planner.core import PlannerCore
from scission.cluster.planner.perf_model import PerformanceModel, PrefillModel
from scission.cluster.planner.sizing import load_shape
from scission.cluster.planner.types import Action, ForwardSample, SloObservation, WorkerObservation
from scission.registry.workers import WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


def test_fit_is_damped_between_ticks():
    """fit_weight 0.5: each refit moves the model half way to the new fit. Eight prefill steps
    per tick of a 3 ms/token engine (prior 1 ms/token): 2, 2.5, 2.75 ms/token after ticks 0-2."""
    core = PlannerCore(make_config(fit_weight=0.5), MODEL)
    engine = PerformanceModel(PrefillModel(0.0, 3.0, 0.0), MODEL.decode)

    def steps(i: int, now_s: float) -> list[ForwardSample]:
        return [ForwardSample("p0", P, now_s, t, 0, 0, engine.prefill.step_ms(t))
                for t in (16, 32, 64, 96, 128, 256, 512, 1024)]

    fitted = []
    for i in range(3):
        run(core, SimCluster({P: 1, D: 1}), [4.0], samples=lambda _, now, i=i: steps(i, now))
        fitted.append(core.model.prefill.b_ms_per_token)
    assert fitted == pytest.approx([2.0, 2.5, 2.75], abs=1e-9)


def _decode_workers(num: int, running: list[int]) -> list[WorkerObservation]:
    return [make_worker(f"d{i}", D, -1000.0, num_running=running[i]) for i in range(num)]


def test_flip_moves_the_whole_gap_in_one_decision():
    """Budget 8 = 1 prefill + 7 decode at 25 rps: prefill needs 3 (2.5 busy workers), decode
    ceil(25/8.17) = 4, so one decision at tick 1 flips the 2 least-loaded decode workers (d4
    with 1 running, then d2 with 2). Changed on purpose: the old core flipped one worker per
    decision, then waited out a 60 s cooldown before the next."""
    core = PlannerCore(make_config(max_workers=8), MODEL)
    cluster = SimCluster({P: 1})
    cluster.targets[D] = 7
    cluster.workers += _decode_workers(7, [5, 6, 2, 7, 1, 4, 3])
    decisions = run(core, cluster, [25.0] * 10)
    assert changes(decisions) == [(1, Action.FLIP, {P: 3, D: 5})]
    assert decisions[1].flip_worker_ids == ("d4", "d2")
    assert decisions[1].flip_worker_id == "d4" and decisions[1].flip_to_role is P
    assert "decode can spare 3 (7 workers, needs 4)" in decisions[1].reason


def test_scale_up_and_flip_in_one_decision():
    """Budget 8 with 7 targeted (1 prefill + 6 decode) at 25 rps: prefill needs +2; the budget
    grants one new worker and a flip of the least-loaded decode worker brings the other, in one
    decision (FLIP; total 7 → 8)."""
    core = PlannerCore(make_config(max_workers=8), MODEL)
    cluster = SimCluster({P: 1})
    cluster.targets[D] = 6
    cluster.workers += _decode_workers(6, [5, 6, 2, 7, 1, 4])
    decisions = run(core, cluster, [25.0] * 10)
    assert changes(decisions) == [(1, Action.FLIP, {P: 3, D: 5})]
    assert decisions[1].flip_worker_ids == ("d4",)
    assert "1 -> 2 (budget 8 caps +2)" in decisions[1].reason


def test_at_budget_veto_when_short_role_meets_slo():
    """Budget 4 = 1 prefill + 3 decode at 18 rps: prefill needs 3, decode 3 (no spare). The
    measured window says prefill meets its SLO, so the forecast alone takes no worker from a
    role without slack: NONE with the reason, for 20 ticks."""
    core = PlannerCore(make_config(max_workers=4), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 3}), [18.0] * 20, slo=lambda i, load: make_slo(load))
    assert changes(decisions) == []
    assert "at budget 4 workers: prefill short" in decisions[1].reason
    assert decisions[1].reason.endswith("prefill meets its slo (measured attainment vetoes a "
                                        "flip on the forecast alone)")


def test_at_budget_both_short_split_in_proportion():
    """Budget 4 = 1 prefill + 3 decode at 18 rps, prefill measured short (18/9 = 2x its
    capacity): both roles need 3, so the 4 workers are split 2 + 2 (toward the larger relative
    gap: prefill 3/1 > decode 3/3): one decode worker flips at tick 1. Then decode is short by
    measurement (18/16.3 = 1.1) but the split is already even: no flip back in 30 ticks."""
    core = PlannerCore(make_config(max_workers=4), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 3}), [18.0] * 30)
    assert changes(decisions) == [(1, Action.FLIP, {P: 2, D: 2})]
    assert "split 4 workers, prefill 2" in decisions[1].reason
    assert decisions[-1].reason.endswith("split 4 workers, decode 2")


def test_prefill_backlog_adds_workers():
    """4 rps needs 1 prefill worker, but 1,000 prompt tokens queue on it: 1 s of work, 0.9 s
    beyond the prompt in service, served within the 200 ms the TTFT SLO leaves: ceil(0.4 +
    0.9/0.2) = 5 prefill workers, granted at tick 1."""
    core = PlannerCore(make_config(), MODEL)
    cluster = SimCluster({P: 1, D: 1})
    cluster.workers = [dataclasses.replace(w, queued_prefill_tokens=1000) if w.role is P else w
                       for w in cluster.workers]
    decisions = run(core, cluster, [4.0] * 3)
    assert changes(decisions) == [(1, Action.SCALE_UP, {P: 5, D: 1})]
    assert "backlog 1 worker-s served within 0.2 s: 5" in decisions[1].reason


def test_decode_waiting_requests_add_workers():
    """4 rps needs 1 decode worker, but both decode workers are full (10 running, 5 waiting
    each): the 30 requests at 10 rows per worker need 3, granted at tick 1."""
    core = PlannerCore(make_config(), MODEL)
    cluster = SimCluster({P: 1})
    cluster.targets[D] = 2
    cluster.workers += [make_worker(f"d{i}", D, -1000.0, num_running=10, num_waiting=5)
                        for i in range(2)]
    decisions = run(core, cluster, [4.0] * 3)
    assert changes(decisions)[0] == (1, Action.SCALE_UP, {P: 1, D: 3})
    assert "20 running + 10 waiting at 10.0 rows per worker: 3" in decisions[1].reason


def test_load_shape_from_arrivals():
    """The window's finished requests say prompts of 100 tokens; the last arrivals say 200
    (rms 200) and max_tokens 40: the sizing follows the arrivals. At 4 rps prefill takes 200 ms
    per prompt, 0.8 busy workers: 1 worker waits > 100 ms with p = 0.8·e^(−2·0.2/0.2 s·0.1 s)
    = 0.65, 2 with 0.23·e^(−1.2) = 0.069 ≤ 0.1: 2 prefill workers at tick 1."""
    core = PlannerCore(make_config(), MODEL)

    def arrivals(i: int, load: float) -> SloObservation:
        return dataclasses.replace(
            make_slo(load), shape_window_s=20.0, num_recent_arrivals=80, recent_arrival_rps=4.0,
            arrival_mean_prompt_tokens=200.0, arrival_rms_prompt_tokens=200.0,
            arrival_mean_max_tokens=40.0)

    decisions = run(core, SimCluster({P: 1, D: 1}), [4.0] * 3, slo=arrivals)
    assert changes(decisions) == [(1, Action.SCALE_UP, {P: 2, D: 1})]
    assert "prompt 200 (arrivals), output 40 (max_tokens)" in decisions[1].reason


def test_load_shape_sources():
    """Prompt: recent arrivals, else finished requests. Output: requested max_tokens, else the
    recent finishes (5 at least), else the whole window's."""
    slo = make_slo(4.0)
    assert (load_shape(slo).prompt_tokens, load_shape(slo).output_tokens) == (100.0, 40.0)
    recent = dataclasses.replace(slo, num_recent_arrivals=10, arrival_mean_prompt_tokens=300.0,
                                 arrival_rms_prompt_tokens=400.0, num_recent_finished=5,
                                 recent_mean_output_tokens=80.0)
    shape = load_shape(recent)
    assert (shape.prompt_tokens, shape.rms_prompt_tokens, shape.output_tokens) == \
        (300.0, 400.0, 80.0)
    assert shape.prompt_cv2 == pytest.approx(400.0 ** 2 / 300.0 ** 2 - 1.0)
    assert load_shape(dataclasses.replace(recent, num_recent_finished=4)).output_tokens == 40.0
    asked = dataclasses.replace(recent, arrival_mean_max_tokens=120.0)
    assert load_shape(asked).output_tokens == 120.0
