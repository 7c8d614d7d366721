"""Soak: a real cluster under a steady mixed load for many minutes, a fault every minute.

```
scission bench soak --duration-s 600 --rate 0.4        # = python -m scission.bench.soak
```

Starts a local cluster (embedded etcd, Ray, router, ``--prefill`` + ``--decode`` workers,
one core each), sends Poisson arrivals of prompts of 64-512 corpus tokens asking for 16-64
greedy tokens (EOS ignored), and injects a fault every ``--fault-interval-s``, in turn:

- ``crash-worker``: SIGKILL a worker process (Ray restarts it; alternately prefill, decode);
- ``pause-etcd``: SIGSTOP etcd for three lease TTLs, then SIGCONT;
- ``cancel-burst``: 8 extra requests, each cancelled after 0-3 chunks;
- ``stop-worker``: SIGSTOP a decode worker for 15 s (it stops answering), then SIGCONT.

Reports requests served / failed (by status) / hung (ran to their deadline), p90 TTFT and
TPOT per minute, the RSS of the router and worker processes over time, and every worker's
blocks at the end (after the load drained). JSON + a PNG timeline (``bench/soak_report.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import ray

from scission.bench.cli_main import bench_main
from scission.bench.prompts import PromptBuilder, load_tokenizer
from scission.bench.soak_report import plot_timeline, summarize
from scission.cluster.client import connect
from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)
FAULTS = ("crash-worker", "pause-etcd", "cancel-burst", "stop-worker")
LEASE_TTL_S = 3


@dataclass
class RequestLog:
    submit_s: float  # since the load started
    prompt_tokens: int
    max_tokens: int
    status: str = ""  # "ok" or a gRPC status name
    output_tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


@dataclass
class SoakRun:
    config: dict
    requests: list[RequestLog] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)  # {"t_s", "kind", "target", "note"}
    rss: list[dict] = field(default_factory=list)  # {"t_s", "process", "rss_mb"}
    blocks_end: dict[str, dict] = field(default_factory=dict)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        self.cluster, self.args = cluster, args
        self.run = SoakRun(config={k: v for k, v in vars(args).items() if k != "func"})
        self.stub = connect(cluster.router_address)
        self.builder = PromptBuilder.from_tokenizer(load_tokenizer(), args.corpus, args.seed)
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.directory = cluster._directory()  # started; closed at the end of execute()

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    def one_request(self, index: int, cancel_after: int | None = None) -> None:
        rng = random.Random(self.args.seed * 1_000_003 + index)
        prompt = self.builder.prompt(rng.randint(64, 512), index)
        max_tokens = rng.randint(16, 64)
        log = RequestLog(self.now_s(), len(prompt), max_tokens)
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        start = time.monotonic()
        first = None
        stream = self.stub.Generate(req, timeout=self.args.deadline_s)
        if cancel_after == 0:  # before anything comes back
            stream.cancel()
        try:
            for chunk in stream:
                if chunk.token_ids and first is None:
                    first = time.monotonic()
                log.output_tokens += len(chunk.token_ids)
                if cancel_after is not None and log.output_tokens >= cancel_after:
                    stream.cancel()
            log.status = "ok"
        except grpc.RpcError as e:
            log.status = "cancelled_by_client" if cancel_after is not None else e.code().name
        end = time.monotonic()
        if first is not None:
            log.ttft_ms = (first - start) * 1e3
            if log.output_tokens > 1:
                log.tpot_ms = (end - first) * 1e3 / (log.output_tokens - 1)
        log.e2e_ms = (end - start) * 1e3
        if cancel_after is None:
            with self.lock:
                self.run.requests.append(log)

    def arrivals(self, pool: ThreadPoolExecutor) -> None:
        index = 0
        while not self.stop.is_set():
            pool.submit(self.one_request, index)
            index += 1
            self.stop.wait(self.rng.expovariate(self.args.rate))

    def sample_rss(self) -> None:
        pids: dict[str, int] = {}
        while not self.stop.wait(self.args.rss_interval_s):
            for name, actor in [("router", self.cluster.router),
                                *self.cluster.workers.items()]:
                try:
                    pids[name] = ray.get(actor.pid.remote(), timeout=2)
                except Exception:  # stopped or restarting: keep the last pid
                    pass
                rss = _rss_mb(pids[name]) if name in pids else None
                if rss is not None:
                    with self.lock:
                        self.run.rss.append({"t_s": self.now_s(), "process": name,
                                             "rss_mb": rss})

    def inject(self, n: int) -> None:
        kind = FAULTS[n % len(FAULTS)]
        workers = sorted(self.cluster.workers)
        t = self.now_s()
        target, note = "", ""
        if kind == "crash-worker":
            role = "prefill" if (n // len(FAULTS)) % 2 == 0 else "decode"
            target = next(w for w in workers if w.startswith(role))
            pid = self.cluster.crash_worker(target)
            note = f"SIGKILL pid {pid}"
        elif kind == "pause-etcd":
            target, pid = "etcd", self.cluster.etcd.pid
            os.kill(pid, signal.SIGSTOP)
            self.stop.wait(3 * LEASE_TTL_S)
            os.kill(pid, signal.SIGCONT)
            note = f"SIGSTOP {3 * LEASE_TTL_S} s"
        elif kind == "cancel-burst":
            target, note = "clients", "8 requests cancelled after 0-3 chunks"
            with ThreadPoolExecutor(8) as burst:
                for i in range(8):
                    burst.submit(self.one_request, 10_000_000 + n * 8 + i, i % 4)
        elif kind == "stop-worker":
            target = next(w for w in workers if w.startswith("decode"))
            pid = ray.get(self.cluster.workers[target].pid.remote(), timeout=10)
            os.kill(pid, signal.SIGSTOP)
            self.stop.wait(15)
            os.kill(pid, signal.SIGCONT)
            note = f"SIGSTOP pid {pid} for 15 s"
        logger.warning("fault %d at %.0f s: %s %s (%s)", n, t, kind, target, note)
        self.run.faults.append({"t_s": t, "kind": kind, "target": target, "note": note})

    def blocks_at_end(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = {}
            for wid in sorted(self.cluster.workers):
                info = self.directory.get(wid)
                if info is None:
                    continue
                s = worker_stub(info.endpoint, self.cluster.cluster_token).GetStats(
                    wpb.StatsRequest(), timeout=5)
                stats[wid] = {"num_blocks": s.num_blocks, "num_free_blocks": s.num_free_blocks,
                              "num_held": s.num_held, "num_running": s.num_running}
            clean = all(v["num_free_blocks"] == v["num_blocks"] and not v["num_held"]
                        and not v["num_running"] for v in stats.values())
            if clean or time.monotonic() > deadline:
                self.run.blocks_end = stats
                return
            time.sleep(1)

    def execute(self) -> SoakRun:
        args = self.args
        with ThreadPoolExecutor(args.max_in_flight) as pool:
            threads = [threading.Thread(target=self.arrivals, args=(pool,), daemon=True),
                       threading.Thread(target=self.sample_rss, daemon=True)]
            for th in threads:
                th.start()
            n = 0
            while self.now_s() < args.duration_s:
                next_fault_s = (n + 1) * args.fault_interval_s
                if next_fault_s >= args.duration_s:
                    time.sleep(max(0.0, args.duration_s - self.now_s()))
                    break
                time.sleep(max(0.0, next_fault_s - self.now_s()))
                self.inject(n)
                n += 1
            self.stop.set()
            for th in threads:
                th.join(timeout=30)
        self.blocks_at_end()
        self.directory.close()
        return self.run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration-s", type=float, default=600, help="load duration")
    parser.add_argument("--rate", type=float, default=0.4, help="Poisson arrivals, req/s")
    parser.add_argument("--fault-interval-s", type=float, default=60,
                        help="a fault every this many seconds (in turn: " + ", ".join(FAULTS)
                        + ")")
    parser.add_argument("--prefill", type=int, default=2, help="prefill workers")
    parser.add_argument("--decode", type=int, default=2, help="decode workers")
    parser.add_argument("--deadline-s", type=float, default=180,
                        help="client deadline per request; a request that reaches it is hung")
    parser.add_argument("--max-in-flight", type=int, default=64, help="client threads")
    parser.add_argument("--rss-interval-s", type=float, default=5, help="RSS sampling period")
    parser.add_argument("--corpus", type=Path, default=None, help="text corpus for prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/soak.json"),
                        help="JSON result; the PNG timeline goes beside it")


def run(args: argparse.Namespace) -> int:
    cfg = ClusterConfig(num_prefill=args.prefill, num_decode=args.decode,
                        lease_ttl_s=LEASE_TTL_S, threads_per_worker=1, hold_timeout_s=60,
                        engine=EngineConfig(cache=CacheConfig(num_blocks=512)))
    cluster = LocalCluster(cfg)
    try:
        cluster.start()
        result = Soak(cluster, args).execute()
    finally:
        cluster.stop()
    summary = summarize(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": summary, **asdict(result)}, default=str,
                                      indent=1) + "\n")
    plot_timeline(result, summary, args.output.with_suffix(".png"))
    print(summary["table"])
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0 if summary["hung"] == 0 and summary["blocks_leaked"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.soak", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
