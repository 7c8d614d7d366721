"""Run a workload against one router address and collect the result; rate sweeps and goodput.

``run_against`` is the hook for drivers that compare clusters: build the ``Workload`` once, then
call ``run_against(address, workload, arrival, slo)`` for each cluster in turn. The same
``ArrivalConfig`` (seeded) gives the same send times, so the clusters see the same load.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from scission.bench.arrivals import ArrivalConfig, ArrivalKind, schedule
from scission.bench.loadgen import LoadGenConfig, run_load
from scission.bench.metrics import (
    BenchSummary,
    GoodputResult,
    RequestRecord,
    SloConfig,
    search_goodput,
    summarize,
    sweep_goodput,
)
from scission.bench.workload import Workload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchResult:
    """One run: what was sent where, every request's record and the aggregates."""

    label: str
    address: str
    workload_name: str
    arrival: ArrivalConfig
    records: tuple[RequestRecord, ...]
    summary: BenchSummary  # includes the SLO used for attainment

    @property
    def offered_rate_rps(self) -> float | None:
        """The configured rate of a Poisson/gamma run; None for trace replay and concurrency."""
        if self.arrival.kind in (ArrivalKind.POISSON, ArrivalKind.GAMMA):
            return self.arrival.rate_rps
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "address": self.address,
            "workload": self.workload_name,
            "arrival": asdict(self.arrival),
            "offered_rate_rps": self.offered_rate_rps,
            "summary": self.summary.to_dict(),
            "records": [r.to_dict() for r in self.records],
        }


async def run_against_async(
    address: str,
    workload: Workload,
    arrival: ArrivalConfig,
    slo: SloConfig,
    loadgen: LoadGenConfig | None = None,
    label: str = "",
) -> BenchResult:
    """Send ``workload`` to the router at ``address`` with ``arrival`` timing; see ``run_against``."""
    loadgen = loadgen or LoadGenConfig()
    label = label or f"{workload.name} {arrival.describe}"
    send_times_s = schedule(arrival, workload.arrivals_s)
    logger.info("run %r: %d requests -> %s", label, len(workload.requests), address)
    result = await run_load(
        address, loadgen, workload.requests, send_times_s, arrival.concurrency, label
    )
    summary = summarize(result.records, result.duration_s, slo, result.num_not_sent)
    return BenchResult(
        label=label,
        address=address,
        workload_name=workload.name,
        arrival=arrival,
        records=result.records,
        summary=summary,
    )


def run_against(
    address: str,
    workload: Workload,
    arrival: ArrivalConfig,
    slo: SloConfig,
    loadgen: LoadGenConfig | None = None,
    label: str = "",
) -> BenchResult:
    """Run ``workload`` against one router and return its records and aggregates.

    Blocking (runs its own event loop; from async code use ``run_against_async``). Sends each
    request as token ids with greedy sampling and ``max_tokens = output_tokens``, ``ignore_eos``.

    Raises:
        ConnectionError: nothing answers at ``address`` within ``loadgen.connect_timeout_s``.
    """
    return asyncio.run(run_against_async(address, workload, arrival, slo, loadgen, label))


def _rate_runner(
    address: str,
    workload: Workload | Callable[[float], Workload],
    arrival: ArrivalConfig,
    slo: SloConfig,
    loadgen: LoadGenConfig | None,
    label: str,
    results: list[BenchResult],
) -> Callable[[float], float]:
    """A ``rate -> attainment`` function that runs a benchmark and keeps its result."""
    if arrival.kind not in (ArrivalKind.POISSON, ArrivalKind.GAMMA):
        raise ValueError(f"rate sweeps need poisson or gamma arrivals, not {arrival.kind.value}")

    def attainment_at(rate_rps: float) -> float:
        run_label = f"{label} @ {rate_rps:g} rps" if label else ""
        rate_arrival = replace(arrival, rate_rps=rate_rps)
        rate_workload = workload if isinstance(workload, Workload) else workload(rate_rps)
        result = run_against(address, rate_workload, rate_arrival, slo, loadgen, run_label)
        results.append(result)
        return result.summary.slo_attainment

    return attainment_at


