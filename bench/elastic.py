"""``scission bench elastic``: the planner against static pool splits on a shifting workload.

Each contender in turn gets its own ``LocalCluster`` with the same budget (``--max-workers``
workers of ``--threads-per-worker`` torch threads, no pinning) and the same seeded requests:
``--phases`` of prefill-heavy (long prompts, short outputs) or decode-heavy (short prompts, long
outputs) requests, each phase a Poisson process at its own rate. Contenders: ``static-<P>p<D>d``
and ``colocated-<N>`` (planner off), ``planner-<P>p<D>d`` (starts at P + D, planner ``auto``).
Per contender: warm-up, ``--settle-s`` of silence (the router's SLO window empties), the phases
while ``ElasticPoller`` samples pools and SLO window every second, then the planner's decisions.
Scores, table and plot: ``elastic_report.py``. ``--merge`` adds the contenders run now to an
existing result of the same workload. Also ``python -m scission.bench.elastic``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.elastic_report import (
    PhaseShapes,
    PhaseSpec,
    build_phase_workload,
    contender_entry,
    phase_schedule,
)
from scission.bench.loadgen import LoadGenConfig
from scission.bench.metrics import SloConfig
from scission.bench.prompts import PromptBuilder
from scission.bench.workload import LengthConfig, LengthDist, Workload, WorkloadRequest
from scission.cluster.planner.core import PlannerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContenderSpec:
    """A pool layout, static or the planner's starting point."""

    label: str
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    planner: bool = False

    @classmethod
    def parse(cls, text: str) -> ContenderSpec:
        """``static-2p1d``, ``planner-2p1d`` or ``colocated-3``."""
        label = text.strip().lower()
        m = re.fullmatch(r"(static|planner)-(\d+)p(\d+)d|colocated-(\d+)", label)
        if m is None:
            raise ValueError(f"contender {text!r} is not static-<P>p<D>d, planner-<P>p<D>d or "
                             "colocated-<N>")
        if m[4]:
            return cls(label, colocated=int(m[4]))
        return cls(label, int(m[2]), int(m[3]), planner=m[1] == "planner")


@dataclass(frozen=True)
class ElasticConfig:
    phases: tuple[PhaseSpec, ...]
    contenders: tuple[ContenderSpec, ...]
    slo: SloConfig
    planner: PlannerConfig  # the planner contender's tuning (its SLOs and budget included)
    shapes: PhaseShapes = field(default_factory=PhaseShapes)
    max_workers: int = 3
    threads_per_worker: int = 1
    dtype: str = "float32"
    weight_quantization: str = "none"
    max_num_batched_tokens: int = 1024
    slo_window_s: float = 20.0  # RouterConfig.slo_window_s: what the planner sees
    drain_deadline_s: float = 30.0
    lease_ttl_s: int = 15  # ClusterConfig.lease_ttl_s (5 s leases lapse on a starved machine)
    warmup_requests: int = 3
    settle_s: float = 25.0  # silence after the warm-up (> slo_window_s: the window empties)
    tail_s: float = 240.0  # in-flight requests may finish this long after the last phase
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.phases or not self.contenders:
            raise ValueError("need at least one phase and one contender")
        if any(c.prefill + c.decode + c.colocated > self.max_workers for c in self.contenders):
            raise ValueError(f"a contender has more than {self.max_workers} workers")
        if self.slo_window_s <= 0 or self.settle_s < 0 or self.warmup_requests < 0:
            raise ValueError("slo_window_s > 0, settle_s >= 0 and warmup_requests >= 0 required")

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)


def warmup_workload(cfg: ElasticConfig, builder: PromptBuilder) -> Workload | None:
    """Short requests of both shapes (other prompts than the measured ones)."""
    if cfg.warmup_requests == 0:
        return None
    warm = PromptBuilder(builder.corpus_ids, seed=cfg.seed + 1)
    requests = tuple(WorkloadRequest(f"warmup-{i}", tuple(warm.prompt(256 if i % 2 else 64, i)),
                                     16, 0.0) for i in range(cfg.warmup_requests))
    return Workload(name="warmup", requests=requests)


