"""The step-latency model: exact recovery by the fit, and capacity helpers against hand values;
the planner's pool sizing (``sizing.py``) on the same models."""

from __future__ import annotations

import json
import math

import pytest

from scission.cluster.planner.perf_model import (
    DEFAULT_MODEL,
    DecodeModel,
    PerformanceModel,
    PrefillModel,
    servers_for_wait,
)
from scission.cluster.planner.sizing import (
    LoadShape,
    PoolState,
    SloTargets,
    balanced_share,
    keep_workers,
    size_role,
    split_share,
)
from scission.cluster.planner.types import ForwardSample
from scission.registry.workers import WorkerRole


def make_prefill_sample(num_tokens: int, step_ms: float) -> ForwardSample:
    return ForwardSample(worker_id="p0", role=WorkerRole.PREFILL, at_s=0.0,
                         num_prefill_tokens=num_tokens, num_decode_requests=0,
                         num_context_tokens=0, step_ms=step_ms)


def make_decode_sample(batch: int, context_tokens: int, step_ms: float) -> ForwardSample:
    return ForwardSample(worker_id="d0", role=WorkerRole.DECODE, at_s=0.0,
                         num_prefill_tokens=0, num_decode_requests=batch,
                         num_context_tokens=context_tokens, step_ms=step_ms)


def make_model(prefill=(0.0, 1.0, 0.0), decode=(10.0, 1.0, 0.01)) -> PerformanceModel:
    return PerformanceModel(PrefillModel(*prefill), DecodeModel(*decode))


PREFILL_TOKENS = [16, 32, 64, 96, 128, 256, 384, 512, 1024]
DECODE_POINTS = [(1, 100), (2, 900), (4, 300), (8, 4000), (16, 1600), (32, 9000), (3, 50),
                 (12, 12000), (24, 2400)]


def test_fit_recovers_known_coefficients():
    """Noise-free steps from a known model are fitted back to 1e-6 in both phases, and the
    step counts are reported; mixed (colocated) steps are left out of both fits."""
    samples = [make_prefill_sample(t, 3.0 + 0.5 * t + 0.001 * t * t) for t in PREFILL_TOKENS]
    samples += [make_decode_sample(n, k, 20.0 + 1.5 * n + 0.002 * k) for n, k in DECODE_POINTS]
    samples.append(ForwardSample("c0", WorkerRole.COLOCATED, 0.0, 64, 4, 400, 999.0))
    model = PerformanceModel.fit(samples)
    assert model is not None
    assert model.prefill.a_ms == pytest.approx(3.0, abs=1e-6)
    assert model.prefill.b_ms_per_token == pytest.approx(0.5, abs=1e-6)
    assert model.prefill.c_ms_per_token2 == pytest.approx(0.001, abs=1e-6)
    assert model.decode.a_ms == pytest.approx(20.0, abs=1e-6)
    assert model.decode.b_ms_per_request == pytest.approx(1.5, abs=1e-6)
    assert model.decode.c_ms_per_context_token == pytest.approx(0.002, abs=1e-6)
    assert model.num_samples == 18


def test_fit_clamps_negative_coefficients():
    """Step time falling with tokens (y = 10 − 0.5·t, t = 1..10) has no non-negative slope;
    the best non-negative fit is the constant mean 7.25 (residual 20.6 vs 214 for b·t alone)."""
    samples = [make_prefill_sample(t, 10.0 - 0.5 * t) for t in range(1, 11)]
    samples += [make_decode_sample(n, k, 20.0 + 1.5 * n + 0.002 * k) for n, k in DECODE_POINTS]
    model = PerformanceModel.fit(samples)
    assert model is not None
    assert model.prefill.a_ms == pytest.approx(7.25, abs=1e-6)
    assert model.prefill.b_ms_per_token == 0.0
    assert model.prefill.c_ms_per_token2 == 0.0


