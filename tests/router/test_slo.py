"""SLO window arithmetic (router/slo.py) with an injected clock, and its Prometheus export."""

from __future__ import annotations

import msgpack
import pytest

from scission.registry.metrics import SloWindow
from scission.registry.workers import WorkerRole
from scission.router.metrics import RouterMetrics
from scission.router.prefix_index import PrefixIndex
from scission.router.slo import RequestRecord, SloTracker, percentile

PREFILL, DECODE, COLOCATED = WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.COLOCATED


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_tracker(clock: FakeClock, window_s: float = 10.0) -> SloTracker:
    return SloTracker(slo_ttft_ms=100.0, slo_tpot_ms=10.0, window_s=window_s, clock=clock,
                      wall_clock=lambda: 1234.5)


def rec(status: str = "ok", prompt: int = 10, output: int = 2, e2e: float = 100.0,
        queue: float | None = 1.0, ttft: float | None = 50.0, tpot: float | None = 5.0,
        itl: float | None = 4.0, pre: WorkerRole | None = COLOCATED,
        dec: WorkerRole | None = COLOCATED) -> RequestRecord:
    return RequestRecord(status=status, num_prompt_tokens=prompt, num_output_tokens=output,
                         e2e_ms=e2e, queue_ms=queue, ttft_ms=ttft, tpot_ms=tpot, itl_ms=itl,
                         prefill_worker="p" if pre else "", prefill_role=pre,
                         decode_worker="d" if dec else "", decode_role=dec)