def cluster_config(cfg: ElasticConfig, contender: ContenderSpec):
    """The ``ClusterConfig`` of one contender (planner ``auto`` or off)."""
    from scission.cluster.launcher import ClusterConfig
    from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from scission.registry.pools import PlannerMode
    from scission.router.config import RouterConfig

    engine = EngineConfig(
        dtype=cfg.dtype, weight_quantization=cfg.weight_quantization,
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens))
    router = RouterConfig(slo_ttft_ms=cfg.slo.ttft_slo_ms, slo_tpot_ms=cfg.slo.tpot_slo_ms,
                          slo_window_s=cfg.slo_window_s)
    return ClusterConfig(
        num_prefill=contender.prefill, num_decode=contender.decode,
        num_colocated=contender.colocated, engine=engine, router=router,
        threads_per_worker=cfg.threads_per_worker, pin_cpus=False,
        planner_mode=PlannerMode.AUTO if contender.planner else PlannerMode.OFF,
        slo_ttft_ms=cfg.slo.ttft_slo_ms, slo_tpot_ms=cfg.slo.tpot_slo_ms,
        max_workers=cfg.max_workers, planner_interval_s=cfg.planner.interval_s,
        drain_deadline_s=cfg.drain_deadline_s, planner=cfg.planner, lease_ttl_s=cfg.lease_ttl_s)


def run_contender(cfg: ElasticConfig, contender: ContenderSpec, workload: Workload,
                  warmup: Workload | None) -> dict:
    """Start the cluster, warm it up, let the SLO window empty, send the phases while polling;
    read the decisions; stop the cluster (also on failure). Returns ``contender_entry``."""
    from scission.bench.runner import run_against
    from scission.cluster.launcher import LocalCluster

    cluster = LocalCluster(cluster_config(cfg, contender))
    try:
        address = cluster.start()
        logger.info("%s: router at %s", contender.label, address)
        if warmup is not None:
            arrival = ArrivalConfig(ArrivalKind.CONCURRENCY, concurrency=len(warmup.requests))
            run_against(address, warmup, arrival, cfg.slo, _loadgen(60.0), "warm-up")
        time.sleep(cfg.settle_s)
        wall_t0_s = time.time()
        with ElasticPoller(cluster, wall_t0_s) as poller:
            result = run_against(address, workload, ArrivalConfig(ArrivalKind.TRACE), cfg.slo,
                                 _loadgen(cfg.duration_s + cfg.tail_s), contender.label)
            decisions = poller.decisions()
        return contender_entry(contender.label, dataclasses.asdict(contender), result.records,
                               result.summary.num_not_sent, poller.timeline, decisions, wall_t0_s)
    finally:
        cluster.stop()


def _loadgen(max_duration_s: float) -> LoadGenConfig:
    return LoadGenConfig(request_timeout_s=300.0, max_duration_s=max_duration_s, show_progress=False)


class ElasticPoller:
    """Samples every ``interval_s`` on a thread: the pool targets, the controller's workers
    (serving per role; starting, draining or flipping) and the routers' combined cluster-scope
    SLO window (what the planner sees). ``t_s`` is on the schedule's clock."""

    def __init__(self, cluster, wall_t0_s: float, interval_s: float = 1.0) -> None:
        from scission.registry.pools import PoolStore
        from scission.registry.workers import EtcdClientConfig, RegistryConfig, connect

        assert cluster.etcd is not None, "the benchmark starts its own embedded etcd"
        self._etcd = connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
        registry = RegistryConfig(prefix=cluster.config.registry_prefix)
        self._store = PoolStore(self._etcd, registry)
        self._slo_prefix = f"{registry.prefix}/metrics/slo/"
        self._controller = cluster.controller
        self._wall_t0_s, self._interval_s = wall_t0_s, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elastic-poller", daemon=True)
        self.timeline: list[dict] = []
        self.num_errors = 0  # samples lost to etcd/Ray errors (logged)

    def __enter__(self) -> ElasticPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._etcd.close()

    def _run(self) -> None:
        while True:
            try:
                self.timeline.append(self.sample())
            except Exception as e:  # counted and logged; the run goes on without this sample
                self.num_errors += 1
                logger.warning("poller: sample lost (%s)", e)
            if self._stop.wait(self._interval_s):
                return

    def sample(self) -> dict:
        import ray

        from scission.cluster.planner.adapter import combine_windows
        from scission.registry.metrics import SCOPE_CLUSTER, SloWindow

        targets, _ = self._store.read_targets()
        workers = ray.get(self._controller.workers.remote(), timeout=10)
        row: dict = {"t_s": time.time() - self._wall_t0_s, "live": len(workers),
                     "changing": sum(w["state"] != "serving" for w in workers),
                     "loadavg_1m": os.getloadavg()[0]}
        for role in ("prefill", "decode", "colocated"):
            row[f"{role}_target"] = getattr(targets, role) if targets is not None else 0
            row[f"{role}_serving"] = sum(w["role"] == role and w["state"] == "serving"
                                         for w in workers)
        windows = [SloWindow.from_bytes(v) for v, meta in self._etcd.get_prefix(self._slo_prefix)
                   if meta.key.decode().endswith("/" + SCOPE_CLUSTER)]
        obs = combine_windows(windows)
        if obs is not None:
            row.update(window_arrival_rps=obs.arrival_rps, window_ttft_p90_ms=obs.ttft_p90_ms,
                       window_tpot_p90_ms=obs.tpot_p90_ms, window_attainment=obs.attainment,
                       window_mean_prompt_tokens=obs.mean_prompt_tokens)
        return row

    def decisions(self) -> list[dict]:
        """The planner's recorded decisions (the newest ``MAX_DECISIONS_KEPT``), with ``t_s``."""
        from scission.registry.pools import MAX_DECISIONS_KEPT

        out = [{**dataclasses.asdict(d), "mode": d.mode.value, "t_s": d.at_s - self._wall_t0_s}
               for d in self._store.decisions(limit=MAX_DECISIONS_KEPT)]
        if len(out) == MAX_DECISIONS_KEPT:
            logger.warning("%d decisions kept in etcd: older ones are lost", len(out))
        return out


