"""Cluster simulator at scale: static P:D ratios vs colocated vs the planner, same budget.

``python -m scission.bench.simulator --workers 32 --rate 7 --trace shifting --duration-s 1200``

Discrete events on a simulated clock (``sim_cluster.py``); worker step times from the
``PerformanceModel`` fitted on the real engine (``bench/perf_fit.py``; ``sim_workers.py``);
placement by the real ``Placer``; the real ``PlannerCore`` every ``--interval-s`` with the
router's real ``SloTracker`` window; a simulated controller with model-load and flip delays
(``sim_controller.py``). Workloads: the shifting synthetic one (prefill-heavy ↔ decode-heavy
every ``--phase-s``) or a public trace replayed at ``--rate`` (``sim_workload.py``).

Contenders, each on the same requests with the same budget of ``--workers`` workers:

- ``static P:D`` for the prefill counts of ``--static`` (``all`` = 1..N-1: DistServe's sweep;
  ``step:K`` = every K-th, then each window's best ±K/2 and ±K/4);
- ``colocated``: N colocated workers;
- ``planner``: starts at ``--planner-start`` prefill workers (default N/2), decides every tick.

The statics also run on each phase alone (``--isolated``; ``sim_sweep.py``): the per-phase
optimum. Contenders, sweep and scoring live in ``sim_sweep.py``.

Writes the scores per phase and overall (``sim_report.py``), the planner's decisions with their
reasons and every run's timeline as JSON (``--output``), and a PNG timeline (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from scission.bench.cli_main import bench_main, report
from scission.bench.sim_cluster import SimConfig
from scission.bench.sim_report import plot_timeline
from scission.bench.sim_sweep import PLANNER, run_contenders, scaled, summarize
from scission.bench.traces import TraceKind
from scission.cluster.planner.perf_model import PerformanceModel

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
PERF_MODEL = RESULTS / "perf_model_smollm2_cpu.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimConfig()
    traces = ["shifting"] + [k.value for k in TraceKind]
    parser.add_argument("--workers", type=int, default=32, help="worker budget")
    parser.add_argument("--rate", type=float, default=7.0, help="mean arrivals, req/s")
    parser.add_argument("--trace", choices=traces, default="shifting")
    parser.add_argument("--duration-s", type=float, default=1200.0)
    parser.add_argument("--phase-s", type=float, default=300.0)
    parser.add_argument("--length-scale", type=float, default=0.25, help="traces only")
    parser.add_argument("--max-context-tokens", type=int, default=8192)
    parser.add_argument("--ttft-slo-ms", type=float, default=d.ttft_slo_ms)
    parser.add_argument("--tpot-slo-ms", type=float, default=d.tpot_slo_ms)
    parser.add_argument("--perf-model", type=Path, default=PERF_MODEL)
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="divide every step time by this (faster workers)")
    parser.add_argument("--static", default="all", help="all | step:K | P1,P2,...")
    parser.add_argument("--contenders", default="static,colocated,planner")
    parser.add_argument("--isolated", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the statics on each phase alone (per-phase optimum)")
    parser.add_argument("--planner-start", type=int, default=None)
    parser.add_argument("--interval-s", type=float, default=d.interval_s)
    parser.add_argument("--slo-window-s", type=float, default=d.slo_window_s)
    parser.add_argument("--shape-window-s", type=float, default=d.shape_window_s,
                        help="the router's load-shape window (arrivals)")
    parser.add_argument("--max-tokens-known", action=argparse.BooleanOptionalAction,
                        default=d.max_tokens_known,
                        help="requests carry max_tokens = their output length (loadgen)")
    parser.add_argument("--start-delay-s", type=float, default=d.start_delay_s)
    parser.add_argument("--flip-delay-s", type=float, default=d.flip_delay_s)
    parser.add_argument("--kv-transfer-ms", type=float, default=d.kv_transfer_s * 1e3)
    parser.add_argument("--decode-load", choices=("placed", "pulled"), default=d.decode_load,
                        help="when a request counts on its decode worker for placement")
    parser.add_argument("--oscillation-intervals", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    perf = json.loads(args.perf_model.read_text())
    model = scaled(PerformanceModel.from_dict(perf.get("model", perf)), args.speedup)
    sweep = run_contenders(args, model)
    summary, table, shown = summarize(sweep)
    stem = f"simulator_{args.trace}_{args.workers}w"
    output = args.output or RESULTS / f"{stem}.json"
    plot = args.plot or output.with_suffix(".png")
    title = (f"{args.trace}, {args.workers} workers, {args.rate:g} req/s; SLO TTFT "
             f"{args.ttft_slo_ms:g} ms, TPOT {args.tpot_slo_ms:g} ms")
    plot_timeline({c: sweep.runs[c] for c in shown}, PLANNER if PLANNER in sweep.runs else None,
                  sweep.phases, args.ttft_slo_ms, args.tpot_slo_ms, title, plot)
    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m scission.bench.simulator " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sim_config": asdict(sweep.cfg), "perf_model": model.to_dict(),
        "workload": sweep.workload.info, "phases": [asdict(p) for p in sweep.phases],
        **summary, "scores": sweep.scores, "scores_isolated": sweep.isolated,
        "runs": {c: {"wall_s": sweep.wall_s[c], "num_events": r.num_events, "end_s": r.end_s,
                     "max_live_workers": r.max_live_workers, "num_migrated": r.num_migrated,
                     "initial": {k.value: v for k, v in sweep.initial[c].items()},
                     "decisions": [asdict(d) for d in r.decisions],
                     "timeline": r.timeline if c in shown else None}  # plotted ones only
                 for c, r in sweep.runs.items()},
        "wall_s": time.perf_counter() - start,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    return report(table + f"\nverdict: {json.dumps(summary['verdict'])}\nplot: {plot}", output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.simulator", __doc__.splitlines()[0],
                      add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
