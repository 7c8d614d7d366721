"""Per-request serving metrics and their aggregates (pure: no I/O, no clocks).

Definitions (DESIGN.md "Measurement"), all measured on the client:

- TTFT: request sent -> first chunk that carries a token.
- E2E: request sent -> end of the stream (the last chunk received).
- TPOT: ``(E2E - TTFT) / (output_tokens - 1)``; undefined for outputs of fewer than 2 tokens,
  which are left out of TPOT aggregates (and meet the TPOT objective vacuously).
- ITL: every gap between consecutive token-carrying chunks, one value per gap. A chunk may carry
  several tokens; the gap is then not divided among them (as vLLM's ITL).

Percentiles use linear interpolation between closest ranks (numpy's default ``method="linear"``):
for sorted values ``v[0..n-1]`` the q-th percentile is at fractional index ``(n - 1) * q / 100``.

A request meets the SLO iff it succeeded AND ``ttft_ms <= ttft_slo_ms`` AND ``tpot_ms <=
tpot_slo_ms``. Failed requests (any gRPC error, an error/abort finish reason, an incomplete stream,
or cut off by the benchmark's duration bound) count as misses.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Status codes that mean "the server refused to admit the request" when they arrive before the
# first token; such failures are also reported as `num_rejected` (a subset of `num_failed`).
REJECT_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})
# Error code recorded for a request still in flight when the benchmark's duration bound expires.
BENCH_DEADLINE = "BENCH_DEADLINE"
_DERIVED = frozenset({"ttft_ms", "tpot_ms", "e2e_ms"})  # in RequestRecord.to_dict, not fields


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the client observed for one request. Times are seconds since the benchmark start.

    ``chunk_times_s[i]`` is the arrival time of the i-th token-carrying chunk and
    ``chunk_tokens[i]`` its number of tokens. ``error`` is None on success, else a gRPC status code
    name (``"RESOURCE_EXHAUSTED"``), ``"FINISH_REASON_ERROR"``/``"FINISH_REASON_ABORT"``,
    ``"INCOMPLETE"`` (stream ended without a finish reason) or ``BENCH_DEADLINE``.
    """

    request_id: str
    prompt_tokens: int
    output_tokens: int  # tokens received
    start_s: float
    chunk_times_s: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    end_s: float | None = None  # stream end (last message or error)
    error: str | None = None
    error_detail: str = ""
    scheduled_s: float | None = None  # intended send time (None in concurrency mode)
    requested_output_tokens: int = 0
    finish_reason: str = ""
    cached_tokens: int = 0
    server_ttft_ms: float | None = None  # from Usage (router receive -> first token)
    prefill_worker: str = ""
    decode_worker: str = ""
    images: int = 0  # from Usage: images in the prompt
    cached_images: int = 0  # of those, served from an embedding cache

    def __post_init__(self) -> None:
        assert len(self.chunk_times_s) == len(self.chunk_tokens), "one token count per chunk"
        assert sum(self.chunk_tokens) == self.output_tokens, "output_tokens = sum(chunk_tokens)"

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def rejected(self) -> bool:
        return self.error in REJECT_CODES and not self.chunk_times_s

    @property
    def ttft_ms(self) -> float | None:
        if not self.chunk_times_s:
            return None
        return (self.chunk_times_s[0] - self.start_s) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        if self.end_s is None:
            return None
        return (self.end_s - self.start_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        """(E2E - TTFT) / (output_tokens - 1); None for failed requests and < 2 output tokens."""
        ttft_ms, e2e_ms = self.ttft_ms, self.e2e_ms
        if not self.succeeded or self.output_tokens < 2 or ttft_ms is None or e2e_ms is None:
            return None
        return (e2e_ms - ttft_ms) / (self.output_tokens - 1)

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive token-carrying chunks, in ms (len = num chunks - 1)."""
        times = self.chunk_times_s
        return [(b - a) * 1e3 for a, b in zip(times, times[1:], strict=False)]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of the fields plus the derived ``ttft_ms``, ``tpot_ms``, ``e2e_ms``;
        times are rounded to 1 us to keep large runs' files small."""
        data = asdict(self)
        data["chunk_times_s"] = [round(t, 6) for t in self.chunk_times_s]
        data.update(ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms, e2e_ms=self.e2e_ms)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RequestRecord:
        """Inverse of ``to_dict`` (derived values are recomputed, not read)."""
        data = {k: v for k, v in data.items() if k not in _DERIVED}
        data["chunk_times_s"] = tuple(data.get("chunk_times_s", ()))  # type: ignore[arg-type]
        data["chunk_tokens"] = tuple(data.get("chunk_tokens", ()))  # type: ignore[arg-type]
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SloConfig:
    """Latency objectives; a request meets the SLO when it meets both."""

    ttft_slo_ms: float
    tpot_slo_ms: float

    def __post_init__(self) -> None:
        if self.ttft_slo_ms <= 0 or self.tpot_slo_ms <= 0:
            raise ValueError(f"SLOs must be positive, got {self}")


@dataclass(frozen=True)
class LatencyStats:
    """Aggregate of one latency metric in ms; all None when there are no samples."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))


def latency_stats(values: Sequence[float]) -> LatencyStats:
    if not values:
        return LatencyStats(count=0, mean=None, p50=None, p90=None, p99=None)
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (float(x) for x in np.percentile(array, [50, 90, 99], method="linear"))
    return LatencyStats(count=len(values), mean=float(array.mean()), p50=p50, p90=p90, p99=p99)


def meets_slo(record: RequestRecord, slo: SloConfig) -> bool:
    """Succeeded, TTFT within its objective, and TPOT within its objective (or undefined)."""
    if not record.succeeded or record.ttft_ms is None:
        return False
    tpot_ms = record.tpot_ms
    return record.ttft_ms <= slo.ttft_slo_ms and (tpot_ms is None or tpot_ms <= slo.tpot_slo_ms)


def slo_attainment(records: Sequence[RequestRecord], slo: SloConfig) -> float:
    """Fraction of records that meet the SLO (failed ones count as misses); 0.0 when empty."""
    if not records:
        return 0.0
    return sum(meets_slo(r, slo) for r in records) / len(records)


@dataclass(frozen=True)
class BenchSummary:
    """Aggregates of one benchmark run.

    ``request_rps`` and ``output_tokens_per_s`` count succeeded requests over ``duration_s``;
    ``request_goodput_rps`` counts the requests that met the SLO over ``duration_s``.
    ``num_not_sent`` requests were never sent (duration bound) and are in no other count.
    """

    num_requests: int  # sent (records), = num_succeeded + num_failed
    num_succeeded: int
    num_failed: int
    num_rejected: int  # subset of num_failed: refused before the first token
    num_not_sent: int
    error_counts: dict[str, int]
    duration_s: float
    request_rps: float
    output_tokens_per_s: float
    total_output_tokens: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo: SloConfig
    slo_attainment: float
    request_goodput_rps: float
    cached_tokens: int = 0
    images: int = 0  # in the succeeded requests' prompts
    cached_images: int = 0  # of those, served from an embedding cache

    @property
    def image_cache_hit_rate(self) -> float | None:
        """``cached_images / images`` of the succeeded requests; None without images."""
        return self.cached_images / self.images if self.images else None

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "image_cache_hit_rate": self.image_cache_hit_rate}


def _values(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: SloConfig,
    num_not_sent: int = 0,
) -> BenchSummary:
    """Aggregate ``records`` of a run that lasted ``duration_s`` seconds."""
    assert duration_s >= 0, f"negative duration {duration_s}"
    ok = [r for r in records if r.succeeded]
    failed = [r for r in records if not r.succeeded]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    num_good = sum(meets_slo(r, slo) for r in records)
    return BenchSummary(
        num_requests=len(records),
        num_succeeded=len(ok),
        num_failed=len(failed),
        num_rejected=sum(r.rejected for r in failed),
        num_not_sent=num_not_sent,
        error_counts=dict(sorted(Counter(str(r.error) for r in failed).items())),
        duration_s=duration_s,
        request_rps=len(ok) * per_s,
        output_tokens_per_s=output_tokens * per_s,
        total_output_tokens=output_tokens,
        ttft_ms=latency_stats(_values(r.ttft_ms for r in ok)),
        tpot_ms=latency_stats(_values(r.tpot_ms for r in ok)),
        itl_ms=latency_stats([gap for r in ok for gap in r.itl_ms]),
        e2e_ms=latency_stats(_values(r.e2e_ms for r in ok)),
        slo=slo,
        slo_attainment=num_good / len(records) if records else 0.0,
        request_goodput_rps=num_good * per_s,
        cached_tokens=sum(r.cached_tokens for r in ok),
        images=sum(r.images for r in ok),
        cached_images=sum(r.cached_images for r in ok),
    )


# -- goodput: the highest offered rate whose SLO attainment reaches the target ------------------


@dataclass(frozen=True)
class GoodputResult:
    """``goodput_rps`` is the highest evaluated rate with attainment >= ``target`` (None if none).

    ``points`` lists every evaluated ``(rate_rps, attainment)`` in evaluation order.
    """

    goodput_rps: float | None
    target: float
    points: tuple[tuple[float, float], ...]


def sweep_goodput(
    attainment_at: Callable[[float], float],
    rates_rps: Sequence[float],
    target: float = 0.9,
) -> GoodputResult:
    """Evaluate every rate (ascending) and return the highest one whose attainment >= target.

    No monotonicity is assumed: a passing rate above a failing one still counts.
    """
    _check_target(target)
    points = tuple((rate, attainment_at(rate)) for rate in sorted(rates_rps))
    passing = [rate for rate, attainment in points if attainment >= target]
    return GoodputResult(goodput_rps=max(passing, default=None), target=target, points=points)


def search_goodput(
    attainment_at: Callable[[float], float],
    lo_rps: float,
    hi_rps: float,
    tolerance_rps: float,
    target: float = 0.9,
) -> GoodputResult:
    """Binary search for the highest rate in [lo, hi] with attainment >= target.

    Assumes attainment is non-increasing in the rate. Evaluates ``lo`` (None if it fails), then
    ``hi`` (returned if it passes), then bisects the failing/passing bracket until it is no wider
    than ``tolerance_rps``; returns the bracket's passing end (a lower bound within tolerance).
    """
    _check_target(target)
    if not 0 < lo_rps < hi_rps or tolerance_rps <= 0:
        raise ValueError(
            f"need 0 < lo < hi and tolerance > 0, got {lo_rps}, {hi_rps}, {tolerance_rps}"
        )
    points: list[tuple[float, float]] = []

    def passes(rate: float) -> bool:
        attainment = attainment_at(rate)
        points.append((rate, attainment))
        logger.info("goodput search: rate %.4g rps -> attainment %.3f", rate, attainment)
        return attainment >= target

    if not passes(lo_rps):
        return GoodputResult(goodput_rps=None, target=target, points=tuple(points))
    if passes(hi_rps):
        return GoodputResult(goodput_rps=hi_rps, target=target, points=tuple(points))
    good, bad = lo_rps, hi_rps
    while bad - good > tolerance_rps:
        mid = (good + bad) / 2
        if passes(mid):
            good = mid
        else:
            bad = mid
    return GoodputResult(goodput_rps=good, target=target, points=tuple(points))


def _check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise ValueError(f"attainment target must be in (0, 1], got {target}")
