"""Tables and summaries of the image benchmark (pure: no I/O).

A run is named by its load: ``"0.3 rps"`` for a Poisson run, ``"6 in flight"`` for the
closed-loop (saturation) run. Ratios are ``deployment / baseline`` (the first deployment):
below 1 favours the deployment for latencies, above 1 for throughputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from scission.bench.images_workload import ImagePlan
from scission.bench.runner import BenchResult
from scission.bench.side_by_side_report import DeploymentRuns, ratio
from scission.bench.workload import Workload

_HEADER = ("load", "deployment", "ok/sent", "TTFT p50", "TTFT p90", "TPOT p50", "req/s",
           "out tok/s", "images", "hit rate")


def run_key(result: BenchResult) -> str:
    """``"0.3 rps"`` (Poisson/gamma) or ``"6 in flight"`` (closed loop)."""
    if result.offered_rate_rps is not None:
        return f"{result.offered_rate_rps:g} rps"
    return f"{result.arrival.concurrency} in flight"


def run_metrics(result: BenchResult) -> dict[str, float | None]:
    """The compared numbers of one run: TTFT p50/p90, TPOT p50 (ms), req/s, output tok/s,
    embedding-cache hit rate (``cached_images / images`` of the succeeded requests)."""
    s = result.summary
    return {"ttft_p50_ms": s.ttft_ms.p50, "ttft_p90_ms": s.ttft_ms.p90,
            "tpot_p50_ms": s.tpot_ms.p50, "request_rps": s.request_rps,
            "output_tokens_per_s": s.output_tokens_per_s,
            "image_cache_hit_rate": s.image_cache_hit_rate}


def metric_ratios(value: Mapping[str, float | None],
                  baseline: Mapping[str, float | None]) -> dict[str, float | None]:
    """``value / baseline`` per metric, hit rate left out (compare it with the best)."""
    return {k: ratio(value[k], baseline[k]) for k in baseline if k != "image_cache_hit_rate"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(key: str, label: str, r: BenchResult) -> list[str]:
    s, m = r.summary, run_metrics(r)
    return [key, label, f"{s.num_succeeded}/{s.num_requests}", _fmt(m["ttft_p50_ms"], ".0f"),
            _fmt(m["ttft_p90_ms"], ".0f"), _fmt(m["tpot_p50_ms"], ".0f"),
            _fmt(m["request_rps"], ".3f"), _fmt(m["output_tokens_per_s"], ".1f"),
            f"{s.cached_images}/{s.images}", _fmt(m["image_cache_hit_rate"], ".2f")]


def table_rows(deployments: Sequence[DeploymentRuns]) -> list[list[str]]:
    """Per run of the baseline (in its order): a row per deployment, then a ratio row per
    non-baseline deployment."""
    base = deployments[0]
    rows = []
    for b in base.runs:
        key = run_key(b)
        for dep in deployments:
            r = next((x for x in dep.runs if run_key(x) == key), None)
            if r is None:
                continue
            rows.append(_row(key, dep.label, r))
            if dep is not base:
                q = metric_ratios(run_metrics(r), run_metrics(b))
                rows.append(["", f"{dep.label}/{base.label}", "",
                             *(_fmt(v, ".2f") + "x" if v is not None else "-"
                               for v in q.values()), "", ""])
    return rows


def format_table(deployments: Sequence[DeploymentRuns], best_hit_rate: float) -> str:
    """The plain-text table (latencies in ms), the failures, and the best possible hit rate."""
    rows = [list(_HEADER), *table_rows(deployments)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for dep in deployments:
        for r in dep.runs:
            s = r.summary
            if s.num_failed or s.num_not_sent:
                lines.append(f"{dep.label} {run_key(r)}: errors {s.error_counts}, "
                             f"not sent {s.num_not_sent}")
    lines.append(f"best possible hit rate (repeated image occurrences): {best_hit_rate:.2f}")
    return "\n".join(lines)


def plan_summary(plan: ImagePlan, workloads: Mapping[float, Workload]) -> dict[str, object]:
    """What the plan holds: requests per image count, distinct images and occurrences, the
    best hit rate, and the bytes of one run's images (the runs differ in pixels only)."""
    one = next(iter(workloads.values()))
    distinct = {id(im.data): im for r in one.requests for im in r.images}.values()
    sizes_kib = sorted(len(im.data) / 1024 for im in distinct)
    return {
        "num_requests": len(plan.requests),
        "requests_by_image_count": dict(sorted(Counter(len(r) for r in plan.requests).items())),
        "distinct_images": len(plan.images),
        "image_occurrences": plan.num_occurrences,
        "best_hit_rate": plan.repeat_share,
        "formats": dict(Counter(s.fmt for s in plan.images)),
        "sizes_px": dict(Counter(f"{s.width}x{s.height}" for s in plan.images)),
        "image_kib": {"min": sizes_kib[0], "median": sizes_kib[len(sizes_kib) // 2],
                      "max": sizes_kib[-1]},
        "request_image_mib_max": max(sum(len(im.data) for im in r.images)
                                     for r in one.requests) / 2**20,
    }
