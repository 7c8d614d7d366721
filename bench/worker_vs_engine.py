"""Worker vs engine alone: what a cluster worker adds to each decode step.

``scission bench worker-vs-engine`` (or ``python -m scission.bench.worker_vs_engine``) sends
the same requests, in one run, two ways:

- ``engine``: an ``LLMEngine`` alone in a child process (no gRPC, no engine loop thread),
  stepped in a tight loop; ``step_ms`` = ``engine.step()``'s own time (``StepRecorder``) of
  the steps whose batch is all the requests' decode rows;
- ``worker``: one colocated worker started as ``scission up`` starts it (``LocalCluster``:
  Ray actor, etcd, router, NIXL agent, stats publisher), called on its internal ``Generate``
  with the cluster token (no router hop), ``batch`` concurrent streams from this process.
  ``tpot_ms`` = the p50 of per-token inter-arrival gaps at the client over the steady window
  (after every stream's first token, before any stream's last); ``loop_step_ms`` = the
  worker's own ``engine.step()`` time of its all-decode steps (the step rows it publishes
  to etcd), which tells contention inside the step from time spent between steps.

Both sides load the same model with the same ``EngineConfig`` (dtype, torch threads, prefix
caching off: every round computes its prompts). Prompts are random plain token ids, greedy,
EOS ignored, so every request decodes exactly ``new_tokens`` tokens; the two sides' tokens
are compared. Rounds alternate which side goes first. ``ratio`` = worker ``tpot_ms`` / engine
``step_ms`` (pooled p50s). Writes ``bench/results/worker_vs_engine_<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scission.bench.cli_main import bench_main, report
from scission.engine.config import WEIGHT_QUANTIZATION_CHOICES, CacheConfig, EngineConfig

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_VOCAB_RANGE = (100, 40000)  # plain tokens of SmolLM2's 49,152 (no special tokens)


@dataclass(frozen=True)
class WorkerVsEngineConfig:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 64
    new_tokens: int = 64
    rounds: int = 3  # per batch size and side
    # torch threads of the engine and of the worker; default: this process's cores, what
    # ``scission up --colocated 1`` gives its one worker
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    dtype: str = "float32"
    weight_quantization: str = "none"  # EngineConfig.weight_quantization (w4a8: native decode)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.batch_sizes, default=0) < 1 or self.prompt_tokens < 1 \
                or self.new_tokens < 4 or self.rounds < 1 or self.threads < 1:
            raise ValueError(f"batch sizes, prompt_tokens, rounds, threads >= 1 and "
                             f"new_tokens >= 4 needed: {self}")

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(dtype=self.dtype, num_threads=self.threads,
                            weight_quantization=self.weight_quantization,
                            cache=CacheConfig(enable_prefix_caching=False))


def make_prompts(cfg: WorkerVsEngineConfig, batch: int, round_: int) -> list[list[int]]:
    """``batch`` random prompts of ``prompt_tokens`` plain token ids (fresh per round)."""
    rng = random.Random(cfg.seed * 1_000_003 + batch * 1_009 + round_)
    return [[rng.randrange(*_VOCAB_RANGE) for _ in range(cfg.prompt_tokens)]
            for _ in range(batch)]


# -- engine alone (child process) ----------------------------------------------------------
def _engine_child(conn, engine: EngineConfig) -> None:
    """Serve ``(prompts, new_tokens)`` runs over ``conn`` until ``None``: each reply is
    ``{"steps": [[step_ms, num_decode_requests, num_prefill_tokens], ...], "tokens": ...}``."""
    from scission.engine.llm_engine import LLMEngine
    from scission.engine.request import SamplingParams

    eng = LLMEngine(engine)
    conn.send({"pid": os.getpid(), "code": code_paths()})
    n = 0
    while (msg := conn.recv()) is not None:
        prompts, new_tokens = msg
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        _, cursor = eng.step_metrics.since(0)
        rids = []
        for p in prompts:
            rids.append(f"e{n}")
            eng.add_request(rids[-1], p, params)
            n += 1
        tokens: dict[str, list[int]] = {r: [] for r in rids}
        while eng.has_unfinished():
            for out in eng.step():
                tokens[out.request_id].extend(out.new_token_ids)
        samples, _ = eng.step_metrics.since(cursor)
        conn.send({"steps": [[s.step_ms, s.num_decode_requests, s.num_prefill_tokens]
                             for s in samples],
                   "tokens": [tokens[r] for r in rids]})


class EngineAlone:
    """The engine in its own process (spawned: nothing of this process's threads)."""

    def __init__(self, engine: EngineConfig) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_child, args=(child, engine), daemon=True)
        self._proc.start()
        self.info = self._conn.recv()

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        self._conn.send((prompts, new_tokens))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=30)


