"""KV-aware vs least-loaded vs round-robin routing on a shared-prefix workload, side by side.

``python -m scission.bench.prefix_routing`` builds one workload: ``num_groups`` long "system
prompts" (real corpus text, ``bench.prompts.PromptBuilder``), each followed by a unique user turn,
``requests_per_group`` requests per group in a seeded random order with seeded Poisson arrivals.
For each ``RoutingPolicy`` it starts a fresh local cluster (embedded etcd + Ray, 2 prefill + 1
decode workers: cold prefix caches every time), warms each worker's kernels with a short
unrelated prompt, replays the same workload and records:

- TTFT p50/p90/p99 and E2E (client side), prefix hit rate = cached / prompt tokens (usage);
- requests per prefill worker;
- etcd writes of the KV index: a watch on ``{prefix}/kv/`` counts each put/delete (= a publisher
  op) and each distinct revision (= a publisher txn); etcd's own ``etcd_mvcc_*_total`` counters
  give all writes to etcd (registrations, stats, index); both are normalized per 1k prompt
  tokens/s offered;
- the router's ``/metrics`` (index size, routing decision time, hit rate).

Results: ``bench/results/prefix_routing.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import ray
from etcd3.etcdrpc import kv_pb2

from scission.bench.arrivals import ArrivalConfig, ArrivalKind
from scission.bench.cli_main import bench_main, report
from scission.bench.loadgen import LoadGenConfig
from scission.bench.metrics import SloConfig
from scission.bench.prompts import PromptBuilder, load_tokenizer
from scission.bench.runner import BenchResult, run_against
from scission.bench.workload import Workload, WorkloadRequest
from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_watch import WatchLoop
from scission.registry.kv_index import kv_prefix
from scission.registry.workers import EtcdClientConfig, WorkerRole, connect
from scission.router.config import PlacementConfig, RouterConfig, RoutingPolicy
from scission.worker.ports import find_free_port

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results" / "prefix_routing.json"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class PrefixRoutingConfig:
    num_groups: int = 10  # distinct system prompts
    requests_per_group: int = 4
    system_tokens: int = 320
    user_tokens: int = 48
    output_tokens: int = 4
    rate_rps: float = 1.0  # Poisson arrivals
    seed: int = 0
    num_prefill: int = 2
    num_decode: int = 1
    num_blocks: int = 512  # KV blocks per worker
    policies: tuple[RoutingPolicy, ...] = tuple(RoutingPolicy)

    def __post_init__(self) -> None:
        if min(self.num_groups, self.requests_per_group, self.system_tokens,
               self.user_tokens, self.output_tokens) < 1 or self.rate_rps <= 0:
            raise ValueError(f"sizes must be >= 1 and rate > 0: {self}")


def build_workload(cfg: PrefixRoutingConfig, builder: PromptBuilder) -> Workload:
    """Group g's requests start with the same ``system_tokens`` corpus tokens (hash id g)."""
    groups = [g for g in range(cfg.num_groups) for _ in range(cfg.requests_per_group)]
    random.Random(cfg.seed).shuffle(groups)
    requests = []
    for i, g in enumerate(groups):
        ids = builder.prompt(cfg.system_tokens + cfg.user_tokens, i, (g,), cfg.system_tokens)
        requests.append(WorkloadRequest(f"prefix-{i}-g{g}", tuple(ids), cfg.output_tokens, 0.0))
    return Workload(name=f"shared-prefix {cfg.num_groups}x{cfg.requests_per_group}",
                    requests=tuple(requests))


