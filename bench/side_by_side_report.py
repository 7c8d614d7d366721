"""Arithmetic and output of the side-by-side benchmark (pure except ``write_json``/``write_plots``).

Ratios compare each deployment with the first one (the baseline, colocated): ``other / baseline``,
so a latency ratio below 1 and a goodput ratio above 1 favour ``other``. A ratio is None when either
side is missing (no samples, or no passing rate) or the baseline is not > 0.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from scission.bench.metrics import GoodputResult, latency_stats
from scission.bench.plots import metric_values, plot_attainment_vs_rate, plot_latency_cdfs
from scission.bench.runner import BenchResult

logger = logging.getLogger(__name__)

# (metric, percentile) pairs compared between deployments; keys like "ttft_p50".
LATENCY_KEYS = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"))


@dataclass(frozen=True)
class DeploymentRuns:
    """One deployment's rate sweep: its runs (ascending rate) and goodput."""

    label: str
    runs: tuple[BenchResult, ...]
    goodput: GoodputResult


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is None or the baseline is not > 0."""
    if value is None or baseline is None or not baseline > 0:
        return None
    return value / baseline


def key_name(metric: str, quantile: str) -> str:
    return f"{metric.removesuffix('_ms')}_{quantile}"


def run_latencies(result: BenchResult) -> dict[str, float | None]:
    """``{"ttft_p50": ms, ...}`` of one run (its summary's percentiles)."""
    s = result.summary
    return {key_name(m, q): getattr(getattr(s, m), q) for m, q in LATENCY_KEYS}


def pooled_latencies(runs: Sequence[BenchResult]) -> dict[str, float | None]:
    """Percentiles over the succeeded requests of all ``runs`` together (every rate pooled)."""
    out: dict[str, float | None] = {}
    for metric in dict.fromkeys(m for m, _ in LATENCY_KEYS):
        stats = latency_stats([v for r in runs for v in metric_values(r.records, metric)])
        for m, q in LATENCY_KEYS:
            if m == metric:
                out[key_name(m, q)] = getattr(stats, q)
    return out


def latency_ratios(
    value: Mapping[str, float | None], baseline: Mapping[str, float | None]
) -> dict[str, float | None]:
    return {k: ratio(value.get(k), baseline.get(k)) for k in baseline}


def runs_by_rate(runs: Sequence[BenchResult]) -> dict[float, BenchResult]:
    """Offered rate -> run (rate-based runs only; a repeated rate keeps the last run)."""
    return {r.offered_rate_rps: r for r in runs if r.offered_rate_rps is not None}


def compare(baseline: DeploymentRuns, other: DeploymentRuns) -> dict[str, object]:
    """``other`` vs ``baseline``: goodput ratio, pooled latency ratios, and per-rate latency
    ratios and attainments for the rates both ran."""
    base_rates, other_rates = runs_by_rate(baseline.runs), runs_by_rate(other.runs)
    per_rate = []
    for rate in sorted(set(base_rates) & set(other_rates)):
        b, o = base_rates[rate], other_rates[rate]
        per_rate.append(
            {
                "rate_rps": rate,
                "attainment": {
                    baseline.label: b.summary.slo_attainment,
                    other.label: o.summary.slo_attainment,
                },
                "latency_ratios": latency_ratios(run_latencies(o), run_latencies(b)),
            }
        )
    return {
        "baseline": baseline.label,
        "other": other.label,
        "goodput_rps": {
            baseline.label: baseline.goodput.goodput_rps,
            other.label: other.goodput.goodput_rps,
        },
        "goodput_ratio": ratio(other.goodput.goodput_rps, baseline.goodput.goodput_rps),
        "pooled_latency_ratios": latency_ratios(
            pooled_latencies(other.runs), pooled_latencies(baseline.runs)
        ),
        "per_rate": per_rate,
    }


# -- table ----------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rps(value: float | None) -> str:
    return "none" if value is None else f"{value:g} rps"


_HEADER = (
    "rate rps", "config", "ok", "attain", "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90",
    "out tok/s",
)  # fmt: skip


def _table_rows(deployments: Sequence[DeploymentRuns]) -> list[list[str]]:
    """Per rate of the baseline: one row per deployment, then its ratio row vs the baseline."""
    rows = []
    base = deployments[0]
    for rate, b in sorted(runs_by_rate(base.runs).items()):
        for dep in deployments:
            r = runs_by_rate(dep.runs).get(rate)
            if r is None:
                continue
            s, lat = r.summary, run_latencies(r)
            rows.append([
                f"{rate:g}", dep.label, f"{s.num_succeeded}/{s.num_requests}",
                f"{s.slo_attainment:.2f}", *(_ms(v) for v in lat.values()),
                f"{s.output_tokens_per_s:.1f}",
            ])  # fmt: skip
            if dep is not base:
                ratios = latency_ratios(lat, run_latencies(b))
                label = f"{dep.label}/{base.label}"
                rows.append(["", label, "", "", *(_x(v) for v in ratios.values()), ""])
    return rows


def format_table(deployments: Sequence[DeploymentRuns]) -> str:
    """Per rate: each deployment's attainment and latencies (ms), then the ratio row
    ``other/baseline``; then goodput and pooled ratios."""
    rows = [list(_HEADER), *_table_rows(deployments)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = deployments[0]
    if base.runs:
        slo = base.runs[0].summary.slo
        lines.append(
            f"SLO: TTFT <= {slo.ttft_slo_ms:g} ms and TPOT <= {slo.tpot_slo_ms:g} ms; "
            f"goodput = highest rate with attainment >= {base.goodput.target:g}"
        )
    for dep in deployments:
        lines.append(f"goodput {dep.label}: {_rps(dep.goodput.goodput_rps)}")
    for dep in deployments[1:]:
        c = compare(base, dep)
        pooled = ", ".join(f"{k} {_x(v)}" for k, v in c["pooled_latency_ratios"].items())
        lines.append(
            f"{dep.label}/{base.label}: goodput {_x(c['goodput_ratio'])}; "
            f"all rates pooled: {pooled}"
        )
    return "\n".join(lines)


# -- files ----------------------------------------------------------------------------------------


def _jsonable(value: object) -> object:
    """Enums by value, paths as strings, NaN/inf as null, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(
    path: Path, header: dict[str, object], deployments: Sequence[DeploymentRuns]
) -> Path:
    """``header`` (command, machine, config) + each deployment's runs and goodput + the
    comparisons of every deployment with the first."""
    doc = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **header,
        "deployments": {
            d.label: {"goodput": asdict(d.goodput), "runs": [r.to_dict() for r in d.runs]}
            for d in deployments
        },
        "comparisons": [compare(deployments[0], d) for d in deployments[1:]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(doc)) + "\n")
    logger.info("wrote %s", path)
    return path


def write_plots(
    prefix: Path, deployments: Sequence[DeploymentRuns], slo_ms: Mapping[str, float]
) -> list[Path]:
    """``<prefix>_attainment.png`` (attainment vs rate, one line per deployment) and one
    ``<prefix>_cdf_<rate>rps.png`` per rate (latency CDFs of every deployment at that rate)."""
    paths = [
        plot_attainment_vs_rate(
            {d.label: list(d.goodput.points) for d in deployments},
            prefix.with_name(prefix.name + "_attainment.png"),
            deployments[0].goodput.target,
        )
    ]
    for rate in sorted(runs_by_rate(deployments[0].runs)):
        runs = {
            d.label: runs_by_rate(d.runs)[rate].records
            for d in deployments
            if rate in runs_by_rate(d.runs)
        }
        name = f"{prefix.name}_cdf_{rate:g}rps.png"
        paths.append(plot_latency_cdfs(runs, prefix.with_name(name), slo_ms))
    return paths
