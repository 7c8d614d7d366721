"""The cluster simulator (``bench/simulator.py`` and ``bench/sim_*.py``) on cases small enough
to compute by hand: exact first-token and finish times, placement by the real ``Placer``, a
static run that never changes, a planner run that stays within its budget, and the scoring."""

from __future__ import annotations

import pytest

from scission.bench.sim_cluster import ClusterSim, Decision, SimConfig, SimRun
from scission.bench.sim_report import reversals, score_run
from scission.bench.sim_workload import Phase, SimRequest, shifting_workload
from scission.cluster.planner.core import PlannerConfig, PlannerCore
from scission.cluster.planner.perf_model import DecodeModel, PerformanceModel, PrefillModel
from scission.cluster.planner.types import Action, Loop, PoolDecision, TickInput
from scission.registry.workers import WorkerRole

P, D, C = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED
CONSTANT = PerformanceModel(PrefillModel(100.0, 0.0, 0.0), DecodeModel(10.0, 0.0, 0.0))


def make_request(index: int, arrival_s: float, prompt: int, output: int) -> SimRequest:
    return SimRequest(index, arrival_s, prompt, output, phase=0)


def simulate(model: PerformanceModel, requests: list[SimRequest],
             initial: dict[WorkerRole, int], planner: PlannerCore | None = None,
             duration_s: float = 10.0, **overrides) -> tuple[ClusterSim, SimRun]:
    cfg = SimConfig(**{"kv_transfer_s": 0.0, **overrides})
    sim = ClusterSim(cfg, model, requests, initial, sum(initial.values()), planner)
    return sim, sim.run(duration_s)


def times(req: SimRequest) -> tuple[float, float]:
    return round(req.first_token_s, 9), round(req.finish_s, 9)


def test_disaggregated_exact_times():
    """1 prefill + 1 decode, prefill steps 100 ms, decode steps 10 ms, KV 20 ms: TTFT =
    queueing + 100 ms; decode starts at KV arrival (or the end of the step in progress)."""
    reqs = [make_request(0, 0.0, 100, 5), make_request(1, 0.05, 100, 3),
            make_request(2, 1.0, 50, 1)]
    simulate(CONSTANT, reqs, {P: 1, D: 1}, kv_transfer_s=0.02)
    # r0: prefill 0-0.1, KV 0.12, 4 steps -> 0.16; r1 waits for r0's step: 0.1-0.2, KV 0.22,
    # 2 steps -> 0.24; r2 (one token) finishes with its first token.
    assert [times(r) for r in reqs] == [(0.1, 0.16), (0.2, 0.24), (1.1, 1.1)]
    assert [round(r.ttft_ms, 6) for r in reqs] == [100.0, 150.0, 100.0]
    assert [round(r.tpot_ms, 6) for r in reqs] == [15.0, 20.0, 0.0]


def test_join_cuts_a_run_at_the_step_in_progress():
    """Decode steps of 7 ms: r0 decodes 30 steps from 0.1 s; r1's KV lands at 0.2 s inside
    r0's step 0.198-0.205 and joins at 0.205; r2's lands at 0.3 s inside 0.296-0.303 and joins
    at 0.303. A step starts with what is queued: r1 arrived with r0 but waits for the next."""
    model = PerformanceModel(PrefillModel(100.0, 0.0, 0.0), DecodeModel(7.0, 0.0, 0.0))
    reqs = [make_request(0, 0.0, 100, 31), make_request(1, 0.0, 100, 3),
            make_request(2, 0.105, 100, 4)]
    simulate(model, reqs, {P: 1, D: 1})
    assert [times(r) for r in reqs] == [(0.1, 0.31), (0.2, 0.219), (0.3, 0.324)]
    assert [round(r.tpot_ms, 6) for r in reqs] == [7.0, 9.5, 8.0]


def test_decode_step_grows_with_rows_and_context():
    """Decode ms = 10 + 5·rows: r0 alone 15 ms for 7 steps (to 0.205), r1 joins, 3 steps of
    20 ms together (r0 done at 0.265), r1's last step alone (0.28).
    Decode ms = 1·context: a 10-token prompt + first token = 11 ms, then 12 ms."""
    rows_model = PerformanceModel(PrefillModel(100.0, 0.0, 0.0), DecodeModel(10.0, 5.0, 0.0))
    reqs = [make_request(0, 0.0, 100, 11), make_request(1, 0.0, 100, 5)]
    simulate(rows_model, reqs, {P: 1, D: 1})
    assert [times(r) for r in reqs] == [(0.1, 0.265), (0.2, 0.28)]
    ctx_model = PerformanceModel(PrefillModel(100.0, 0.0, 0.0), DecodeModel(0.0, 0.0, 1.0))
    reqs = [make_request(0, 0.0, 10, 3)]
    simulate(ctx_model, reqs, {P: 1, D: 1})
    assert times(reqs[0]) == (0.1, 0.123)