# -- one worker ----------------------------------------------------------------------------
def _stream(stub, prompt: list[int], new_tokens: int, barrier: threading.Barrier
            ) -> dict[str, Any]:
    from scission.proto.scission.internal.v1 import worker_pb2 as wpb

    sampling = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=new_tokens,
                                  ignore_eos=True)
    req = wpb.GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                              sampling=sampling)
    barrier.wait()
    arrivals_s: list[float] = []  # perf_counter per token (a chunk's tokens share one)
    tokens: list[int] = []
    for chunk in stub.Generate(req, timeout=300):
        now = time.perf_counter()
        arrivals_s.extend([now] * len(chunk.token_ids))
        tokens.extend(chunk.token_ids)
    return {"arrivals_s": arrivals_s, "tokens": tokens}


def run_worker_batch(stub, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """All prompts at once, one client thread per stream; arrival times and tokens."""
    barrier = threading.Barrier(len(prompts))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = _stream(stub, prompts[i], new_tokens, barrier)
        except BaseException as e:  # re-raised below, on the caller's thread
            errors.append(e)

    wall_start_s = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"streams": results, "wall_start_s": wall_start_s, "wall_end_s": time.time()}


def steady_gaps_ms(arrivals: list[list[float]]) -> list[float]:
    """Per-token gaps of every stream inside the steady window: after the last stream's
    first token, up to the first stream's last token (all streams decoding)."""
    start = max(a[0] for a in arrivals)
    end = min(a[-1] for a in arrivals)
    return [(b - a) * 1e3 for stream in arrivals for a, b in zip(stream, stream[1:], strict=False)
            if a >= start and b <= end]


def worker_steps(directory, worker_id: str, batch: int, wall_start_s: float,
                 wall_end_s: float, timeout_s: float = 5.0) -> list[float]:
    """The worker's own step_ms of its all-decode steps of one batch, from the step rows it
    publishes to etcd (waits for the publish after ``wall_end_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = directory.stats(worker_id)
        if rec is not None and rec.updated_at_s > wall_end_s:
            break
        time.sleep(0.1)
    rows = rec.steps if rec is not None else []
    return [row[4] for row in rows if wall_start_s <= row[0] <= wall_end_s
            and int(row[2]) == batch and int(row[1]) == 0]


def code_paths() -> dict[str, str]:
    """Where this process imports scission from (before/after runs use their own trees)."""
    import scission.engine.engine_loop
    import scission.worker.runtime

    return {"engine_loop": scission.engine.engine_loop.__file__,
            "worker_runtime": scission.worker.runtime.__file__}


def worker_process_info(pid: int) -> dict[str, Any]:
    """Threads, CPU affinity and threading env of the worker process (from /proc)."""
    env = dict(kv.split("=", 1) for kv in
               Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    return {"pid": pid, "num_threads": len(os.listdir(f"/proc/{pid}/task")),
            "cpus": sorted(os.sched_getaffinity(pid)),
            "env": {k: v for k, v in env.items() if k.startswith(("OMP_", "MKL_", "KMP_"))}}


def thread_counters(pid: int) -> dict[int, tuple[float, int]]:
    """Per thread of process ``pid``: (CPU seconds, voluntary context switches), from
    /proc/<pid>/task (a thread that ends while being read is left out)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
        voluntary = next(int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("voluntary_ctxt_switches"))
        out[int(tid)] = ((int(fields[11]) + int(fields[12])) / hz, voluntary)
    return out


