"""Re-scoring saved side-by-side records under other SLOs, against hand-computed values."""

from __future__ import annotations

from scission.bench.metrics import SloConfig
from scission.bench.slo_grid import load_records, score


def record(ttft_s: float, gap_s: float, n: int = 3, error: str | None = None) -> dict:
    """A JSON record: first token at ``ttft_s``, then one token every ``gap_s``."""
    times = [ttft_s + i * gap_s for i in range(n)]
    return {"request_id": "r", "prompt_tokens": 8, "output_tokens": n, "start_s": 0.0,
            "chunk_times_s": times, "chunk_tokens": [1] * n, "end_s": times[-1],
            "error": error, "ttft_ms": 123.0}  # derived fields in the file are ignored


def doc() -> dict:
    fast_ttft = [record(1.0, 0.2), record(1.0, 0.2), record(1.0, 0.05), record(1.0, 0.05)]
    flat_tpot = [record(3.0, 0.05), record(3.0, 0.05), record(1.0, 0.05),
                 record(1.0, 0.05, error="UNAVAILABLE")]
    run = lambda rate, recs: {"offered_rate_rps": rate, "records": recs}  # noqa: E731
    return {"deployments": {
        "colocated": {"runs": [run(0.1, fast_ttft[2:]), run(0.2, fast_ttft)]},
        "disaggregated": {"runs": [run(0.1, flat_tpot[2:3]), run(0.2, flat_tpot)]}}}


def test_attainment_and_goodput_per_slo():
    records = load_records(doc())
    assert records["colocated"][0.2][0].ttft_ms == 1000.0  # recomputed from the chunks
    rows = score(records, [SloConfig(2000, 100), SloConfig(4000, 100)], target=0.5)
    by = {(r["ttft_slo_ms"], r["deployment"]): r for r in rows}
    # TTFT <= 2 s, TPOT <= 100 ms: colocated 2/2 at 0.1, 2/4 at 0.2; disaggregated 1/1, 1/4.
    assert by[(2000, "colocated")]["attainment"] == {0.1: 1.0, 0.2: 0.5}
    assert by[(2000, "colocated")]["goodput_rps"] == 0.2
    assert by[(2000, "disaggregated")]["attainment"] == {0.1: 1.0, 0.2: 0.25}
    assert by[(2000, "disaggregated")]["goodput_rps"] == 0.1
    # TTFT <= 4 s: disaggregated 3/4 at 0.2 (the failed request always misses).
    assert by[(4000, "disaggregated")]["attainment"][0.2] == 0.75