def test_fit_keeps_prior_for_thin_or_degenerate_phase():
    """A phase with < 8 steps, or all steps of one size, keeps the prior's part; with no prior
    such a fit returns None; with nothing fittable the prior itself comes back."""
    prior = make_model()
    few = [make_prefill_sample(t, 2.0 * t) for t in PREFILL_TOKENS[:7]]
    same = [make_prefill_sample(128, 100.0 + i) for i in range(20)]
    decode = [make_decode_sample(n, k, 5.0 + 2.0 * n + 0.1 * k) for n, k in DECODE_POINTS]
    for prefill in (few, same):
        model = PerformanceModel.fit(prefill + decode, prior=prior)
        assert model is not None
        assert model.prefill == prior.prefill
        assert model.decode.a_ms == pytest.approx(5.0, abs=1e-6)
        assert model.num_samples == 9
        assert PerformanceModel.fit(prefill + decode) is None
    assert PerformanceModel.fit(few, prior=prior) is prior


def test_dict_round_trip_is_json_able():
    """to_dict → JSON → from_dict gives back an equal model."""
    model = PerformanceModel(PrefillModel(1.0, 2.0, 3e-4), DecodeModel(4.0, 5.0, 6e-3), 42)
    assert PerformanceModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert PerformanceModel.from_dict(DEFAULT_MODEL.to_dict()) == DEFAULT_MODEL


def test_prefill_capacity_hand_values():
    """1 ms/token: a 100-token prompt behind 300 queued tokens waits 400 ms; with SLO 300 ms
    the headroom is H = 2, ρ = 4 / (ln 10 + 4) = 0.634660, λ = ρ / 0.1 s = 6.34660 rps; an SLO
    no longer than one step (100 ms) sustains 0 rps."""
    model = make_model()
    assert model.prefill_ttft_ms(100) == 100.0
    assert model.prefill_ttft_ms(100, queue_tokens=300) == 400.0
    assert model.max_prefill_rps_per_worker(100, 300.0) == pytest.approx(6.346602, abs=1e-6)
    assert model.max_prefill_rps_per_worker(100, 300.0) == pytest.approx(
        10.0 * 4.0 / (math.log(10.0) + 4.0))
    assert model.max_prefill_rps_per_worker(100, 100.0) == 0.0


def test_decode_capacity_hand_values():
    """a=10, b=1, c=0.01 ms: at context 100 a row costs 2 ms, so SLO 50 ms fits 20 rows with
    TPOT exactly 50 ms; prompt 80 + output 40 → context 100, λ = 20 / (40 · 0.05 s) = 10 rps.
    An SLO below the fixed cost fits nothing; a model without per-row cost hits the cap."""
    model = make_model()
    assert model.decode_tpot_ms(20, 100) == pytest.approx(50.0)
    assert model.max_decode_batch(100, 50.0) == 20
    assert model.max_decode_rps_per_worker(80, 40, 50.0) == pytest.approx(10.0)
    assert model.max_decode_batch(100, 9.0) == 0
    assert model.max_decode_rps_per_worker(80, 40, 9.0) == 0.0
    flat = make_model(decode=(10.0, 0.0, 0.0))
    assert flat.max_decode_batch(100, 50.0, max_batch=64) == 64


def test_prefill_service_and_alone_hand_values():
    """a=100, b=2, c=0.001 ms, budget 1024 tokens: a busy worker spends 100·512/1024 + 2·512 +
    0.001·600² = 1,434 ms per 512-token prompt (rms 600); a 1,500-token prompt alone takes two
    steps: 2·100 + 2·1500 + 0.001·1500² = 5,450 ms."""
    model = make_model(prefill=(100.0, 2.0, 0.001))
    assert model.prefill_service_ms(512, 600, 1024) == pytest.approx(1434.0)
    assert model.prefill_alone_ms(1500, 1024) == pytest.approx(5450.0)
    assert model.prefill_alone_ms(1024, 1024) == pytest.approx(100 + 2048 + 0.001 * 1024 ** 2)