def sample(text: str, name: str) -> float:
    """Value of the sample line ``name`` (labels sorted by name) in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in exposition")


def by_scope(tracker: SloTracker) -> dict[str, SloWindow]:
    return {w.scope: w for w in tracker.windows("router-0000abcd")}


def test_percentile_is_nearest_rank():
    """p = sorted(v)[ceil(q * n) - 1]; empty -> 0.0."""
    assert percentile([], 0.9) == 0.0
    assert percentile([7.0], 0.5) == 7.0
    assert percentile([150.0, 50.0, 90.0, 80.0], 0.5) == 80.0
    assert percentile([150.0, 50.0, 90.0, 80.0], 0.9) == 150.0
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.0


def test_attains_only_ok_requests_within_both_slos():
    """TTFT met = ok and TTFT <= SLO; TPOT met = ok and (TPOT <= SLO or one token); a failed
    or cancelled request meets neither, whatever its timings."""
    assert rec(ttft=100.0, tpot=10.0).attains(100.0, 10.0) == (True, True)
    assert rec(ttft=100.1, tpot=10.1).attains(100.0, 10.0) == (False, False)
    assert rec(output=1, tpot=None, itl=None).attains(100.0, 10.0) == (True, True)
    assert rec(status="cancelled").attains(100.0, 10.0) == (False, False)
    assert rec(status="unavailable", ttft=None).attains(100.0, 10.0) == (False, False)


def test_cluster_window_arithmetic():
    """Five requests finished inside a full 10 s window: counts, rates, means, nearest-rank
    percentiles, attainments and goodput are the hand-computed values."""
    clock = FakeClock(0.0)
    tracker = make_tracker(clock)
    clock.t = 20.0  # the tracker is older than its window
    for t in (11.0, 12.0, 13.0, 14.0, 15.0):
        tracker.arrive(t, {COLOCATED})
    records = [
        rec(prompt=10, output=5, ttft=50.0, tpot=5.0, itl=4.0, e2e=70.0, queue=1.0),  # met
        rec(prompt=20, output=1, ttft=150.0, tpot=None, itl=None, e2e=150.0, queue=5.0),
        rec(prompt=30, output=3, ttft=80.0, tpot=20.0, itl=18.0, e2e=120.0, queue=3.0),
        rec(status="unavailable", prompt=40, output=0, ttft=None, tpot=None, itl=None,
            e2e=10.0, queue=None),
        rec(prompt=50, output=11, ttft=90.0, tpot=8.0, itl=7.0, e2e=170.0, queue=2.0),  # met
    ]
    met = [tracker.finish(r) for r in records]
    assert met == [(True, True), (False, True), (True, False), (False, False), (True, True)]
    w = by_scope(tracker)["cluster"]
    assert (w.router_id, w.window_s, w.updated_at_s) == ("router-0000abcd", 10.0, 1234.5)
    assert (w.slo_ttft_ms, w.slo_tpot_ms) == (100.0, 10.0)
    assert (w.num_arrivals, w.num_finished, w.num_failed) == (5, 5, 1)
    assert w.arrival_rps == 0.5
    assert (w.mean_prompt_tokens, w.mean_output_tokens) == (30.0, 4.0)
    assert w.queue_p90_ms == 5.0  # of [1, 2, 3, 5]
    assert (w.ttft_p50_ms, w.ttft_p90_ms) == (80.0, 150.0)  # of [50, 80, 90, 150]
    assert (w.tpot_p50_ms, w.tpot_p90_ms) == (8.0, 20.0)  # of [5, 8, 20]
    assert w.itl_p90_ms == 18.0
    assert w.e2e_p90_ms == 170.0  # of [10, 70, 120, 150, 170]
    assert (w.ttft_attainment, w.tpot_attainment, w.attainment) == (0.6, 0.6, 0.4)
    assert w.goodput_rps == 0.2  # 2 met / 10 s
    assert SloWindow.from_bytes(w.to_bytes()) == w


def test_expiry_out_of_the_window():
    """An event at t leaves the window at exactly t + window_s; rates are over the tracker's
    age while it is younger than the window (at least 1 s)."""
    clock = FakeClock(0.0)
    tracker = make_tracker(clock)
    clock.t = 0.5
    tracker.arrive(0.5)
    tracker.finish(rec())
    w = by_scope(tracker)["cluster"]
    assert (w.window_s, w.arrival_rps, w.goodput_rps) == (1.0, 1.0, 1.0)  # span floor 1 s
    clock.t = 4.0
    tracker.arrive(4.0)
    tracker.finish(rec(status="cancelled"))
    w = by_scope(tracker)["cluster"]
    assert (w.window_s, w.num_arrivals, w.num_finished, w.num_failed) == (4.0, 2, 2, 0)
    assert (w.arrival_rps, w.goodput_rps, w.attainment) == (0.5, 0.25, 0.5)
    clock.t = 10.4
    w = by_scope(tracker)["cluster"]
    assert (w.window_s, w.num_arrivals, w.num_finished) == (10.0, 2, 2)
    clock.t = 10.5  # the t=0.5 events expire
    w = by_scope(tracker)["cluster"]
    assert (w.num_arrivals, w.num_finished, w.attainment, w.goodput_rps) == (1, 1, 0.0, 0.0)
    clock.t = 14.0
    w = by_scope(tracker)["cluster"]
    assert (w.num_arrivals, w.num_finished, w.arrival_rps) == (0, 0, 0.0)
    assert (w.ttft_p90_ms, w.ttft_attainment, w.attainment) == (0.0, 1.0, 1.0)  # none: 1.0


def test_per_scope_attribution():
    """A pool's TTFT stats are the requests it prefilled, its TPOT stats the ones it decoded;
    counts, E2E, attainment (both) and goodput take every request that touched it, and
    arrivals count in each pool of the placement."""
    clock = FakeClock(0.0)
    tracker = make_tracker(clock)
    clock.t = 30.0  # the tracker is older than its window
    tracker.arrive(25.0, {PREFILL, DECODE})
    tracker.arrive(26.0, {DECODE})
    tracker.arrive(27.0, {COLOCATED})
    tracker.finish(rec(prompt=100, output=10, ttft=50.0, tpot=20.0, e2e=230.0, queue=2.0,
                       pre=PREFILL, dec=DECODE))  # disaggregated; TPOT missed
    tracker.finish(rec(prompt=8, output=4, ttft=300.0, tpot=5.0, e2e=315.0, queue=1.0,
                       pre=DECODE, dec=DECODE))  # local prefill on the decode worker
    tracker.finish(rec(prompt=6, output=2, ttft=10.0, tpot=1.0, e2e=11.0, queue=0.5))
    w = by_scope(tracker)
    assert list(w) == ["cluster", "colocated", "decode", "prefill"]
    assert [w[s].num_arrivals for s in w] == [3, 1, 2, 1]
    assert [w[s].num_finished for s in w] == [3, 1, 2, 1]
    pre, dec = w["prefill"], w["decode"]
    assert (pre.ttft_p50_ms, pre.ttft_attainment, pre.mean_prompt_tokens) == (50.0, 1.0, 100.0)
    assert (pre.queue_p90_ms, pre.e2e_p90_ms) == (2.0, 230.0)
    assert (pre.tpot_p90_ms, pre.tpot_attainment, pre.mean_output_tokens) == (0.0, 1.0, 0.0)
    assert (pre.attainment, pre.goodput_rps) == (0.0, 0.0)
    assert (dec.ttft_p90_ms, dec.ttft_attainment, dec.mean_prompt_tokens) == (300.0, 0.0, 8.0)
    assert (dec.tpot_p50_ms, dec.tpot_p90_ms, dec.tpot_attainment) == (5.0, 20.0, 0.5)
    assert (dec.mean_output_tokens, dec.attainment, dec.e2e_p90_ms) == (7.0, 0.0, 315.0)
    assert (w["colocated"].attainment, w["colocated"].goodput_rps) == (1.0, 0.1)
    assert (w["cluster"].attainment, w["cluster"].ttft_p90_ms) == (1 / 3, 300.0)


def test_prometheus_exposition_of_latencies_and_windows():
    """The latency histograms count each request's values; the window gauges per scope are
    the tracker's SloWindow."""
    clock = FakeClock(0.0)
    tracker = make_tracker(clock)
    clock.t = 20.0  # the tracker is older than its window
    metrics = RouterMetrics(PrefixIndex(60.0), slo=tracker)
    tracker.arrive(15.0, {PREFILL, DECODE})
    tracker.arrive(16.0, {PREFILL, DECODE})
    for r in (rec(ttft=50.0, tpot=5.0, itl=4.0, e2e=95.0, queue=1.0, pre=PREFILL, dec=DECODE),
              rec(output=1, ttft=400.0, tpot=None, itl=None, e2e=400.0, queue=3.0,
                  pre=PREFILL, dec=DECODE)):
        tracker.finish(r)
        metrics.observe_latencies(r)
    text = metrics.render().decode()
    assert sample(text, "scission_router_ttft_seconds_count") == 2
    assert sample(text, 'scission_router_ttft_seconds_bucket{le="0.1"}') == 1
    assert sample(text, "scission_router_ttft_seconds_sum") == pytest.approx(0.45)
    assert sample(text, "scission_router_tpot_seconds_count") == 1
    assert sample(text, "scission_router_itl_seconds_sum") == pytest.approx(0.004)
    assert sample(text, "scission_router_e2e_seconds_count") == 2
    assert sample(text, "scission_router_queue_seconds_sum") == pytest.approx(0.004)
    assert sample(text, 'scission_router_slo_target_seconds{metric="ttft"}') == 0.1
    assert sample(text, 'scission_router_slo_attainment{scope="cluster",slo="ttft"}') == 0.5
    assert sample(text, 'scission_router_slo_attainment{scope="decode",slo="tpot"}') == 1.0
    assert sample(text, 'scission_router_slo_attainment{scope="prefill",slo="both"}') == 0.5
    assert sample(text, 'scission_router_goodput_rps{scope="cluster"}') == 0.1
    assert sample(text, 'scission_router_arrival_rps{scope="prefill"}') == 0.2
    assert sample(text, 'scission_router_window_requests{kind="finished",scope="decode"}') == 2
    assert sample(text, 'scission_router_window_latency_seconds'
                        '{metric="ttft",quantile="0.9",scope="cluster"}') == 0.4
    assert sample(text, 'scission_router_window_latency_seconds'
                        '{metric="tpot",quantile="0.5",scope="decode"}') == 0.005


