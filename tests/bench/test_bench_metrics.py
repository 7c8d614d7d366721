"""Metric arithmetic against hand-computed values (scission.bench.metrics)."""

from __future__ import annotations

import json

import pytest

from scission.bench.metrics import (
    BENCH_DEADLINE,
    RequestRecord,
    SloConfig,
    latency_stats,
    meets_slo,
    percentile,
    search_goodput,
    slo_attainment,
    summarize,
    sweep_goodput,
)

SLO = SloConfig(ttft_slo_ms=200.0, tpot_slo_ms=80.0)


def make_record(
    request_id: str = "r",
    start_s: float = 1.0,
    chunk_times_s: tuple[float, ...] = (1.1, 1.15, 1.3, 1.35),
    chunk_tokens: tuple[int, ...] = (1, 1, 2, 1),
    end_s: float | None = 1.4,
    error: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        prompt_tokens=10,
        output_tokens=sum(chunk_tokens),
        start_s=start_s,
        chunk_times_s=chunk_times_s,
        chunk_tokens=chunk_tokens,
        end_s=end_s,
        error=error,
    )


def test_request_latencies() -> None:
    """TTFT = first token chunk - start; E2E = end - start; TPOT = (E2E - TTFT)/(tokens - 1);
    ITL = every gap between token chunks (a 2-token chunk is one gap, not split)."""
    r = make_record()
    assert r.output_tokens == 5
    assert r.ttft_ms == pytest.approx(100.0)
    assert r.e2e_ms == pytest.approx(400.0)
    assert r.tpot_ms == pytest.approx((400.0 - 100.0) / 4)
    assert r.itl_ms == pytest.approx([50.0, 150.0, 50.0])


def test_tpot_undefined_for_one_token_and_failures() -> None:
    """TPOT is None for a 1-token output (which meets the TPOT objective vacuously) and for a
    failed request (which never meets the SLO)."""
    one = make_record(chunk_times_s=(1.1,), chunk_tokens=(1,), end_s=1.9)
    assert one.tpot_ms is None and one.itl_ms == []
    assert meets_slo(one, SLO)
    failed = make_record(error="INTERNAL")
    assert failed.tpot_ms is None
    assert not meets_slo(failed, SLO)


def test_percentiles_linear_interpolation() -> None:
    """p50/p90/p99 of 1..10 with linear interpolation at index (n-1)q/100: 5.5, 9.1, 9.91."""
    values = [float(v) for v in [7, 3, 10, 1, 5, 2, 9, 4, 8, 6]]
    stats = latency_stats(values)
    assert stats.count == 10
    assert stats.mean == pytest.approx(5.5)
    assert stats.p50 == pytest.approx(5.5)
    assert stats.p90 == pytest.approx(9.1)
    assert stats.p99 == pytest.approx(9.91)
    assert percentile([4.0], 99) == 4.0
    assert latency_stats([]).p50 is None


def test_attainment_counts_failures_as_misses() -> None:
    """Attainment = requests that succeeded with TTFT and TPOT within objectives / all sent;
    failed (incl. rejected) requests are misses and counted in num_failed/num_rejected."""
    good = make_record("good")  # TTFT 100, TPOT 75
    slow_first = make_record("ttft", chunk_times_s=(1.3, 1.35, 1.4, 1.45), end_s=1.5)  # TTFT 300
    slow_decode = make_record("tpot", end_s=1.5)  # TPOT (500-100)/4 = 100
    rejected = make_record(
        "rej", chunk_times_s=(), chunk_tokens=(), end_s=1.01, error="RESOURCE_EXHAUSTED"
    )
    cut = make_record(
        "cut", chunk_times_s=(1.1,), chunk_tokens=(1,), end_s=2.0, error=BENCH_DEADLINE
    )
    records = [good, slow_first, slow_decode, rejected, cut]
    assert [meets_slo(r, SLO) for r in records] == [True, False, False, False, False]
    assert slo_attainment(records, SLO) == pytest.approx(0.2)

    summary = summarize(records, duration_s=2.0, slo=SLO, num_not_sent=3)
    assert (summary.num_requests, summary.num_succeeded, summary.num_failed) == (5, 3, 2)
    assert summary.num_rejected == 1  # the deadline cut had a token already: failed, not rejected
    assert summary.num_not_sent == 3
    assert summary.error_counts == {BENCH_DEADLINE: 1, "RESOURCE_EXHAUSTED": 1}
    assert summary.request_rps == pytest.approx(1.5)  # 3 succeeded / 2 s
    assert summary.output_tokens_per_s == pytest.approx(15 / 2.0)
    assert summary.request_goodput_rps == pytest.approx(0.5)
    assert summary.slo_attainment == pytest.approx(0.2)
    assert summary.ttft_ms.count == 3 and summary.itl_ms.count == 9
    assert summary.ttft_ms.p50 == pytest.approx(100.0)


def test_record_dict_round_trip() -> None:
    """to_dict carries the derived latencies; from_dict of its JSON gives back an equal record."""
    r = make_record()
    data = json.loads(json.dumps(r.to_dict()))
    assert data["ttft_ms"] == pytest.approx(100.0) and data["tpot_ms"] == pytest.approx(75.0)
    assert RequestRecord.from_dict(data) == r


def step_attainment(threshold_rps: float):
    """Monotone attainment: 1.0 up to the threshold, 0.5 above it."""
    return lambda rate_rps: 1.0 if rate_rps <= threshold_rps else 0.5


def test_goodput_binary_search_exact() -> None:
    """Bisection on [1, 5], tolerance 0.25, pass iff rate <= 3.3: evaluates 1, 5, 3, 4, 3.5, 3.25
    and returns 3.25 (the passing end of the final bracket [3.25, 3.5])."""
    result = search_goodput(step_attainment(3.3), lo_rps=1.0, hi_rps=5.0, tolerance_rps=0.25)
    assert result.goodput_rps == 3.25
    assert [rate for rate, _ in result.points] == [1.0, 5.0, 3.0, 4.0, 3.5, 3.25]
    assert result.target == 0.9


def test_goodput_binary_search_edges() -> None:
    """lo failing gives None after one evaluation; hi passing gives hi after two."""
    none = search_goodput(step_attainment(0.5), 1.0, 5.0, 0.25)
    assert none.goodput_rps is None and len(none.points) == 1
    top = search_goodput(step_attainment(9.0), 1.0, 5.0, 0.25)
    assert top.goodput_rps == 5.0 and len(top.points) == 2
    with pytest.raises(ValueError):
        search_goodput(step_attainment(1.0), 5.0, 1.0, 0.25)


def test_goodput_sweep() -> None:
    """A sweep evaluates every rate in ascending order and returns the highest passing rate,
    with the target inclusive (attainment == target passes)."""
    attainment = {1.0: 1.0, 2.0: 0.95, 3.0: 0.9, 4.0: 0.6}
    result = sweep_goodput(attainment.__getitem__, [4.0, 1.0, 3.0, 2.0], target=0.9)
    assert result.goodput_rps == 3.0
    assert result.points == ((1.0, 1.0), (2.0, 0.95), (3.0, 0.9), (4.0, 0.6))
    assert sweep_goodput(lambda r: 0.1, [1.0, 2.0]).goodput_rps is None
