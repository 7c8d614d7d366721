"""When each request is sent: Poisson / gamma processes, trace replay, or fixed concurrency.

Gamma inter-arrival times follow vLLM's ``benchmark_serving``: shape ``k = burstiness`` and scale
``1 / (rate_rps * k)``, so the mean gap is ``1 / rate_rps`` for every ``k``; ``k = 1`` is a Poisson
process, ``k < 1`` is burstier and ``k > 1`` more regular. The first request is sent at 0 and the
gaps between consecutive requests are the i.i.d. draws (no idle wait before the first request).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


class ArrivalKind(enum.Enum):
    POISSON = "poisson"
    GAMMA = "gamma"
    TRACE = "trace"  # the workload's own (time-scaled) arrival times
    CONCURRENCY = "concurrency"  # keep a fixed number in flight; no arrival times


@dataclass(frozen=True)
class ArrivalConfig:
    kind: ArrivalKind = ArrivalKind.POISSON
    rate_rps: float = 4.0
    burstiness: float = 1.0  # gamma shape (GAMMA only)
    concurrency: int = 8  # requests in flight (CONCURRENCY only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate_rps <= 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    @property
    def describe(self) -> str:
        match self.kind:
            case ArrivalKind.POISSON:
                return f"poisson {self.rate_rps:g} rps"
            case ArrivalKind.GAMMA:
                return f"gamma {self.rate_rps:g} rps, burstiness {self.burstiness:g}"
            case ArrivalKind.TRACE:
                return "trace timestamps"
            case ArrivalKind.CONCURRENCY:
                return f"concurrency {self.concurrency}"
        raise AssertionError(f"unknown arrival kind {self.kind}")


def gamma_arrivals(
    num_requests: int, rate_rps: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times in seconds (first at 0) with Gamma(k, 1/(rate*k)) gaps; reproducible per seed."""
    assert num_requests >= 0 and rate_rps > 0 and burstiness > 0
    if num_requests == 0:
        return []
    rng = np.random.default_rng(seed)
    gaps_s = rng.gamma(shape=burstiness, scale=1.0 / (rate_rps * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps_s).tolist()]


def poisson_arrivals(num_requests: int, rate_rps: float, seed: int = 0) -> list[float]:
    """Send times of a Poisson process at ``rate_rps`` (exponential gaps), first at 0."""
    return gamma_arrivals(num_requests, rate_rps, burstiness=1.0, seed=seed)


def schedule(config: ArrivalConfig, trace_arrivals_s: Sequence[float]) -> list[float] | None:
    """Send time of each request (seconds from the start), or None in concurrency mode.

    ``trace_arrivals_s`` are the workload's own arrival times; its length is the request count.
    """
    n = len(trace_arrivals_s)
    match config.kind:
        case ArrivalKind.POISSON:
            return poisson_arrivals(n, config.rate_rps, config.seed)
        case ArrivalKind.GAMMA:
            return gamma_arrivals(n, config.rate_rps, config.burstiness, config.seed)
        case ArrivalKind.TRACE:
            first = min(trace_arrivals_s, default=0.0)
            return [t - first for t in trace_arrivals_s]
        case ArrivalKind.CONCURRENCY:
            return None
    raise AssertionError(f"unknown arrival kind {config.kind}")