def test_chunked_prefill_cost():
    """Budget 1024: a 1536-token prompt takes two steps; step ms = 1 + 0.001·Σ(e² − s²):
    chunk [0, 1024) = 1 + 1048.576 ms, chunk [1024, 1536) = 1 + 1310.72 ms."""
    model = PerformanceModel(PrefillModel(1.0, 0.0, 0.001), DecodeModel(10.0, 0.0, 0.0))
    reqs = [make_request(0, 0.0, 1536, 1)]
    simulate(model, reqs, {P: 1, D: 1})
    assert reqs[0].first_token_s == pytest.approx((1.0 + 1048.576 + 1.0 + 1310.72) / 1e3)


def test_colocated_mixed_step():
    """One colocated worker: r1 arrives during r0's first decode step, which ends at 0.11;
    then one mixed step (r0 decodes, r1 prefills) costs max(100, 10) = 100 ms."""
    reqs = [make_request(0, 0.0, 100, 3), make_request(1, 0.105, 100, 2)]
    simulate(CONSTANT, reqs, {C: 1})
    assert [times(r) for r in reqs] == [(0.1, 0.21), (0.21, 0.22)]
    assert [round(r.tpot_ms, 6) for r in reqs] == [55.0, 10.0]


def test_placer_picks_the_less_loaded_workers():
    """The real Placer: the second prompt goes to the idle prefill worker; its decode worker
    is the one with more free blocks once the first request counts at placement ("placed", as
    the router counts it since ``router/flows.py`` does at placement), and the same one under
    the older accounting ("pulled": it counts only after its prefill, so both requests of a
    burst land on one decode worker)."""
    cases = (("placed", ["decode-2", "decode-3"], (0.115, 0.135)),
             ("pulled", ["decode-2", "decode-2"], (0.115, 0.14)))  # joins after r0's run
    for decode_load, decode_ids, second in cases:
        reqs = [make_request(0, 0.0, 100, 3), make_request(1, 0.015, 100, 3)]
        simulate(CONSTANT, reqs, {P: 2, D: 2}, decode_load=decode_load)
        assert [r.prefill_worker.worker_id for r in reqs] == ["prefill-0", "prefill-1"]
        assert [r.decode_worker.worker_id for r in reqs] == decode_ids
        assert [times(r) for r in reqs] == [(0.1, 0.12), second]


def test_prefill_timeout_fails_unstarted_prompts():
    """Prefill steps of 100 s: with a 120 s prefill timeout the third prompt (queued behind
    two) never starts and fails; the first two finish."""
    slow = PerformanceModel(PrefillModel(100_000.0, 0.0, 0.0), DecodeModel(10.0, 0.0, 0.0))
    reqs = [make_request(i, 0.0, 1000, 2) for i in range(3)]
    sim, _ = simulate(slow, reqs, {P: 1, D: 1}, prefill_budget_tokens=1000)
    assert [r.failed for r in reqs] == [False, False, True]
    assert [times(r) for r in reqs[:2]] == [(100.0, 100.01), (200.0, 200.01)]
    assert sim.num_open == 0


def test_static_run_never_changes():
    """Without a planner the pools keep their sizes: no decision, targets and serving counts
    equal the initial split at every tick."""
    reqs, _ = shifting_workload(rate_rps=1.0, duration_s=120.0, phase_s=60.0, seed=1)
    sim, run = simulate(CONSTANT, reqs, {P: 3, D: 2}, duration_s=120.0)
    assert run.decisions == []
    assert {(row["prefill_serving"], row["decode_serving"], row["prefill_target"],
             row["decode_target"]) for row in run.timeline} == {(3, 2, 3, 2)}
    assert sim.controller.max_live == 5
    assert all(r.finish_s > 0 for r in reqs)


