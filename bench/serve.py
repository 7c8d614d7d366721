"""``scission bench serve``: goodput of a running router under TTFT/TPOT SLOs.

Builds a workload (synthetic lengths or a replayed public trace, with real-text prompts of exact
token counts), sends it to ``--router`` with Poisson / gamma / trace / fixed-concurrency arrivals,
and reports TTFT, TPOT, ITL and E2E percentiles, throughput, SLO attainment and goodput. With
``--sweep-rates`` or ``--goodput-search`` it runs once per rate and reports the highest rate whose
attainment reaches ``--attainment-target``. Writes ``bench_serve_<label>.json`` and PNG plots to
``--output-dir`` and prints a summary table on stdout.

Also runnable as ``python -m scission.bench.serve``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.cli_main import bench_main
from scission.bench.loadgen import LoadGenConfig
from scission.bench.metrics import GoodputResult, SloConfig
from scission.bench.plots import plot_attainment_vs_rate, plot_latency_cdfs
from scission.bench.prompts import PromptBuilder, load_tokenizer
from scission.bench.runner import (
    BenchResult,
    format_table,
    run_against,
    run_goodput_search,
    run_rate_sweep,
    write_results,
)
from scission.bench.serve_args import add_arguments
from scission.bench.traces import TraceScaling
from scission.bench.workload import (
    LengthConfig,
    LengthDist,
    Workload,
    WorkloadConfig,
    WorkloadKind,
    build_workload,
)

logger = logging.getLogger(__name__)


def _length(args: argparse.Namespace, name: str) -> LengthConfig:
    return LengthConfig(
        mean_tokens=getattr(args, f"{name}_len"),
        dist=LengthDist(getattr(args, f"{name}_len_dist")),
        spread_tokens=getattr(args, f"{name}_len_spread"),
    )


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    kind = WorkloadKind(args.workload)
    num_requests = args.num_requests or None
    if num_requests is None and kind is WorkloadKind.SYNTHETIC:
        raise ValueError("--num-requests 0 (all rows) applies to traces only")
    return WorkloadConfig(
        kind=kind,
        num_requests=num_requests,
        input_len=_length(args, "input"),
        output_len=_length(args, "output"),
        scaling=TraceScaling(args.max_context_tokens, args.length_scale, args.time_scale),
        trace_dir=args.trace_dir,
        seed=args.seed,
    )


def arrival_config(args: argparse.Namespace) -> ArrivalConfig:
    kind = args.arrival or ("poisson" if args.workload == "synthetic" else "trace")
    return ArrivalConfig(
        kind=ArrivalKind(kind),
        rate_rps=args.rate,
        burstiness=args.burstiness,
        concurrency=args.concurrency,
        seed=args.seed,
    )


@dataclass(frozen=True)
class ServeConfig:
    """Everything one ``bench serve`` invocation runs, assembled from the command line."""

    router: str
    label: str
    workload: WorkloadConfig
    arrival: ArrivalConfig
    slo: SloConfig
    loadgen: LoadGenConfig
    attainment_target: float = 0.9
    sweep_rates_rps: tuple[float, ...] = ()
    goodput_search_rps: tuple[float, float] | None = None
    search_tolerance_rps: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.attainment_target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.attainment_target}")
        if self.search_tolerance_rps <= 0:
            raise ValueError(f"search tolerance must be > 0, got {self.search_tolerance_rps}")
        rate_based = self.arrival.kind in (ArrivalKind.POISSON, ArrivalKind.GAMMA)
        if (self.sweep_rates_rps or self.goodput_search_rps) and not rate_based:
            raise ValueError("--sweep-rates/--goodput-search need --arrival poisson or gamma")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Build and validate the run's configuration; raises ValueError on bad options."""
    arrival = arrival_config(args)
    label = args.label or f"{args.workload}-{arrival.kind.value}"
    return ServeConfig(
        router=args.router,
        label=re.sub(r"[^A-Za-z0-9_.-]+", "_", label),
        workload=workload_config(args),
        arrival=arrival,
        slo=SloConfig(args.ttft_slo_ms, args.tpot_slo_ms),
        loadgen=LoadGenConfig(
            request_timeout_s=args.request_timeout_s,
            max_duration_s=args.max_duration_s,
            connect_timeout_s=args.connect_timeout_s,
            show_progress=not args.no_progress,
        ),
        attainment_target=args.attainment_target,
        sweep_rates_rps=tuple(args.sweep_rates or ()),
        goodput_search_rps=args.goodput_search,
        search_tolerance_rps=args.search_tolerance_rps,
    )


def _execute(
    config: ServeConfig, workload: Workload
) -> tuple[list[BenchResult], GoodputResult | None]:
    c = config
    common = dict(target=c.attainment_target, loadgen=c.loadgen, label=c.label)
    if c.sweep_rates_rps:
        return run_rate_sweep(c.router, workload, c.arrival, c.slo, c.sweep_rates_rps, **common)
    if c.goodput_search_rps:
        lo_rps, hi_rps = c.goodput_search_rps
        return run_goodput_search(
            c.router, workload, c.arrival, c.slo, lo_rps, hi_rps, c.search_tolerance_rps, **common
        )
    return [run_against(c.router, workload, c.arrival, c.slo, c.loadgen, c.label)], None


def _write_outputs(
    args: argparse.Namespace,  # recorded as the JSON's "config": every option as given
    label: str,
    results: list[BenchResult],
    goodput: GoodputResult | None,
) -> None:
    config = {k: v for k, v in vars(args).items() if k != "func"}
    write_results(args.output_dir / f"bench_serve_{label}.json", config, results, goodput)
    if args.no_plots:
        return
    slo_ms = {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms}
    runs = {r.label: r.records for r in results}
    plot_latency_cdfs(runs, args.output_dir / f"bench_serve_{label}_cdf.png", slo_ms)
    if goodput is not None:
        plot_attainment_vs_rate(
            {label: list(goodput.points)},
            args.output_dir / f"bench_serve_{label}_attainment.png",
            goodput.target,
        )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from ``add_arguments``).

    Returns 0 when the benchmark ran (even if requests failed: see the table and JSON), 2 when
    the configuration is invalid or the router is unreachable.
    """
    try:
        config = serve_config(args)
    except ValueError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    builder = PromptBuilder.from_tokenizer(load_tokenizer(args.tokenizer), args.corpus, args.seed)
    workload = build_workload(config.workload, builder, request_id_prefix=config.label)
    try:
        results, goodput = _execute(config, workload)
    except ConnectionError as e:
        logger.error("%s", e)
        return 2
    _write_outputs(args, config.label, results, goodput)
    sys.stdout.write(format_table(results, goodput) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.serve", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