def run_rate_sweep(
    address: str,
    workload: Workload | Callable[[float], Workload],
    arrival: ArrivalConfig,
    slo: SloConfig,
    rates_rps: Sequence[float],
    target: float = 0.9,
    loadgen: LoadGenConfig | None = None,
    label: str = "",
) -> tuple[list[BenchResult], GoodputResult]:
    """One run per rate (ascending); goodput = highest rate with attainment >= ``target``.

    ``workload`` may be a function of the rate (e.g. other image bytes per rate, so caches
    that outlive a run start each rate cold)."""
    results: list[BenchResult] = []
    run = _rate_runner(address, workload, arrival, slo, loadgen, label, results)
    return results, sweep_goodput(run, rates_rps, target)


def run_goodput_search(
    address: str,
    workload: Workload,
    arrival: ArrivalConfig,
    slo: SloConfig,
    lo_rps: float,
    hi_rps: float,
    tolerance_rps: float,
    target: float = 0.9,
    loadgen: LoadGenConfig | None = None,
    label: str = "",
) -> tuple[list[BenchResult], GoodputResult]:
    """Binary search on the rate (``metrics.search_goodput``); one run per evaluated rate."""
    results: list[BenchResult] = []
    run = _rate_runner(address, workload, arrival, slo, loadgen, label, results)
    return results, search_goodput(run, lo_rps, hi_rps, tolerance_rps, target)


# -- output: JSON file and summary table ---------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: object) -> object:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_results(
    path: Path,
    config: dict[str, object],
    results: Sequence[BenchResult],
    goodput: GoodputResult | None = None,
) -> Path:
    """``{"created_at", "config", "runs": [BenchResult.to_dict()], "goodput"}`` as JSON."""
    document = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "runs": [r.to_dict() for r in results],
        "goodput": asdict(goodput) if goodput is not None else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(document), default=_json_default) + "\n")
    logger.info("wrote %s", path)
    return path


_COLUMNS = (
    "run", "sent", "ok", "fail", "rej", "req/s", "tok/s",
    "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "ITL p50", "p99", "E2E p50", "p99",
    "attain", "good/s",
)  # fmt: skip


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(result: BenchResult) -> list[str]:
    s = result.summary
    return [
        result.label,
        str(s.num_requests),
        str(s.num_succeeded),
        str(s.num_failed),
        str(s.num_rejected),
        f"{s.request_rps:.2f}",
        f"{s.output_tokens_per_s:.1f}",
        *(_ms(v) for v in (s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99)),
        *(_ms(v) for v in (s.tpot_ms.p50, s.tpot_ms.p90, s.tpot_ms.p99)),
        *(_ms(v) for v in (s.itl_ms.p50, s.itl_ms.p99, s.e2e_ms.p50, s.e2e_ms.p99)),
        f"{s.slo_attainment:.3f}",
        f"{s.request_goodput_rps:.2f}",
    ]


def format_table(results: Sequence[BenchResult], goodput: GoodputResult | None = None) -> str:
    """Plain-text summary: one row per run (latencies in ms), then errors and goodput."""
    rows = [list(_COLUMNS), *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        s = r.summary
        if s.error_counts or s.num_not_sent:
            lines.append(f"{r.label}: errors {s.error_counts}, not sent {s.num_not_sent}")
    if results:
        slo = results[0].summary.slo
        lines.append(f"SLO: TTFT <= {slo.ttft_slo_ms:g} ms and TPOT <= {slo.tpot_slo_ms:g} ms")
    if goodput is not None:
        best = "none" if goodput.goodput_rps is None else f"{goodput.goodput_rps:g} rps"
        lines.append(f"goodput (highest rate with attainment >= {goodput.target:g}): {best}")
    return "\n".join(lines)