def test_planner_run_respects_the_budget():
    """The real PlannerCore every 10 s on a shifting load too big for 6 workers: it changes
    the pools (flips at the budget, several workers in one decision), and never more than 6
    workers live or targeted."""
    reqs, _ = shifting_workload(rate_rps=2.0, duration_s=600.0, phase_s=200.0, seed=2)
    model = PerformanceModel(PrefillModel(50.0, 2.5, 0.0008), DecodeModel(70.0, 3.0, 0.003))
    planner = PlannerCore(PlannerConfig(slo_ttft_ms=8000.0, slo_tpot_ms=250.0, max_workers=6,
                                        cooldown_s=20.0, min_worker_lifetime_s=0.0),
                          model=model)
    sim, run = simulate(model, reqs, {P: 3, D: 3}, planner=planner, duration_s=600.0,
                        tail_s=60.0)
    assert len(run.decisions) >= 2
    assert all(sum(d.targets.values()) <= 6 for d in run.decisions)
    assert any(d.action == "flip" and len(d.flip_worker_ids) >= 2 for d in run.decisions)
    assert sim.controller.max_live <= 6
    assert all(row["live"] <= 6 for row in run.timeline)


class RecordingPlanner:
    """Stands in for ``PlannerCore``: keeps each ``TickInput``, never changes anything."""

    def __init__(self) -> None:
        self.inputs: list[TickInput] = []

    def on_tick(self, inp: TickInput) -> PoolDecision:
        self.inputs.append(inp)
        return PoolDecision(Action.NONE, Loop.PREDICTIVE, dict(inp.targets), "recording")


@pytest.mark.parametrize("max_tokens_known", [True, False])
def test_planner_sees_the_arrivals_shape_and_the_workers(max_tokens_known):
    """Prompts of 100, 200, 300 tokens and outputs of 5 arrive at 0-2 s (one more at 11 s keeps
    the run going): the tick at 10 s has 3 recent arrivals of mean prompt 200 and, when clients
    send max_tokens, mean max_tokens 5; each worker reports its KV capacity (728 blocks of 16
    tokens)."""
    reqs = [make_request(i, float(i), 100 * (i + 1), 5) for i in range(3)]
    reqs.append(make_request(3, 11.0, 100, 5))
    recorder = RecordingPlanner()
    simulate(CONSTANT, reqs, {P: 1, D: 1}, planner=recorder, duration_s=12.0,
             max_tokens_known=max_tokens_known)
    slo = recorder.inputs[0].slo
    assert recorder.inputs[0].now_s == 10.0 and slo is not None
    assert (slo.num_recent_arrivals, slo.arrival_mean_prompt_tokens) == (3, 200.0)
    assert slo.arrival_mean_max_tokens == (5.0 if max_tokens_known else 0.0)
    assert {w.kv_capacity_tokens for w in recorder.inputs[0].workers} == {728 * 16}


def test_scores_and_oscillations():
    """Goodput counts requests meeting both SLOs by arrival phase; a flip undone 15 s later
    is an oscillation within 2 intervals of 10 s, one undone 30 s later is not."""
    reqs = [make_request(0, 0.0, 10, 2), make_request(1, 1.0, 10, 2),
            make_request(2, 11.0, 10, 3)]
    reqs[0].first_token_s, reqs[0].finish_s = 0.5, 0.6  # TTFT 500, TPOT 100: meets
    reqs[1].first_token_s, reqs[1].finish_s = 3.0, 3.1  # TTFT 2000: misses
    reqs[2].first_token_s, reqs[2].finish_s = 11.1, 11.5  # TPOT 200: misses
    flip = [Decision(10.0, "flip", "reactive", {"prefill": 2, "decode": 2}, ""),
            Decision(25.0, "flip", "reactive", {"prefill": 3, "decode": 1}, ""),
            Decision(55.0, "flip", "reactive", {"prefill": 2, "decode": 2}, "")]
    run = SimRun(reqs, decisions=flip)
    phases = [Phase("a", 0.0, 10.0), Phase("b", 10.0, 60.0)]
    scores = score_run(run, phases, 1000.0, 150.0, {"prefill": 3, "decode": 1}, 20.0)
    assert scores["a"]["goodput_rps"] == 0.1 and scores["a"]["attainment"] == 0.5
    assert scores["b"]["num_met"] == 0 and scores["all"]["num_met"] == 1
    assert reversals(flip, {"prefill": 3, "decode": 1}, 20.0) == [1]
    assert (scores["a"]["num_changes"], scores["b"]["num_changes"]) == (0, 3)
    assert scores["all"]["num_oscillations"] == 1


