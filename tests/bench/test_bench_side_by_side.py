"""Arithmetic of the side-by-side and engine benchmarks, on hand-computed values (no clusters)."""

from __future__ import annotations

import pytest

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.engine import Measurement, format_table, measure
from scission.bench.metrics import GoodputResult, RequestRecord, SloConfig, summarize
from scission.bench.runner import BenchResult
from scission.bench.side_by_side_report import (
    DeploymentRuns,
    compare,
    pooled_latencies,
    ratio,
    run_latencies,
)

SLO = SloConfig(ttft_slo_ms=350.0, tpot_slo_ms=60.0)


def record(rid: str, start_s: float, chunk_times_s: tuple[float, ...]) -> RequestRecord:
    """One token per chunk; the stream ends with the last chunk."""
    return RequestRecord(
        rid,
        prompt_tokens=10,
        output_tokens=len(chunk_times_s),
        start_s=start_s,
        chunk_times_s=chunk_times_s,
        chunk_tokens=(1,) * len(chunk_times_s),
        end_s=chunk_times_s[-1] if chunk_times_s else start_s,
    )


def failed(rid: str) -> RequestRecord:
    return RequestRecord(rid, 10, 0, start_s=0.0, end_s=0.1, error="UNAVAILABLE")


def bench_run(label: str, rate_rps: float, records: list[RequestRecord]) -> BenchResult:
    return BenchResult(
        label,
        "addr",
        "synthetic",
        ArrivalConfig(ArrivalKind.POISSON, rate_rps),
        tuple(records),
        summarize(records, 10.0, SLO),
    )


# colocated @1 rps: TTFT [100, 300] ms, TPOT [(300-100)/2, (400-300)/2] = [100, 50] ms
# disaggregated @1 rps: TTFT [200, 400] ms, TPOT [20, 30] ms
COLOC_1 = bench_run(
    "colocated", 1.0, [record("a", 0.0, (0.1, 0.2, 0.3)), record("b", 1.0, (1.3, 1.35, 1.4))]
)
DISAGG_1 = bench_run(
    "disaggregated", 1.0, [record("a", 0.0, (0.2, 0.22, 0.24)), record("b", 1.0, (1.4, 1.43, 1.46))]
)
# @2 rps: colocated TTFT 500 TPOT 100 (+ one failure, in no latency); disaggregated TTFT 100 TPOT 50
COLOC_2 = bench_run("colocated", 2.0, [record("c", 0.0, (0.5, 0.6)), failed("x")])
DISAGG_2 = bench_run("disaggregated", 2.0, [record("c", 0.0, (0.1, 0.15))])


def deployment(label: str, runs: list[BenchResult], goodput_rps: float | None) -> DeploymentRuns:
    points = tuple((r.offered_rate_rps, r.summary.slo_attainment) for r in runs)
    return DeploymentRuns(label, tuple(runs), GoodputResult(goodput_rps, 0.9, points))


def test_ratio_is_value_over_baseline_and_none_when_undefined() -> None:
    """ratio = value / baseline; None for a missing side or a baseline <= 0."""
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(2.0, None) is None
    assert ratio(2.0, 0.0) is None


def test_run_latencies_are_linear_percentiles() -> None:
    """p50/p90 with linear interpolation: [100, 300] -> 200, 280; [50, 100] -> 75, 95."""
    assert run_latencies(COLOC_1) == pytest.approx(
        {"ttft_p50": 200.0, "ttft_p90": 280.0, "tpot_p50": 75.0, "tpot_p90": 95.0}
    )
    assert run_latencies(DISAGG_1) == pytest.approx(
        {"ttft_p50": 300.0, "ttft_p90": 380.0, "tpot_p50": 25.0, "tpot_p90": 29.0}
    )


