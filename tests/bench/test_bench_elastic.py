"""The pure parts of the elastic benchmark: phase schedule, per-phase scores, ratios, merge,
option parsing (no cluster)."""

from __future__ import annotations

import argparse

import pytest

from scission.bench.elastic import ContenderSpec, _length_range
from scission.bench.elastic_report import (
    ALL,
    PhaseKind,
    PhaseShapes,
    PhaseSpec,
    analyze,
    compare,
    contender_entry,
    merge_documents,
    new_document,
    phase_schedule,
    phase_windows,
    score_contender,
    score_window,
)
from scission.bench.metrics import RequestRecord, SloConfig
from scission.bench.sim_workload import Phase
from scission.bench.workload import LengthConfig, LengthDist

SLO = SloConfig(ttft_slo_ms=1000.0, tpot_slo_ms=100.0)
FIXED = PhaseShapes(LengthConfig(800), LengthConfig(8), LengthConfig(40), LengthConfig(100))
PHASES = [PhaseSpec(PhaseKind.PREFILL_HEAVY, 0.5, 100.0),
          PhaseSpec(PhaseKind.DECODE_HEAVY, 2.0, 50.0),
          PhaseSpec(PhaseKind.PREFILL_HEAVY, 0.0, 30.0)]


def record(rid: str, scheduled_s: float, ttft_s: float, tpot_s: float, num_tokens: int = 3,
           error: str | None = None) -> RequestRecord:
    """Sent at ``scheduled_s``; first token after ``ttft_s``, then one token every ``tpot_s``."""
    if error is not None:
        return RequestRecord(rid, 10, 0, start_s=scheduled_s, end_s=scheduled_s + 1.0,
                             error=error, scheduled_s=scheduled_s)
    chunks = tuple(scheduled_s + ttft_s + i * tpot_s for i in range(num_tokens))
    return RequestRecord(rid, 10, num_tokens, start_s=scheduled_s, chunk_times_s=chunks,
                         chunk_tokens=(1,) * num_tokens, end_s=chunks[-1],
                         scheduled_s=scheduled_s)


def decision(t_s: float, prefill: int, decode: int, applied: bool = True) -> dict:
    return {"t_s": t_s, "action": "flip", "loop": "reactive", "prefill": prefill,
            "decode": decode, "reason": "test", "applied": applied, "flip_worker_id": "w"}


# -- schedule ---------------------------------------------------------------------------------


def test_phase_windows_are_consecutive_and_named_by_kind_and_rate():
    """Phase k spans [sum of earlier durations, + its duration), named '<k>:<kind> <rate> rps'."""
    assert phase_windows(PHASES) == [Phase("0:prefill 0.5 rps", 0.0, 100.0),
                                     Phase("1:decode 2 rps", 100.0, 150.0),
                                     Phase("2:prefill 0 rps", 150.0, 180.0)]


def test_phase_schedule_places_each_request_in_its_phase_with_its_shape():
    """Arrivals are sorted, start at 0, fall in their phase's window; lengths are the phase
    kind's; a rate-0 phase has no requests."""
    schedule, windows = phase_schedule(PHASES, FIXED, seed=3)
    assert schedule[0].arrival_s == 0.0
    assert [r.arrival_s for r in schedule] == sorted(r.arrival_s for r in schedule)
    for r in schedule:
        w = windows[r.phase]
        assert w.start_s <= r.arrival_s < w.end_s
        expected = (800, 8) if PHASES[r.phase].kind is PhaseKind.PREFILL_HEAVY else (40, 100)
        assert (r.prompt_tokens, r.output_tokens) == expected
    assert {r.phase for r in schedule} == {0, 1}


def test_phase_schedule_is_reproducible_per_seed():
    """Same seed, same schedule; another seed, another one."""
    a, _ = phase_schedule(PHASES, PhaseShapes(), seed=7)
    b, _ = phase_schedule(PHASES, PhaseShapes(), seed=7)
    c, _ = phase_schedule(PHASES, PhaseShapes(), seed=8)
    assert a == b
    assert a != c