def busiest_threads(before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]],
                    wall_s: float, steps: int, n: int = 2) -> list[dict[str, float]]:
    """The ``n`` threads that used the most CPU between two ``thread_counters``: each one's
    CPU as a percent of one core over ``wall_s`` and its voluntary context switches (sleeps:
    on the GIL, a futex, a queue) per engine step. With 2 torch threads these are the
    stepping thread and its OpenMP team thread, which an engine alone keeps spinning (~0
    sleeps per step)."""
    rows = []
    for tid, (cpu_s, vol) in after.items():
        cpu0, vol0 = before.get(tid, (0.0, 0))
        rows.append({"tid": tid, "cpu_pct": 100.0 * (cpu_s - cpu0) / wall_s,
                     "sleeps_per_step": (vol - vol0) / max(steps, 1)})
    return sorted(rows, key=lambda r: -r["cpu_pct"])[:n]


# -- the run -------------------------------------------------------------------------------
def run(cfg: WorkerVsEngineConfig) -> dict[str, Any]:
    """Start the engine child and a one-worker cluster, run every round, stop both."""
    import ray

    from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
    from scission.registry.directory import WorkerDirectory
    from scission.registry.workers import EtcdClientConfig, RegistryConfig
    from scission.registry.workers import connect as etcd_connect

    engine = EngineAlone(cfg.engine)
    cluster = LocalCluster(ClusterConfig(num_colocated=1, threads_per_worker=cfg.threads,
                                         engine=cfg.engine))
    rounds: list[dict[str, Any]] = []
    directory = None
    try:
        cluster.start()
        etcd = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
        directory = WorkerDirectory(etcd, RegistryConfig(prefix=cluster.config.registry_prefix))
        directory.start()
        info = directory.workers()[0]
        stub = worker_stub(info.endpoint, cluster.cluster_token)
        pid = ray.get(cluster.workers[info.worker_id].pid.remote(), timeout=30)
        provenance = {"driver": code_paths(), "engine_child": engine.info["code"],
                      "ray_task": ray.get(ray.remote(num_cpus=0)(code_paths).remote(),
                                          timeout=60),
                      "worker_process": worker_process_info(pid)}
        logger.info("provenance: %s", provenance)
        warm = make_prompts(cfg, max(cfg.batch_sizes), -1)
        engine.run(warm, 8)
        run_worker_batch(stub, warm, 8)
        for r in range(cfg.rounds):
            for batch in cfg.batch_sizes:
                prompts = make_prompts(cfg, batch, r)
                sides = ("engine", "worker") if (r + batch) % 2 == 0 else ("worker", "engine")
                row: dict[str, Any] = {"round": r, "batch": batch, "order": list(sides)}
                counters = {}  # side -> (before, after, wall_s): its process's threads
                for side in sides:
                    side_pid = engine.info["pid"] if side == "engine" else pid
                    before, t0 = thread_counters(side_pid), time.perf_counter()
                    if side == "engine":
                        row["engine"] = engine.run(prompts, cfg.new_tokens)
                    else:
                        w = run_worker_batch(stub, prompts, cfg.new_tokens)
                        w["loop_step_ms"] = worker_steps(directory, info.worker_id, batch,
                                                         w["wall_start_s"], w["wall_end_s"])
                        row["worker"] = w
                    counters[side] = (before, thread_counters(side_pid),
                                      time.perf_counter() - t0)
                for side, (before, after, wall_s) in counters.items():
                    # per step of the engine's run: the same requests on both sides
                    row[side]["threads"] = busiest_threads(before, after, wall_s,
                                                           len(row["engine"]["steps"]))
                rounds.append(row)
                logger.info("round %d batch %d: %s", r, batch, _round_line(row))
    finally:
        if directory is not None:
            directory.close()
        cluster.stop()
        engine.close()
    return {"benchmark": "worker_vs_engine", "date": datetime.now(UTC).isoformat(),
            "config": asdict(cfg), "loadavg_1m_end": os.getloadavg()[0],
            "provenance": provenance, "summary": summarize(rounds, cfg), "rounds": rounds}


def _engine_decode_ms(row: dict[str, Any]) -> list[float]:
    return [ms for ms, dec, pre in row["engine"]["steps"] if dec == row["batch"] and pre == 0]


def _round_line(row: dict[str, Any]) -> str:
    eng = statistics.median(_engine_decode_ms(row))
    tpot = statistics.median(steady_gaps_ms([s["arrivals_s"] for s in row["worker"]["streams"]]))
    return f"engine step {eng:.1f} ms, worker TPOT {tpot:.1f} ms ({tpot / eng:.2f}x)"


