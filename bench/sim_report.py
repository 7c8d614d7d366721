"""Scoring of simulator runs: per-phase and whole-run goodput, attainment, TTFT/TPOT p90,
changes and oscillations; the markdown tables; the PNG timeline.

A request counts in the phase it *arrived* in. It meets the SLO when it finished, its TTFT is
within ``ttft_slo_ms`` and its TPOT within ``tpot_slo_ms`` (one-token outputs: TTFT only); one
still running when the simulation stops (``tail_s`` after the last arrival) or that no worker
could take misses. Goodput = requests meeting the SLO / phase duration (req/s); attainment =
their fraction of the phase's arrivals; p90s over the phase's finished requests (numpy's linear
interpolation). A *change* is a planner decision other than NONE; an *oscillation* is a change
that reverses (opposite sign for some role) one made at most ``oscillation_window_s`` earlier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scission.bench.sim_cluster import Decision, SimRun
from scission.bench.sim_workload import Phase


def _p90(values: np.ndarray) -> float | None:
    return float(np.percentile(values, 90)) if len(values) else None


def score_window(arrays: dict[str, np.ndarray], mask: np.ndarray, duration_s: float) -> dict:
    met, finished = arrays["met"][mask], arrays["finished"][mask]
    ttft = arrays["ttft_ms"][mask & arrays["finished"]]
    tpot = arrays["tpot_ms"][mask & arrays["finished"] & arrays["multi"]]
    n = int(mask.sum())
    return {"num_requests": n, "num_met": int(met.sum()), "num_unfinished": int(n - finished.sum()),
            "goodput_rps": float(met.sum() / duration_s) if duration_s > 0 else 0.0,
            "attainment": float(met.mean()) if n else None,
            "ttft_p90_ms": _p90(ttft), "tpot_p90_ms": _p90(tpot)}


def request_arrays(run: SimRun, ttft_slo_ms: float, tpot_slo_ms: float) -> dict[str, np.ndarray]:
    reqs = run.requests
    arrival = np.fromiter((r.arrival_s for r in reqs), np.float64, len(reqs))
    first = np.fromiter((r.first_token_s for r in reqs), np.float64, len(reqs))
    finish = np.fromiter((r.finish_s for r in reqs), np.float64, len(reqs))
    output = np.fromiter((r.output_tokens for r in reqs), np.int64, len(reqs))
    finished = finish >= 0
    multi = output > 1
    ttft_ms = (first - arrival) * 1e3
    tpot_ms = np.where(multi, (finish - first) * 1e3 / np.maximum(output - 1, 1), 0.0)
    met = finished & (ttft_ms <= ttft_slo_ms) & (~multi | (tpot_ms <= tpot_slo_ms))
    return {"arrival_s": arrival, "finished": finished, "multi": multi, "ttft_ms": ttft_ms,
            "tpot_ms": tpot_ms, "met": met}


def reversals(decisions: Sequence[Decision], initial: Mapping[str, int],
              window_s: float) -> list[int]:
    """Indices of decisions that reverse one made at most ``window_s`` before."""
    deltas, prev = [], dict(initial)
    for d in decisions:
        roles = set(prev) | set(d.targets)
        deltas.append({r: d.targets.get(r, 0) - prev.get(r, 0) for r in roles})
        prev = dict(d.targets)
    out = []
    for j, dj in enumerate(decisions):
        for i in range(j):
            if dj.at_s - decisions[i].at_s > window_s:
                continue
            if any(deltas[i].get(r, 0) * v < 0 for r, v in deltas[j].items()):
                out.append(j)
                break
    return out


def score_run(run: SimRun, phases: Sequence[Phase], ttft_slo_ms: float, tpot_slo_ms: float,
              initial: Mapping[str, int], oscillation_window_s: float) -> dict:
    """Per phase and overall (``"all"``) scores of one run."""
    arrays = request_arrays(run, ttft_slo_ms, tpot_slo_ms)
    osc = reversals(run.decisions, initial, oscillation_window_s)
    out = {}
    windows = [(p.name, p.start_s, p.end_s) for p in phases]
    windows.append(("all", phases[0].start_s, phases[-1].end_s))
    for name, start, end in windows:
        mask = (arrays["arrival_s"] >= start) & (arrays["arrival_s"] < end)
        row = score_window(arrays, mask, end - start)
        row["num_changes"] = sum(start <= d.at_s < end for d in run.decisions)
        row["num_oscillations"] = sum(start <= run.decisions[j].at_s < end for j in osc)
        out[name] = row
    return out


def hindsight(scores: Mapping[str, dict], statics: Sequence[str], names: Sequence[str]) -> dict:
    """Per window: the best static contender by goodput, and every contender's share of it."""
    out = {}
    for window in names:
        best = max(statics, key=lambda c: scores[c][window]["goodput_rps"])
        best_rps = scores[best][window]["goodput_rps"]
        out[window] = {"best_static": best, "best_static_goodput_rps": best_rps,
                       "vs_best": {c: (s[window]["goodput_rps"] / best_rps if best_rps else None)
                                   for c, s in scores.items()}}
    return out


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_table(scores: Mapping[str, dict], shown: Sequence[str], windows: Sequence[str],
                 best: Mapping[str, dict]) -> str:
    lines = ["| window | contender | goodput req/s | vs best static | attainment | "
             "TTFT p90 ms | TPOT p90 ms | changes | oscillations |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in windows:
        for c in shown:
            s = scores[c][w]
            ratio = best[w]["vs_best"][c]
            lines.append(f"| {w} | {c} | {s['goodput_rps']:.2f} | {fmt(ratio, 2)} | "
                         f"{fmt(s['attainment'], 3)} | {fmt(s['ttft_p90_ms'])} | "
                         f"{fmt(s['tpot_p90_ms'])} | {s['num_changes']} | "
                         f"{s['num_oscillations']} |")
    return "\n".join(lines)


def plot_timeline(runs: Mapping[str, SimRun], planner: str | None, phases: Sequence[Phase],
                  ttft_slo_ms: float, tpot_slo_ms: float, title: str, path) -> None:
    """Pool sizes of the planner run (serving and target per role) and TTFT / TPOT p90 of the
    router window over time for every run in ``runs``, against the SLOs; phases shaded."""
    fig = Figure(figsize=(12, 10), layout="constrained")
    FigureCanvasAgg(fig)
    ax_pool, ax_ttft, ax_tpot = fig.subplots(3, 1, sharex=True)
    for i, p in enumerate(phases):
        for ax in (ax_pool, ax_ttft, ax_tpot):
            if i % 2 == 0:
                ax.axvspan(p.start_s, p.end_s, color="0.93", zorder=0)
    if planner is not None:
        tl = runs[planner].timeline
        t = [row["t_s"] for row in tl]
        for role, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
            ax_pool.step(t, [row[f"{role}_serving"] for row in tl], where="post", color=color,
                         label=f"{planner}: {role} serving")
            ax_pool.step(t, [row[f"{role}_target"] for row in tl], where="post", color=color,
                         linestyle="--", label=f"{planner}: {role} target")
        ax_pool.step(t, [row["live"] for row in tl], where="post", color="0.4", linewidth=0.8,
                     label=f"{planner}: live workers")
        ax_pool.set_ylim(0, max(row["live"] for row in tl) + 1)
    ax_pool.set_ylabel("workers")
    ax_pool.grid(True, alpha=0.3)
    ax_pool.legend(fontsize="small", ncol=3, loc="lower right")
    for name, run in runs.items():
        tl = run.timeline
        t = [row["t_s"] for row in tl]
        ax_ttft.plot(t, [row["ttft_p90_ms"] / 1e3 for row in tl], label=name)
        ax_tpot.plot(t, [row["tpot_p90_ms"] for row in tl], label=name)
    ax_ttft.axhline(ttft_slo_ms / 1e3, color="red", linestyle="--", label="SLO")
    ax_tpot.axhline(tpot_slo_ms, color="red", linestyle="--", label="SLO")
    ax_ttft.set_ylabel("TTFT p90 (s, router window)")
    ax_tpot.set_ylabel("TPOT p90 (ms, router window)")
    ax_ttft.set_yscale("log")
    ax_tpot.set_yscale("log")
    ax_tpot.set_xlabel("simulated time (s); shaded = even phases")
    for ax in (ax_ttft, ax_tpot):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