def test_phase_schedule_rates_and_uniform_lengths():
    """Per-phase counts follow the rates (Poisson: within 5 sigma of rate x duration); uniform
    lengths stay in [mean - spread, mean + spread] and reach both ends."""
    phases = [PhaseSpec(PhaseKind.PREFILL_HEAVY, 5.0, 400.0),
              PhaseSpec(PhaseKind.DECODE_HEAVY, 20.0, 100.0)]
    schedule, _ = phase_schedule(phases, PhaseShapes(), seed=0)
    for k, expected in ((0, 2000), (1, 2000)):
        n = sum(r.phase == k for r in schedule)
        assert abs(n - expected) < 5 * expected**0.5
    prompts = {r.prompt_tokens for r in schedule if r.phase == 0}
    outputs = {r.output_tokens for r in schedule if r.phase == 1}
    assert min(prompts) == 768 and max(prompts) == 1024
    assert min(outputs) == 96 and max(outputs) == 128


# -- scores -----------------------------------------------------------------------------------

# Phase 0 [0, 100): a meets (TTFT 0.5 s, TPOT 50 ms); b misses TTFT (2 s); c misses TPOT
# (200 ms); d failed. Phase 1 [100, 150): e and f meet; g is one token (TPOT undefined) and
# meets on TTFT alone. h is scheduled at 150 (phase 2: no requests expected, still counted).
RECORDS = [
    record("a", 10.0, 0.5, 0.05), record("b", 20.0, 2.0, 0.05), record("c", 30.0, 0.2, 0.2),
    record("d", 40.0, 0.0, 0.0, error="UNAVAILABLE"),
    record("e", 100.0, 0.1, 0.01), record("f", 120.0, 0.3, 0.02),
    record("g", 149.0, 0.4, 0.0, num_tokens=1), record("h", 150.0, 5.0, 0.05),
]


def test_score_window_hand_computed():
    """Phase 0: 1 of 4 meets -> attainment 0.25, goodput 1/100 s; the failed request counts as
    a miss and in num_failed; p90s over the 3 succeeded (linear interpolation)."""
    s = score_window(RECORDS, 0.0, 100.0, SLO)
    assert s["num_requests"] == 4 and s["num_met"] == 1 and s["num_failed"] == 1
    assert s["attainment"] == pytest.approx(0.25)
    assert s["goodput_rps"] == pytest.approx(0.01)
    # TTFT [200, 500, 2000] ms: p90 at index 1.8 -> 500 + 0.8 x 1500 = 1700
    assert s["ttft_p90_ms"] == pytest.approx(1700.0)
    # TPOT [50, 50, 200] ms: p90 at index 1.8 -> 50 + 0.8 x 150 = 170
    assert s["tpot_p90_ms"] == pytest.approx(170.0)


def test_score_window_single_token_meets_on_ttft_and_empty_window():
    """Phase 1: e, f, g all meet (g has no TPOT) -> 3 / 50 s; a window without requests has
    attainment None and goodput 0."""
    s = score_window(RECORDS, 100.0, 150.0, SLO)
    assert (s["num_requests"], s["num_met"], s["num_failed"]) == (3, 3, 0)
    assert s["goodput_rps"] == pytest.approx(0.06)
    assert s["tpot_p90_ms"] == pytest.approx(19.0)  # [10, 20] ms: 10 + 0.9 x 10
    empty = score_window(RECORDS, 160.0, 170.0, SLO)
    assert empty["num_requests"] == 0 and empty["attainment"] is None
    assert empty["goodput_rps"] == 0.0 and empty["ttft_p90_ms"] is None


def test_score_contender_per_phase_changes_and_oscillations():
    """Changes count in the phase they were applied in (after the last phase: in the last
    one); unapplied decisions are not changes; a flip back within the window oscillates."""
    windows = phase_windows(PHASES)
    decisions = [decision(50.0, 1, 2), decision(105.0, 2, 1), decision(110.0, 1, 2, False),
                 decision(190.0, 1, 2)]
    scores = score_contender(RECORDS, decisions, {"prefill": 2, "decode": 1}, windows, SLO,
                             oscillation_window_s=60.0)
    names = [w.name for w in windows]
    assert [scores[n]["num_changes"] for n in names] == [1, 1, 1]
    assert [scores[n]["num_oscillations"] for n in names] == [0, 1, 0]
    assert scores[ALL]["num_changes"] == 3 and scores[ALL]["num_oscillations"] == 1
    # all = [0, 180): 8 requests, a e f g meet -> 4 / 180 s
    assert scores[ALL]["num_requests"] == 8 and scores[ALL]["num_met"] == 4
    assert scores[ALL]["goodput_rps"] == pytest.approx(4 / 180)
    assert scores[names[2]]["num_requests"] == 1 and scores[names[2]]["num_met"] == 0