# -- command line -------------------------------------------------------------------------------


def _length_range(text: str) -> LengthConfig:
    """``lo-hi`` tokens -> uniform in [lo, hi] (mean (lo+hi)/2, lo+hi even); ``n`` -> fixed."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a token range lo-hi: {text!r}")
    lo, hi = int(m[1]), int(m[2] or m[1])
    if lo < 1 or hi < lo or (lo + hi) % 2:
        raise argparse.ArgumentTypeError(f"need 1 <= lo <= hi and lo + hi even: {text!r}")
    return LengthConfig((lo + hi) // 2, LengthDist.UNIFORM, (hi - lo) // 2)


def _listed(parse):
    def parse_list(text: str) -> tuple:
        try:
            return tuple(parse(x) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return parse_list


DEFAULT_PHASES = "prefill:0.3:120,decode:1.2:120,prefill:0.3:120,decode:1.2:120"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``scission bench elastic`` (defaults shown by ``--help``)."""
    from scission.bench.side_by_side import _HelpFormatter

    parser.formatter_class = _HelpFormatter
    g = parser.add_argument_group("workload")
    g.add_argument("--phases", type=_listed(PhaseSpec.parse), default=DEFAULT_PHASES,
                   metavar="KIND:RPS:S,...", help="phases in order (kind prefill or decode)")
    for name, default in (("prefill-prompt", "768-1024"), ("prefill-output", "6-10"),
                          ("decode-prompt", "32-64"), ("decode-output", "96-128")):
        g.add_argument(f"--{name}-tokens", type=_length_range, default=default, metavar="LO-HI",
                       help=f"{name.replace('-', ' ')} tokens, uniform")
    g.add_argument("--warmup-requests", type=int, default=3)
    g.add_argument("--settle-s", type=float, default=25.0,
                   help="silence between warm-up and the phases (> --slo-window-s)")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompts")
    g = parser.add_argument_group("contenders and cluster")
    g.add_argument("--contenders", type=_listed(ContenderSpec.parse),
                   default="static-2p1d,static-1p2d,planner-2p1d",
                   help="static-<P>p<D>d, colocated-<N>, planner-<P>p<D>d (start split)")
    g.add_argument("--max-workers", type=int, default=3, help="worker budget of every contender")
    g.add_argument("--threads-per-worker", type=int, default=1)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--weight-quantization", default="none", choices=("none", "int4", "int8", "w8a8", "w4a8"))
    g.add_argument("--max-num-batched-tokens", type=int, default=1024)
    g.add_argument("--drain-deadline-s", type=float, default=30.0)
    g.add_argument("--lease-ttl-s", type=int, default=15, help="worker/router etcd leases")
    g = parser.add_argument_group("SLOs and planner")
    g.add_argument("--ttft-slo-ms", type=float, default=12000.0)
    g.add_argument("--tpot-slo-ms", type=float, default=300.0)
    g.add_argument("--slo-window-s", type=float, default=20.0, help="router SLO window")
    g.add_argument("--planner-interval-s", type=float, default=5.0)
    g.add_argument("--planner-cooldown-s", type=float, default=20.0)
    g.add_argument("--planner-min-worker-lifetime-s", type=float, default=20.0)
    g.add_argument("--planner-cold-start-s", type=float, default=10.0)
    g.add_argument("--planner-scale-up-ticks", type=int, default=2)
    g.add_argument("--planner-scale-down-ticks", type=int, default=None,
                   help="default: PlannerConfig's")
    g = parser.add_argument_group("output")
    g.add_argument("--output", type=Path, default=None,
                   help="result JSON (default bench/results/elastic_<date>.json); PNG beside it")
    g.add_argument("--merge", action="store_true",
                   help="add these contenders to an existing --output of the same workload")
    g.add_argument("--no-plots", action="store_true")