def test_servers_for_wait_hand_values():
    """Service 100 ms, wait budget 200 ms, miss 0.1. 1.5 busy workers: at 2, Erlang C = 0.643
    and P(W > 0.2 s) = 0.643·exp(−2·0.5/0.1·0.2) = 0.087 (M/D/c); with cv² = 1 (M/M/c) it is
    0.643·exp(−0.5/0.1·0.2) = 0.236, so 3 (0.012). 1.8 busy: 2 gives 0.383, so 3. No load: 0.
    At least ``min_servers``."""
    assert servers_for_wait(1.5, 0.1, 0.2, 0.1, 0.0, 2) == 2
    assert servers_for_wait(1.5, 0.1, 0.2, 0.1, 1.0, 2) == 3
    assert servers_for_wait(1.8, 0.1, 0.2, 0.1, 0.0, 2) == 3
    assert servers_for_wait(0.0, 0.1, 0.2, 0.1, 0.0, 1) == 0
    assert servers_for_wait(1.5, 0.1, 0.2, 0.1, 0.0, 5) == 5


def test_blend_is_coefficientwise():
    """blend(other, w) = (1 − w)·self + w·other for every coefficient; w = 1 gives ``other``."""
    a, b = make_model(), make_model(prefill=(4.0, 3.0, 0.002), decode=(30.0, 3.0, 0.03))
    half = a.blend(b, 0.5)
    assert (half.prefill.a_ms, half.prefill.b_ms_per_token) == (2.0, 2.0)
    assert half.prefill.c_ms_per_token2 == pytest.approx(0.001)
    assert (half.decode.a_ms, half.decode.b_ms_per_request) == (20.0, 2.0)
    assert half.decode.c_ms_per_context_token == pytest.approx(0.02)
    assert a.blend(b, 1.0) == b


def test_size_role_hand_values():
    """Prefill 1 ms/token, decode 10 + 1·n + 0.01·k ms; prompt 100, output 40; SLOs 300 / 50 ms,
    utilization ≤ 0.9. Prefill: 9 rps per worker, 2 workers for 15 rps. Decode: 18 rows
    (step 49.6 ms), 0.9·18/(40·0.0496) = 8.17 rps per worker; with 1,400 KV tokens a worker
    holds 1400/140 = 10 rows: step 32 ms, 0.9·10/(40·0.032) = 7.03 rps, 3 workers for 15 rps.
    A prompt alone slower than the TTFT SLO: unreachable (None)."""
    model = make_model()
    targets = SloTargets(300.0, 50.0, 0.9)
    shape = LoadShape(100.0, 100.0, 40.0, "test")
    prefill = size_role(model, WorkerRole.PREFILL, 15.0, shape, targets)
    assert (prefill.capacity_rps, prefill.replicas) == (pytest.approx(9.0), 2)
    decode = size_role(model, WorkerRole.DECODE, 15.0, shape, targets)
    assert (decode.capacity_rps, decode.replicas) == (pytest.approx(16.2 / 1.984), 2)
    kv = size_role(model, WorkerRole.DECODE, 15.0, shape, targets, PoolState(1400))
    assert (kv.capacity_rps, kv.replicas) == (pytest.approx(9.0 / 1.28), 3)
    long = LoadShape(400.0, 400.0, 40.0, "test")
    assert size_role(model, WorkerRole.PREFILL, 1.0, long, targets).replicas is None


def test_split_and_balanced_shares():
    """balanced: n·1 = (10 − n)·4 → 8. split: steady needs 3 + 4 of 10 first, the 3 left in
    proportion to the backlogs (6 : 1) → 3 + 2.57 → 6; steady needs above the total (4 + 4 of
    6) → in proportion, 3. keep: max(min 1, desired 2, ceil(10 / (4·0.7)) = 4)."""
    assert balanced_share(10, 1.0, 4.0) == 8
    assert split_share(10, (3, 9), (4, 5)) == 6
    assert split_share(6, (4, 4), (4, 9)) == 3
    assert keep_workers(10.0, 4.0, 2, 1, 0.7) == 4
    assert keep_workers(10.0, 0.0, 2, 1, 0.7) > 10 ** 6  # unreachable: never has spare
