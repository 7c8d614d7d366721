"""Summary table and PNG timeline of a soak run (``bench/soak.py``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from scission.bench.metrics import percentile

HUNG = "DEADLINE_EXCEEDED"  # the client deadline: the request hung


def summarize(run) -> dict:
    """Totals, per-minute rows and RSS growth of a ``SoakRun``."""
    reqs = run.requests
    by_status = Counter(r.status for r in reqs)
    minutes: dict[int, list] = {}
    for r in reqs:
        minutes.setdefault(int(r.submit_s // 60), []).append(r)
    rows = []
    for m in sorted(minutes):
        rs = minutes[m]
        ok = [r for r in rs if r.status == "ok"]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
        rows.append({"minute": m, "sent": len(rs), "served": len(ok),
                     "failed": len(rs) - len(ok),
                     "ttft_p90_ms": percentile(ttft, 90) if ttft else None,
                     "tpot_p90_ms": percentile(tpot, 90) if tpot else None})
    rss_growth = {}
    for proc in sorted({s["process"] for s in run.rss}):
        series = [s for s in run.rss if s["process"] == proc]
        if len(series) >= 4:  # first quarter vs last quarter: median RSS, MB
            q = len(series) // 4
            first = sorted(s["rss_mb"] for s in series[:q])[q // 2]
            last = sorted(s["rss_mb"] for s in series[-q:])[q // 2]
            rss_growth[proc] = {"first_mb": first, "last_mb": last, "growth_mb": last - first}
    leaked = sum(v["num_blocks"] - v["num_free_blocks"] + v["num_held"]
                 for v in run.blocks_end.values())
    n = len(reqs)
    summary = {
        "requests": n, "served": by_status.get("ok", 0), "hung": by_status.get(HUNG, 0),
        "failed": n - by_status.get("ok", 0), "failed_by_status": {
            k: v for k, v in by_status.items() if k != "ok"},
        "failed_fraction": (n - by_status.get("ok", 0)) / n if n else 0.0,
        "faults": len(run.faults), "blocks_leaked": leaked, "per_minute": rows,
        "rss_growth": rss_growth,
    }
    summary["table"] = _table(summary)
    return summary


def _table(s: dict) -> str:
    lines = [f"requests {s['requests']}: served {s['served']}, failed {s['failed']} "
             f"({100 * s['failed_fraction']:.1f} %: {s['failed_by_status']}), hung {s['hung']}, "
             f"faults {s['faults']}, blocks leaked {s['blocks_leaked']}",
             "minute  sent  served  failed  TTFT p90 ms  TPOT p90 ms"]
    for r in s["per_minute"]:
        ttft = "-" if r["ttft_p90_ms"] is None else f"{r['ttft_p90_ms']:.0f}"
        tpot = "-" if r["tpot_p90_ms"] is None else f"{r['tpot_p90_ms']:.1f}"
        lines.append(f"{r['minute']:>6}  {r['sent']:>4}  {r['served']:>6}  {r['failed']:>6}  "
                     f"{ttft:>11}  {tpot:>11}")
    for proc, g in s["rss_growth"].items():
        lines.append(f"RSS {proc}: {g['first_mb']:.0f} -> {g['last_mb']:.0f} MB "
                     f"({g['growth_mb']:+.0f})")
    return "\n".join(lines)


def plot_timeline(run, summary: dict, path: Path) -> None:
    """Three panels over time: p90 TTFT/TPOT per minute, requests per minute (served /
    failed), RSS per process; a vertical line per fault."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    rows = summary["per_minute"]
    mins = [r["minute"] * 60 + 30 for r in rows]
    ax1.plot(mins, [r["ttft_p90_ms"] for r in rows], "o-", label="TTFT p90 (ms)")
    ax1b = ax1.twinx()
    ax1b.plot(mins, [r["tpot_p90_ms"] for r in rows], "s--", color="tab:orange",
              label="TPOT p90 (ms)")
    ax1.set_ylabel("TTFT p90 ms")
    ax1b.set_ylabel("TPOT p90 ms")
    ax1.legend(loc="upper left")
    ax1b.legend(loc="upper right")
    ax2.bar(mins, [r["served"] for r in rows], width=50, label="served")
    ax2.bar(mins, [r["failed"] for r in rows], width=50, bottom=[r["served"] for r in rows],
            color="tab:red", label="failed")
    ax2.set_ylabel("requests / minute")
    ax2.legend(loc="upper left")
    for proc in sorted({s["process"] for s in run.rss}):
        series = [s for s in run.rss if s["process"] == proc]
        ax3.plot([s["t_s"] for s in series], [s["rss_mb"] for s in series], label=proc)
    ax3.set_ylabel("RSS MB")
    ax3.set_xlabel("seconds since the load started")
    ax3.legend(loc="upper left", fontsize=7, ncol=3)
    for ax in (ax1, ax2, ax3):
        for f in run.faults:
            ax.axvline(f["t_s"], color="grey", linestyle=":", linewidth=1)
    for f in run.faults:
        ax1.annotate(f["kind"], (f["t_s"], 1.0), xycoords=("data", "axes fraction"),
                     rotation=90, fontsize=7, va="top")
    fig.suptitle(f"soak: {summary['requests']} requests, {summary['failed']} failed, "
                 f"{summary['hung']} hung, {summary['blocks_leaked']} blocks leaked")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
