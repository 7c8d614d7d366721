"""Arrival processes (scission.bench.arrivals)."""

from __future__ import annotations

import numpy as np
import pytest

from scission.bench.arrivals import (
    ArrivalConfig,
    ArrivalKind,
    gamma_arrivals,
    poisson_arrivals,
    schedule,
)


def test_poisson_reproducible_and_mean_gap() -> None:
    """Same seed -> same times; first at 0, non-decreasing; over 10k gaps the mean is 1/rate
    within 5% (5 standard errors of an exponential mean) and the CV is ~1."""
    times = poisson_arrivals(10_001, rate_rps=5.0, seed=42)
    assert times == poisson_arrivals(10_001, rate_rps=5.0, seed=42)
    assert times != poisson_arrivals(10_001, rate_rps=5.0, seed=43)
    assert times[0] == 0.0
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    assert abs(gaps.mean() - 0.2) < 0.01
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05


def test_gamma_burstiness() -> None:
    """Gamma gaps keep the mean 1/rate for any shape k; their CV is 1/sqrt(k)."""
    for k in (0.25, 4.0):
        gaps = np.diff(gamma_arrivals(20_001, rate_rps=2.0, burstiness=k, seed=7))
        assert abs(gaps.mean() - 0.5) < 0.05
        assert abs(gaps.std() / gaps.mean() - 1 / np.sqrt(k)) < 0.1


def test_schedule_modes() -> None:
    """Trace mode replays the workload's times relative to the first; concurrency has none."""
    trace = [3.0, 3.5, 10.0]
    assert schedule(ArrivalConfig(kind=ArrivalKind.TRACE), trace) == [0.0, 0.5, 7.0]
    assert schedule(ArrivalConfig(kind=ArrivalKind.CONCURRENCY), trace) is None
    poisson = schedule(ArrivalConfig(kind=ArrivalKind.POISSON, rate_rps=2.0, seed=5), trace)
    assert poisson == poisson_arrivals(3, 2.0, seed=5)
    with pytest.raises(ValueError):
        ArrivalConfig(rate_rps=0.0)