def test_pooled_latencies_merge_rates_and_skip_failures() -> None:
    """Colocated TTFT [100, 300, 500] -> p50 300, p90 460; TPOT [50, 100, 100] -> 100, 100."""
    assert pooled_latencies([COLOC_1, COLOC_2]) == pytest.approx(
        {"ttft_p50": 300.0, "ttft_p90": 460.0, "tpot_p50": 100.0, "tpot_p90": 100.0}
    )


def test_compare_gives_goodput_pooled_and_per_rate_ratios() -> None:
    """disaggregated / colocated for goodput (2/1), pooled and per-rate latency percentiles."""
    base = deployment("colocated", [COLOC_1, COLOC_2], 1.0)
    other = deployment("disaggregated", [DISAGG_1, DISAGG_2], 2.0)
    c = compare(base, other)
    assert c["goodput_ratio"] == 2.0
    assert c["goodput_rps"] == {"colocated": 1.0, "disaggregated": 2.0}
    # pooled disaggregated TTFT [100, 200, 400] -> 200, 360; TPOT [20, 30, 50] -> 30, 46
    assert c["pooled_latency_ratios"] == pytest.approx(
        {"ttft_p50": 200 / 300, "ttft_p90": 360 / 460, "tpot_p50": 0.3, "tpot_p90": 0.46}
    )
    assert [p["rate_rps"] for p in c["per_rate"]] == [1.0, 2.0]
    assert c["per_rate"][0]["latency_ratios"] == pytest.approx(
        {"ttft_p50": 1.5, "ttft_p90": 380 / 280, "tpot_p50": 25 / 75, "tpot_p90": 29 / 95}
    )
    # @1 rps (TTFT <= 350, TPOT <= 60): colocated a fails TPOT, b passes; disaggregated a passes,
    # b fails TTFT (400) -> 1/2 each
    assert c["per_rate"][0]["attainment"] == {"colocated": 0.5, "disaggregated": 0.5}


def test_compare_without_baseline_goodput_or_shared_rates() -> None:
    """No passing baseline rate -> goodput ratio None; only rates both ran are compared."""
    base = deployment("colocated", [COLOC_1], None)
    other = deployment("disaggregated", [DISAGG_2], 2.0)
    c = compare(base, other)
    assert c["goodput_ratio"] is None
    assert c["per_rate"] == []


class ScriptedRunner:
    """Returns scripted durations: 0.5 s for 1 new token, then the next of ``long_s``."""

    name, dtype = "fake", "float32"

    def __init__(self, long_s: list[float]) -> None:
        self.long_s = list(long_s)

    def generate_s(self, prompts, new_tokens: int) -> float:
        return 0.5 if new_tokens == 1 else self.long_s.pop(0)


def test_decode_throughput_is_tokens_over_median_difference() -> None:
    """Warm-up discarded; samples = T(N) - T(1) = [2, 1, 3] s; 8 x 63 tokens / 2 s = 252 tok/s."""
    (m,) = measure([ScriptedRunner([99.0, 2.5, 1.5, 3.5])], "decode", [[1]] * 8, 64, repeats=3)
    assert m.samples_s == (2.0, 1.0, 3.0)
    assert m.median_s == 2.0
    assert m.tokens == 504
    assert m.tokens_per_s == 252.0


def test_prefill_throughput_and_table_ratios() -> None:
    """Prefill: 512 tokens / median 0.5 s = 1024 tok/s; the table shows scission/HF = 2.00x."""
    (m,) = measure([ScriptedRunner([])], "prefill", [list(range(512))], 1, repeats=3)
    assert m.tokens_per_s == 1024.0
    hf = Measurement("hf", "float32", "prefill", 1, 512, 1.0, (1.0,))
    ours = Measurement("scission", "float32", "prefill", 1, 512, 0.5, (0.5,))
    table = format_table([ours, hf], {"llama.cpp": "not installed"})
    row = table.splitlines()[2].split()
    assert row == ["float32", "prefill", "1", "1024.0", "512.0", "2.00x", "-", "-"]
    assert table.splitlines()[-1] == "llama.cpp: not installed"