class IndexWriteCounter:
    """Counts KV-index writes in etcd by watching ``{prefix}/kv/``: events = ops, distinct
    revisions = txns (one etcd txn commits at one revision)."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        self._client = connect(EtcdClientConfig(endpoints=(endpoint,)))
        self._revisions: set[int] = set()
        self._lock = threading.Lock()
        self.num_ops = 0
        self._loop = WatchLoop(self._client, (kv_prefix(prefix),), self._head, self._count,
                               0.2, "bench-kv-writes")

    def _head(self) -> int:
        return self._client.get_response("/", count_only=True).header.revision

    def _count(self, events, revision: int) -> None:
        with self._lock:
            self.num_ops += len(events)
            self._revisions.update(e.kv.mod_revision for e in events
                                   if e.type in (kv_pb2.Event.PUT, kv_pb2.Event.DELETE))

    def start(self) -> IndexWriteCounter:
        self._loop.start()
        return self

    def stop(self) -> tuple[int, int]:
        """Stop; returns (ops, txns) seen."""
        time.sleep(0.5)  # the publishers flush every 0.1 s
        self._loop.close()
        self._client.close()
        with self._lock:
            return self.num_ops, len(self._revisions)


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Unlabelled samples ``names`` from a Prometheus text endpoint (missing ones are absent)."""
    text = _NO_PROXY.open(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[name] = float(value)
    return out


ETCD_WRITES = ("etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_mvcc_txn_total")
ROUTER_SAMPLES = ("scission_kv_index_blocks", "scission_router_prefix_hit_rate",
                  "scission_router_routing_decision_seconds_sum",
                  "scission_router_routing_decision_seconds_count",
                  "scission_kv_index_keys_applied_total", "scission_kv_index_lag_revisions")


def warm_up(cluster: LocalCluster, seed: int) -> None:
    """One short unrelated prompt on every worker, straight over the internal API."""
    from scission.registry.workers import RegistryConfig

    client = connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
    rng = random.Random(seed ^ 0xBEEF)
    sampling = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=1, ignore_eos=True)
    with WorkerDirectory(client, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
        for info in d.workers():
            stub = worker_stub(info.endpoint, cluster.cluster_token)
            ids = [rng.randrange(100, 40_000) for _ in range(64)]
            rid = f"warmup-{info.worker_id}"
            if info.role is WorkerRole.PREFILL:
                stub.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=ids,
                                                sampling=sampling), timeout=120)
            else:
                list(stub.Generate(wpb.GenerateRequest(request_id=rid, prompt_token_ids=ids,
                                                       sampling=sampling), timeout=120))
    client.close()


def run_policy(cfg: PrefixRoutingConfig, policy: RoutingPolicy,
               workload: Workload) -> dict[str, object]:
    metrics_port = find_free_port()
    cluster = LocalCluster(ClusterConfig(
        num_prefill=cfg.num_prefill, num_decode=cfg.num_decode, threads_per_worker=1,
        engine=EngineConfig(cache=CacheConfig(num_blocks=cfg.num_blocks)),
        router=RouterConfig(placement=PlacementConfig(policy=policy), metrics_port=metrics_port)))
    try:
        address = cluster.start()
        warm_up(cluster, cfg.seed)
        etcd_url = f"http://{cluster.etcd.endpoint}/metrics"
        etcd_before = scrape(etcd_url, ETCD_WRITES)
        counter = IndexWriteCounter(cluster.etcd.endpoint, cluster.config.registry_prefix).start()
        arrival = ArrivalConfig(ArrivalKind.POISSON, rate_rps=cfg.rate_rps, seed=cfg.seed)
        result = run_against(address, workload, arrival, SloConfig(2000.0, 1000.0),
                             LoadGenConfig(show_progress=False), label=policy.value)
        ops, txns = counter.stop()
        etcd_after = scrape(etcd_url, ETCD_WRITES)
        router = scrape(f"http://127.0.0.1:{metrics_port}/metrics", ROUTER_SAMPLES)
    finally:
        cluster.stop()
    etcd = {k: etcd_after.get(k, 0) - etcd_before.get(k, 0) for k in ETCD_WRITES}
    return summarize_policy(policy, result, ops, txns, etcd, router)