class FlipOnce:
    """Stands in for ``PlannerCore``: at the first tick (10 s) flips the decode worker
    ``pick()`` names to prefill; nothing after."""

    def __init__(self, pick) -> None:
        self.pick, self.done = pick, False

    def on_tick(self, inp: TickInput) -> PoolDecision:
        if self.done:
            return PoolDecision(Action.NONE, Loop.REACTIVE, dict(inp.targets), "done")
        self.done, worker_id = True, self.pick()
        targets = {P: inp.targets[P] + 1, D: inp.targets[D] - 1}
        return PoolDecision(Action.FLIP, Loop.REACTIVE, targets, "test", worker_id, P,
                            (worker_id,))


def test_drain_deadline_migrates_a_running_request():
    """A 3001-token output decoding in 8 ms steps from 0.1 s on the worker flipped at 10 s:
    at the 5 s drain deadline (15 s) it has streamed 1 + floor(14.9 s / 8 ms) = 1863 tokens.
    It migrates to the other decode worker, which recomputes prompt + streamed = 1963 tokens
    (two 1024-token chunks of 100 ms) and then decodes the 3001 − 1863 − 1 = 1137 tokens
    left: finish at 15 + 0.2 + 1137 × 0.008 = 24.296 s. The flipped worker serves as prefill
    from 16 s (flip_delay 1 s after it emptied)."""
    model = PerformanceModel(PrefillModel(100.0, 0.0, 0.0), DecodeModel(8.0, 0.0, 0.0))
    reqs = [make_request(0, 0.0, 100, 3001)]
    flip = FlipOnce(lambda: reqs[0].decode_worker.worker_id)
    sim, run = simulate(model, reqs, {P: 1, D: 2}, planner=flip, duration_s=30.0,
                        drain_deadline_s=5.0)
    r = reqs[0]
    assert (r.carried_tokens, r.num_migrations, run.num_migrated) == (1863, 1, 1)
    assert times(r) == (0.1, 24.296)
    assert r.decode_worker.role is D and not r.failed
    flipped = sim.controller.workers[run.decisions[0].flip_worker_ids[0]]
    assert flipped.role is P
    assert [row["prefill_serving"] for row in run.timeline if row["t_s"] in (10.0, 20.0)] == \
        [1, 2]


def test_without_a_drain_deadline_a_flip_waits_for_its_requests():
    """``drain_deadline_s=None``: the same request finishes where it runs (0.1 + 3000 × 8 ms
    = 24.1 s), nothing migrates."""
    model = PerformanceModel(PrefillModel(100.0, 0.0, 0.0), DecodeModel(8.0, 0.0, 0.0))
    reqs = [make_request(0, 0.0, 100, 3001)]
    flip = FlipOnce(lambda: reqs[0].decode_worker.worker_id)
    _, run = simulate(model, reqs, {P: 1, D: 2}, planner=flip, duration_s=30.0,
                      drain_deadline_s=None)
    assert (reqs[0].num_migrations, run.num_migrated) == (0, 0)
    assert times(reqs[0]) == (0.1, 24.1)


def test_request_placed_on_a_flipped_decode_worker_repicks_after_its_prefill():
    """A prompt prefilling 5-25 s (200 ms per token) was placed on decode worker X; X flips at
    10 s with nothing running on it (it does not wait for the prompt still on the prefill
    worker). When the prefill is done the request picks the other decode worker (the router
    re-checks its choice) and pulls its KV there: no migration, no recompute; 2 decode steps
    of 8 ms after the first token at 25 s."""
    model = PerformanceModel(PrefillModel(0.0, 200.0, 0.0), DecodeModel(8.0, 0.0, 0.0))
    reqs = [make_request(0, 5.0, 100, 3)]
    chosen = []

    def pick() -> str:
        chosen.append(reqs[0].decode_worker.worker_id)
        return chosen[0]

    sim, run = simulate(model, reqs, {P: 1, D: 2}, planner=FlipOnce(pick), duration_s=30.0,
                        drain_deadline_s=5.0)
    r = reqs[0]
    assert times(r) == (25.0, 25.016)
    assert r.decode_worker.worker_id != chosen[0] and r.decode_worker.role is D
    assert (r.num_migrations, run.num_migrated) == (0, 0)
    assert sim.controller.workers[chosen[0]].role is P
    assert [row["prefill_serving"] for row in run.timeline if row["t_s"] == 20.0] == [2]
