"""Load generator against an in-process fake Generation server on a loopback port.

The fake stands in for the network peer only; the client, clock and metric path are the real
ones. Delays: first chunk after FIRST_TOKEN_DELAY_S, then one token every TOKEN_GAP_S.
"""

from __future__ import annotations

import asyncio

import pytest
from bench_fakes import FIRST_TOKEN_DELAY_S, TOKEN_GAP_S, FakeRouter

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.loadgen import LoadGenConfig, run_load
from scission.bench.metrics import BENCH_DEADLINE, SloConfig
from scission.bench.runner import run_against
from scission.bench.workload import Workload, WorkloadRequest

QUIET = LoadGenConfig(request_timeout_s=10.0, max_duration_s=30.0, show_progress=False)
SLACK_S = 0.5  # generous upper bound for scheduling noise on a loaded CI machine


def make_workload(ids: list[str], output_tokens: int = 4, prompt_tokens: int = 7) -> Workload:
    requests = tuple(
        WorkloadRequest(i, tuple(range(1, prompt_tokens + 1)), output_tokens, arrival_s=0.0)
        for i in ids
    )
    return Workload(name="test", requests=requests)


def test_records_latencies_and_failures(fake_router: FakeRouter) -> None:
    """3 good requests record 4 one-token chunks each, TTFT >= the server's first-token delay,
    the last token >= first delay + 3 token gaps after the start, ITLs and TPOT in [0, SLACK_S);
    the "fail" request is counted as failed
    and rejected with RESOURCE_EXHAUSTED. The server sees token ids, max_tokens and greedy."""
    workload = make_workload(["ok-0", "ok-1", "fail-0", "ok-2"])
    arrival = ArrivalConfig(kind=ArrivalKind.POISSON, rate_rps=50.0, seed=1)
    slo = SloConfig(ttft_slo_ms=10_000.0, tpot_slo_ms=10_000.0)
    result = run_against(fake_router.address, workload, arrival, slo, QUIET, label="t")

    s = result.summary
    assert (s.num_requests, s.num_succeeded, s.num_failed, s.num_rejected) == (4, 3, 1, 1)
    assert s.error_counts == {"RESOURCE_EXHAUSTED": 1}
    assert s.slo_attainment == pytest.approx(0.75)
    assert s.total_output_tokens == 12
    by_id = {r.request_id.split(".")[0]: r for r in result.records}
    assert by_id["fail-0"].error == "RESOURCE_EXHAUSTED"
    assert by_id["fail-0"].error_detail == "fake overload"
    for name in ("ok-0", "ok-1", "ok-2"):
        r = by_id[name]
        assert r.succeeded and r.finish_reason == "FINISH_REASON_LENGTH"
        assert r.chunk_tokens == (1, 1, 1, 1) and r.output_tokens == 4
        assert FIRST_TOKEN_DELAY_S * 1e3 <= r.ttft_ms < (FIRST_TOKEN_DELAY_S + SLACK_S) * 1e3
        assert len(r.itl_ms) == 3 and all(0 <= g < SLACK_S * 1e3 for g in r.itl_ms)
        # Client-side gaps can shrink when chunks queue up, but the last token cannot arrive
        # before the server sent it: first delay + 3 gaps after the request.
        last_token_ms = r.ttft_ms + sum(r.itl_ms)
        assert last_token_ms >= (FIRST_TOKEN_DELAY_S + 3 * TOKEN_GAP_S) * 1e3
        assert r.e2e_ms >= last_token_ms and 0 <= r.tpot_ms < SLACK_S * 1e3
        assert (r.prefill_worker, r.decode_worker) == ("fake-prefill", "fake-decode")
        assert r.scheduled_s is not None and r.start_s >= r.scheduled_s

    received = fake_router.servicer.received
    assert len(received) == 4
    for request in received:
        assert request.WhichOneof("input") == "token_ids"
        assert list(request.token_ids.ids) == [1, 2, 3, 4, 5, 6, 7]
        assert request.sampling.max_tokens == 4 and request.sampling.ignore_eos
        assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert len({r.request_id for r in received}) == 4  # unique per run


def test_fixed_concurrency(fake_router: FakeRouter) -> None:
    """With concurrency 2, all 6 requests complete and no more than 2 are ever in flight."""
    workload = make_workload([f"ok-{i}" for i in range(6)], output_tokens=2)
    arrival = ArrivalConfig(kind=ArrivalKind.CONCURRENCY, concurrency=2)
    slo = SloConfig(ttft_slo_ms=10_000.0, tpot_slo_ms=10_000.0)
    result = run_against(fake_router.address, workload, arrival, slo, QUIET)
    assert result.summary.num_succeeded == 6
    records = result.records
    for r in records:
        in_flight = sum(o.start_s <= r.start_s < o.end_s for o in records)
        assert in_flight <= 2
    assert all(r.scheduled_s is None for r in records)


def test_request_timeout_and_duration_bound(fake_router: FakeRouter) -> None:
    """A request slower than its gRPC deadline fails DEADLINE_EXCEEDED; when the run's duration
    bound expires, the in-flight request is cancelled (BENCH_DEADLINE) and later ones are not
    sent; the run stops by itself at the bound."""
    timeout = LoadGenConfig(request_timeout_s=0.2, max_duration_s=30.0, show_progress=False)
    late = asyncio.run(
        run_load(fake_router.address, timeout, make_workload(["slow-0"]).requests, [0.0])
    )
    assert [r.error for r in late.records] == ["DEADLINE_EXCEEDED"]

    bound = LoadGenConfig(request_timeout_s=30.0, max_duration_s=0.5, show_progress=False)
    requests = make_workload(["slow-1", "ok-later"]).requests
    result = asyncio.run(run_load(fake_router.address, bound, requests, [0.0, 20.0]))
    assert [r.error for r in result.records] == [BENCH_DEADLINE]
    assert result.num_not_sent == 1
    assert 0.5 <= result.duration_s < 0.5 + SLACK_S


def test_unreachable_router() -> None:
    """Nothing listening at the address: ConnectionError after connect_timeout_s, no records."""
    config = LoadGenConfig(connect_timeout_s=0.3, show_progress=False)
    requests = make_workload(["ok-0"]).requests
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        asyncio.run(run_load("127.0.0.1:1", config, requests, [0.0]))


def test_error_finish_and_incomplete_stream(fake_router: FakeRouter) -> None:
    """A stream ending with FINISH_REASON_ERROR, or without any finish chunk, is a failed
    request (FINISH_REASON_ERROR / INCOMPLETE) that keeps its received tokens; not rejected."""
    requests = make_workload(["error-0", "cut-0"], output_tokens=2).requests
    result = asyncio.run(run_load(fake_router.address, QUIET, requests, [0.0, 0.0]))
    errors = {r.request_id.split(".")[0]: r.error for r in result.records}
    assert errors == {"error-0": "FINISH_REASON_ERROR", "cut-0": "INCOMPLETE"}
    assert all(r.output_tokens == 2 and not r.rejected for r in result.records)