def test_compare_ratios_to_the_best_static_over_the_run():
    """The best static is chosen by goodput over the run; ratios are per window; the hindsight
    best static may differ per window."""
    scores = {
        "static-2p1d": {"p": {"goodput_rps": 0.4}, "d": {"goodput_rps": 0.1},
                        ALL: {"goodput_rps": 0.25}},
        "static-1p2d": {"p": {"goodput_rps": 0.1}, "d": {"goodput_rps": 0.3},
                        ALL: {"goodput_rps": 0.2}},
        "planner-2p1d": {"p": {"goodput_rps": 0.36}, "d": {"goodput_rps": 0.27},
                         ALL: {"goodput_rps": 0.315}},
    }
    c = compare(scores, ["static-2p1d", "static-1p2d"], ["p", "d"])
    assert c["best_static"] == "static-2p1d"
    assert c["vs_best_static"]["planner-2p1d"][ALL] == pytest.approx(1.26)
    assert c["vs_best_static"]["planner-2p1d"]["d"] == pytest.approx(2.7)
    assert c["hindsight"]["d"]["best_static"] == "static-1p2d"
    assert c["hindsight"]["d"]["vs_best"]["planner-2p1d"] == pytest.approx(0.9)
    assert compare(scores, [], ["p", "d"]) == {}


def _doc(phases: list[dict], label: str, planner: bool) -> dict:
    config = {"phases": phases, "shapes": {}, "slo": {"ttft_slo_ms": 1000.0,
                                                      "tpot_slo_ms": 100.0},
              "seed": 0, "max_workers": 3}
    doc = new_document({}, config, phase_windows(PHASES))
    spec = {"label": label, "prefill": 2, "decode": 1, "colocated": 0, "planner": planner}
    doc["contenders"][label] = contender_entry(label, spec, RECORDS, 0, [], [], 0.0)
    return doc


def test_merge_keeps_both_contenders_and_refuses_another_workload():
    """Merging adds the old file's contenders; analyze scores both; different phases refuse."""
    old, new = _doc([{"rate_rps": 1}], "static-2p1d", False), _doc([{"rate_rps": 1}],
                                                                    "planner-2p1d", True)
    merged = analyze(merge_documents(old, new))
    assert list(merged["contenders"]) == ["static-2p1d", "planner-2p1d"]
    assert merged["comparison"]["best_static"] == "static-2p1d"
    assert merged["comparison"]["vs_best_static"]["planner-2p1d"][ALL] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="phases"):
        merge_documents(old, _doc([{"rate_rps": 2}], "planner-2p1d", True))


# -- options ----------------------------------------------------------------------------------


def test_parsers():
    """Phase, contender and token-range options parse to their exact values or raise."""
    assert PhaseSpec.parse("P:0.4:120") == PhaseSpec(PhaseKind.PREFILL_HEAVY, 0.4, 120.0)
    assert PhaseSpec.parse("decode:1:60").kind is PhaseKind.DECODE_HEAVY
    assert ContenderSpec.parse("planner-1p2d") == ContenderSpec("planner-1p2d", 1, 2,
                                                                planner=True)
    assert ContenderSpec.parse("colocated-3") == ContenderSpec("colocated-3", colocated=3)
    assert _length_range("768-1024") == LengthConfig(896, LengthDist.UNIFORM, 128)
    assert _length_range("8") == LengthConfig(8, LengthDist.UNIFORM, 0)
    for bad in ("P:1", "x:1:2", "P:-1:10"):
        with pytest.raises(ValueError):
            PhaseSpec.parse(bad)
    with pytest.raises(ValueError):
        ContenderSpec.parse("static-2p")
    with pytest.raises(argparse.ArgumentTypeError):
        _length_range("7-10")