def summarize(rounds: list[dict[str, Any]], cfg: WorkerVsEngineConfig) -> dict[str, Any]:
    """Per batch size: pooled p50s, the ratio, per-round ratios, and token agreement."""
    out = {}
    for batch in cfg.batch_sizes:
        rows = [r for r in rounds if r["batch"] == batch]
        eng = [ms for r in rows for ms in _engine_decode_ms(r)]
        gaps = [g for r in rows
                for g in steady_gaps_ms([s["arrivals_s"] for s in r["worker"]["streams"]])]
        loop = [ms for r in rows for ms in r["worker"]["loop_step_ms"]]
        per_round = [statistics.median(steady_gaps_ms([s["arrivals_s"] for s in r["worker"]
                                                       ["streams"]]))
                     / statistics.median(_engine_decode_ms(r)) for r in rows]
        same = sum(e == s["tokens"] for r in rows
                   for e, s in zip(r["engine"]["tokens"], r["worker"]["streams"], strict=True))
        eng_p50, tpot_p50 = statistics.median(eng), statistics.median(gaps)
        # The second-busiest thread of each side: the stepping thread's OpenMP team thread
        team = {side: {k: statistics.median(r[side]["threads"][1][k] for r in rows)
                       for k in ("cpu_pct", "sleeps_per_step")}
                for side in ("engine", "worker") if all(len(r[side].get("threads", ())) > 1
                                                        for r in rows)}
        out[str(batch)] = {
            "engine_step_ms_p50": eng_p50, "worker_tpot_ms_p50": tpot_p50,
            "worker_tpot_ms_mean": statistics.fmean(gaps),
            "worker_loop_step_ms_p50": statistics.median(loop) if loop else None,
            "ratio": tpot_p50 / eng_p50, "ratio_per_round": per_round,
            "loop_step_ratio": statistics.median(loop) / eng_p50 if loop else None,
            "requests_same_tokens": same, "requests": batch * len(rows),
            "omp_team_thread": team}
    return out


def format_table(doc: dict[str, Any]) -> str:
    lines = ["| batch | engine step p50 ms | worker TPOT p50 ms | ratio (per round) | worker "
             "in-loop step p50 ms | team thread % core, sleeps/step: engine / worker | "
             "same tokens |", "|---|---|---|---|---|---|---|"]
    for batch, s in doc["summary"].items():
        loop = "-" if s["worker_loop_step_ms_p50"] is None else \
            f"{s['worker_loop_step_ms_p50']:.1f} ({s['loop_step_ratio']:.2f}x)"
        rounds = ", ".join(f"{x:.2f}" for x in s["ratio_per_round"])
        team = s.get("omp_team_thread", {})
        team_cell = " / ".join(f"{team[k]['cpu_pct']:.0f} %, {team[k]['sleeps_per_step']:.1f}"
                               if k in team else "-" for k in ("engine", "worker"))
        lines.append(f"| {batch} | {s['engine_step_ms_p50']:.1f} | "
                     f"{s['worker_tpot_ms_p50']:.1f} | {s['ratio']:.2f}x ({rounds}) | {loop} | "
                     f"{team_cell} | "
                     f"{s['requests_same_tokens']}/{s['requests']} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = WorkerVsEngineConfig()
    p.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)),
                   help="comma list of concurrent streams")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds, help="runs per batch size and side")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads of the engine and of the worker (default: the cores "
                        "this process may use)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--weight-quantization", default=d.weight_quantization,
                   choices=WEIGHT_QUANTIZATION_CHOICES,
                   help="quantized linears on both sides (EngineConfig.weight_quantization; "
                        "w4a8 decodes through the native C step)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--label", default=None, help="result file suffix (default t<threads>)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)


def run_cli(args: argparse.Namespace) -> int:
    cfg = WorkerVsEngineConfig(
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
        threads=args.threads, dtype=args.dtype,
        weight_quantization=args.weight_quantization, seed=args.seed)
    doc = run(cfg)
    output = args.output_dir / f"worker_vs_engine_{args.label or f't{cfg.threads}'}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    return report(format_table(doc), output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.worker_vs_engine", __doc__.split("\n\n")[0],
                      add_arguments, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