def test_shape_window_of_arrivals_and_recent_finishes():
    """Window 10 s, shape window 4 s, at t = 20: arrivals at 17, 18, 19 are recent (3 / 4 s =
    0.75 rps); their known prompts 300 and 500 give mean 400 and rms sqrt((300² + 500²) / 2) =
    412.3; the one that asked max_tokens (30) gives 30. Recent finishes: the ok ones that
    decoded (10 and 30 tokens at 18 and 19.5; not the failure at 19, not the one at 15): 20.
    At t = 22 only the arrival at 19 is recent. The fields survive the etcd encoding."""
    clock = FakeClock(0.0)
    tracker = SloTracker(100.0, 10.0, window_s=10.0, clock=clock, wall_clock=lambda: 1.0,
                         shape_window_s=4.0)
    clock.t = 15.0
    tracker.arrive(11.0, num_prompt_tokens=100, max_tokens=10)
    tracker.finish(rec(output=50))
    for at_s, prompt, max_tokens in ((17.0, 300, 0), (18.0, 0, 0), (19.0, 500, 30)):
        tracker.arrive(at_s, num_prompt_tokens=prompt, max_tokens=max_tokens)
    for t, r in ((18.0, rec(output=10)), (19.0, rec(status="unavailable", output=0)),
                 (19.5, rec(output=30))):
        clock.t = t
        tracker.finish(r)
    clock.t = 20.0
    w = by_scope(tracker)["cluster"]
    assert (w.num_arrivals, w.window_s, w.shape_window_s) == (4, 10.0, 4.0)
    assert (w.num_recent_arrivals, w.recent_arrival_rps) == (3, 0.75)
    assert w.arrival_mean_prompt_tokens == 400.0
    assert w.arrival_rms_prompt_tokens == pytest.approx(412.3105626)
    assert w.arrival_mean_max_tokens == 30.0
    assert (w.num_recent_finished, w.recent_mean_output_tokens) == (2, 20.0)
    assert SloWindow.from_bytes(w.to_bytes()) == w
    clock.t = 22.0
    w = by_scope(tracker)["cluster"]
    assert (w.num_recent_arrivals, w.arrival_mean_prompt_tokens) == (1, 500.0)
    assert (w.arrival_rms_prompt_tokens, w.num_recent_finished) == (500.0, 1)


def test_shape_window_defaults_and_old_records():
    """The shape window defaults to min(20 s, window_s) and may not exceed the window; a record
    written before the shape fields existed decodes with them at 0."""
    assert make_tracker(FakeClock(0.0)).shape_window_s == 10.0
    assert make_tracker(FakeClock(0.0), window_s=60.0).shape_window_s == 20.0
    with pytest.raises(ValueError):
        SloTracker(100.0, 10.0, window_s=10.0, shape_window_s=11.0)
    w = by_scope(make_tracker(FakeClock(5.0)))["cluster"]
    old = msgpack.unpackb(w.to_bytes())
    for name in ("shape_window_s", "num_recent_arrivals", "recent_arrival_rps",
                 "arrival_mean_prompt_tokens", "arrival_rms_prompt_tokens",
                 "arrival_mean_max_tokens", "num_recent_finished", "recent_mean_output_tokens"):
        del old[name]
    decoded = SloWindow.from_bytes(msgpack.packb(old))
    assert (decoded.shape_window_s, decoded.num_recent_arrivals) == (0.0, 0)
    assert decoded.arrival_mean_prompt_tokens == 0.0