def summarize_policy(policy: RoutingPolicy, result: BenchResult, ops: int, txns: int,
                     etcd: dict[str, float], router: dict[str, float]) -> dict[str, object]:
    s, records = result.summary, result.records
    ok = [r for r in records if r.succeeded]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    duration_s = s.duration_s
    prompt_tok_per_s = prompt_tokens / duration_s
    per_1k = 1000.0 / prompt_tok_per_s if prompt_tok_per_s else 0.0
    workers: dict[str, int] = {}
    for r in ok:
        workers[r.prefill_worker] = workers.get(r.prefill_worker, 0) + 1
    etcd_writes = etcd["etcd_mvcc_put_total"] + etcd["etcd_mvcc_delete_total"]
    decisions = router.get("scission_router_routing_decision_seconds_count", 0)
    return {
        "policy": policy.value, "requests": len(records), "succeeded": len(ok),
        "duration_s": duration_s, "ttft_ms": asdict(s.ttft_ms), "e2e_ms": asdict(s.e2e_ms),
        "prompt_tokens": prompt_tokens, "cached_tokens": cached,
        "hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "computed_prompt_tokens": prompt_tokens - cached,
        "prompt_tokens_per_s": prompt_tok_per_s, "requests_per_prefill_worker": workers,
        "kv_index_ops": ops, "kv_index_txns": txns,
        "kv_index_ops_per_s": ops / duration_s, "kv_index_txns_per_s": txns / duration_s,
        "kv_index_ops_per_s_per_1k_prompt_tok_s": ops / duration_s * per_1k,
        "kv_index_txns_per_s_per_1k_prompt_tok_s": txns / duration_s * per_1k,
        "etcd_all_writes": etcd, "etcd_all_write_ops_per_s": etcd_writes / duration_s,
        "router_metrics": router,
        "routing_decision_mean_us": (router.get("scission_router_routing_decision_seconds_sum",
                                                0) / decisions * 1e6) if decisions else None,
    }


def format_table(doc: dict) -> str:
    lines = ["| policy | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | hit rate | reqs per prefill "
             "worker | index ops/s | index txns/s | ops/s per 1k prompt tok/s | all etcd "
             "writes/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(r["requests_per_prefill_worker"].items()))
        lines.append(
            f"| {r['policy']} | {r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p90']:.0f} "
            f"| {r['e2e_ms']['p50']:.0f} | {r['hit_rate']:.3f} | {spread} "
            f"| {r['kv_index_ops_per_s']:.1f} | {r['kv_index_txns_per_s']:.2f} "
            f"| {r['kv_index_ops_per_s_per_1k_prompt_tok_s']:.1f} "
            f"| {r['etcd_all_write_ops_per_s']:.1f} |")
    return "\n".join(lines)


def run(cfg: PrefixRoutingConfig, output: Path = RESULTS) -> dict[str, object]:
    builder = PromptBuilder.from_tokenizer(load_tokenizer(), seed=cfg.seed)
    workload = build_workload(cfg, builder)
    if not ray.is_initialized():  # one Ray for all runs: the clusters do not restart it
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs = []
    for policy in cfg.policies:
        logger.info("policy %s: starting a fresh cluster", policy.value)
        runs.append(run_policy(cfg, policy, workload))
    doc = {"benchmark": "prefix_routing", "date": datetime.now(UTC).isoformat(),
           "config": {**asdict(cfg), "policies": [p.value for p in cfg.policies]},
           "runs": runs}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", type=int, default=10, help="distinct system prompts")
    p.add_argument("--per-group", type=int, default=4, help="requests per system prompt")
    p.add_argument("--system-tokens", type=int, default=320, help="shared prefix length")
    p.add_argument("--user-tokens", type=int, default=48, help="unique suffix length")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate, req/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(p.value for p in RoutingPolicy),
                   help="comma-separated routing policies")
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON result file")


def _run(args: argparse.Namespace) -> int:
    cfg = PrefixRoutingConfig(num_groups=args.groups, requests_per_group=args.per_group,
                              system_tokens=args.system_tokens, user_tokens=args.user_tokens,
                              rate_rps=args.rate, seed=args.seed,
                              policies=tuple(RoutingPolicy(v) for v in args.policies.split(",")))
    doc = run(cfg, args.output)
    return report(format_table(doc), args.output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.prefix_routing", __doc__.split("\n\n")[0],
                      _add_arguments, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