def config_from_args(args: argparse.Namespace) -> ElasticConfig:
    """Raises ValueError on inconsistent options."""
    slo = SloConfig(args.ttft_slo_ms, args.tpot_slo_ms)
    planner = PlannerConfig(
        slo_ttft_ms=slo.ttft_slo_ms, slo_tpot_ms=slo.tpot_slo_ms, max_workers=args.max_workers,
        interval_s=args.planner_interval_s, cooldown_s=args.planner_cooldown_s,
        min_worker_lifetime_s=args.planner_min_worker_lifetime_s,
        cold_start_s=args.planner_cold_start_s, scale_up_ticks=args.planner_scale_up_ticks,
        **({} if args.planner_scale_down_ticks is None
           else {"scale_down_ticks": args.planner_scale_down_ticks}))
    shapes = PhaseShapes(args.prefill_prompt_tokens, args.prefill_output_tokens,
                         args.decode_prompt_tokens, args.decode_output_tokens)
    return ElasticConfig(
        phases=args.phases, contenders=args.contenders, slo=slo, planner=planner, shapes=shapes,
        max_workers=args.max_workers, threads_per_worker=args.threads_per_worker,
        dtype=args.dtype, weight_quantization=args.weight_quantization,
        max_num_batched_tokens=args.max_num_batched_tokens, slo_window_s=args.slo_window_s,
        drain_deadline_s=args.drain_deadline_s, lease_ttl_s=args.lease_ttl_s,
        warmup_requests=args.warmup_requests,
        settle_s=args.settle_s, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Runs every contender; 0 when all ran (see the table for how they fared), 2 on bad
    options or a result file that cannot be merged."""
    from scission.bench import elastic_report as report
    from scission.bench.engine import machine_info
    from scission.bench.prompts import load_tokenizer

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    output = args.output or Path(f"bench/results/elastic_{datetime.now(UTC):%Y-%m-%d}.json")
    schedule, phases = phase_schedule(cfg.phases, cfg.shapes, cfg.seed)
    builder = PromptBuilder.from_tokenizer(load_tokenizer(), None, cfg.seed)
    workload, warmup = build_phase_workload(schedule, builder), warmup_workload(cfg, builder)
    logger.info("schedule: %d requests over %.0f s", len(schedule), cfg.duration_s)
    command = " ".join(["python -m scission.bench.elastic", *sys.argv[1:]])
    header = {"command": command, "machine": machine_info()}
    doc = report.new_document(header, _config_dict(cfg), phases)
    doc["runs"] = [{"command": command, "started_at": doc["created_at"], "code": _code_state(),
                    "contenders": [c.label for c in cfg.contenders]}]
    for contender in cfg.contenders:
        doc["contenders"][contender.label] = run_contender(cfg, contender, workload, warmup)
    if args.merge and output.exists():
        try:
            doc = report.merge_documents(json.loads(output.read_text()), doc)
        except ValueError as e:
            output = output.with_name(output.stem + "_unmerged.json")
            logger.error("%s; writing %s instead", e, output)
    report.analyze(doc)
    report.write_json(output, doc)
    if not args.no_plots:
        report.plot_timeline(doc, output.with_suffix(".png"))
    sys.stdout.write(report.format_table(doc) + "\n" + report.format_decisions(doc) + "\n")
    return 0


def _code_state() -> dict:
    """HEAD and a digest of the uncommitted changes of the serving packages (a shared checkout
    changes between runs: each run records the code it measured)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True).stdout.strip()

    paths = ("cluster", "registry", "router", "worker", "engine", "kv_transfer")
    return {"head": git("rev-parse", "--short", "HEAD"),
            "dirty": git("diff", "--name-only", "HEAD", "--", *paths).split(),
            "diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", *paths).encode()).hexdigest()}


def _config_dict(cfg: ElasticConfig) -> dict:
    """The configuration as plain JSON data (enums by value, tuples as lists)."""
    from scission.bench.side_by_side_report import _jsonable

    return json.loads(json.dumps(_jsonable(dataclasses.asdict(cfg))))


def main(argv: list[str] | None = None) -> int:
    from scission.bench.cli_main import bench_main

    return bench_main("python -m scission.bench.elastic", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
