"""PNG plots of benchmark results (matplotlib's Agg canvas; no pyplot, no global backend state).

- ``plot_latency_cdfs``: empirical CDFs of TTFT, TPOT, ITL and E2E, one line per configuration.
- ``plot_attainment_vs_rate``: SLO attainment against offered rate, one line per configuration,
  with the attainment target as a horizontal line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scission.bench.metrics import RequestRecord

logger = logging.getLogger(__name__)

_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
_TITLES = {
    "ttft_ms": "TTFT (ms)",
    "tpot_ms": "TPOT (ms)",
    "itl_ms": "ITL (ms)",
    "e2e_ms": "E2E (ms)",
}


def metric_values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """Samples of one metric over the succeeded records (ITL: every gap of every request)."""
    ok = [r for r in records if r.succeeded]
    if metric == "itl_ms":
        return [gap for r in ok for gap in r.itl_ms]
    values = (getattr(r, metric) for r in ok)  # metric is one of _METRICS (properties)
    return [v for v in values if v is not None]


def plot_latency_cdfs(
    runs: Mapping[str, Sequence[RequestRecord]],
    path: Path,
    slo_ms: Mapping[str, float] | None = None,
) -> Path:
    """2x2 CDFs (TTFT, TPOT, ITL, E2E) of each run's succeeded requests; ``slo_ms`` draws a
    vertical line per metric (keys ``ttft_ms``/``tpot_ms``). Returns ``path``."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, metric in zip(axes, _METRICS, strict=True):
        for label, records in runs.items():
            values = np.sort(np.asarray(metric_values(records, metric), dtype=np.float64))
            if len(values) == 0:
                continue
            fraction = np.arange(1, len(values) + 1) / len(values)
            ax.step(values, fraction, where="post", label=f"{label} (n={len(values)})")
        if slo_ms and metric in slo_ms:
            ax.axvline(slo_ms[metric], color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(_TITLES[metric])
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.01)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle("Latency CDFs")
    return _save(fig, path)


def plot_attainment_vs_rate(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    target: float | None = None,
) -> Path:
    """SLO attainment (0..1) against offered rate (rps) per configuration. Returns ``path``."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, points in curves.items():
        ordered = sorted(points)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", label=label)
    if target is not None:
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    logger.info("wrote %s", path)
    return path
