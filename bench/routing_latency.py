"""Routing decision latency against a large prefix index, in process (no cluster, no etcd).

``python -m scission.bench.routing_latency`` fills a ``PrefixIndex`` with ``num_blocks`` real
block hashes (prompts of ``prompt_tokens`` random token ids hashed with ``engine.block_hash``,
spread over ``num_workers`` prefill workers), then times the router's decision for prompts of the
same length: ``PromptHasher`` (hash the prompt) + ``Placer.place`` (index match + cost + pick,
KV-aware, temperature 0) + ``insert_speculative``, exactly what ``GenerationServicer`` does per
request. Half the queries share a random-length prefix with an indexed prompt, half share none.
Reports p50/p99 per stage and in total, index build time and memory, as JSON in
``bench/results/routing_latency.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import numpy as np

from scission.bench.cli_main import bench_main, report
from scission.engine.block_hash import hash_prompt_blocks, hash_seed
from scission.registry.kv_index_watch import ChangeKind, IndexChange
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.config import PlacementConfig
from scission.router.placement import Placer
from scission.router.prefix_index import PrefixIndex, PromptHasher
from scission.router.worker_pool import WorkerLoad

logger = logging.getLogger(__name__)

MODEL_ID = "bench-model"
RESULTS = Path(__file__).resolve().parent / "results" / "routing_latency.json"
MAX_KEPT_PROMPTS = 1000  # indexed prompts kept to build hitting queries from


@dataclass(frozen=True)
class RoutingLatencyConfig:
    index_sizes: tuple[int, ...] = (10_000, 1_000_000)  # blocks in the index
    num_workers: int = 8  # prefill workers (plus one decode worker)
    prompt_tokens: int = 2048
    block_size: int = 16
    num_queries: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.index_sizes) < 1 or self.num_workers < 1 or self.num_queries < 1:
            raise ValueError(f"sizes, workers and queries must be >= 1: {self}")
        if self.prompt_tokens < self.block_size:
            raise ValueError("prompt_tokens must cover at least one block")


class StaticPool:
    """Fixed workers with fixed loads (``placement.WorkerView``)."""

    def __init__(self, infos: list[WorkerInfo], rng: random.Random) -> None:
        self.infos = infos
        self.loads = {w.worker_id: WorkerLoad(rng.randrange(0, 4096), rng.randrange(0, 2048),
                                              4096, rng.randrange(0, 32)) for w in infos}

    def workers(self, role: WorkerRole) -> list[WorkerInfo]:
        return [w for w in self.infos if w.role is role]

    def load(self, info: WorkerInfo) -> WorkerLoad:
        return self.loads[info.worker_id]


def make_info(worker_id: str, role: WorkerRole, block_size: int) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, endpoint="127.0.0.1:1", agent_name="",
                      agent_metadata=b"", kv_layout=msgpack.packb({}), num_blocks=4096,
                      block_size=block_size, model_id=MODEL_ID, started_at_s=0.0)


def random_prompt(rng: random.Random, num_tokens: int) -> list[int]:
    return np.random.default_rng(rng.getrandbits(64)).integers(100, 49_000, num_tokens).tolist()


def build_index(cfg: RoutingLatencyConfig, num_blocks: int, rng: random.Random,
                workers: list[str]) -> tuple[PrefixIndex, list[list[int]], float]:
    """Index with ``num_blocks`` hashes of whole prompts, applied in watch-sized batches of
    10k changes; returns it, up to ``MAX_KEPT_PROMPTS`` of its prompts (query material) and
    the seconds spent applying changes (prompt generation and hashing excluded)."""
    seed = hash_seed(MODEL_ID)
    blocks_per_prompt = cfg.prompt_tokens // cfg.block_size
    index = PrefixIndex(speculative_ttl_s=2.0)
    kept: list[list[int]] = []
    batch: list[IndexChange] = []
    apply_s, num_prompts, num_changes = 0.0, 0, 0
    while num_changes < num_blocks:
        prompt = random_prompt(rng, cfg.prompt_tokens)
        worker = workers[num_prompts % len(workers)]
        hashes = hash_prompt_blocks(seed, prompt, cfg.block_size)
        take = min(blocks_per_prompt, num_blocks - num_changes)
        batch.extend(IndexChange(ChangeKind.STORED, worker, h) for h in hashes[:take])
        num_changes += take
        num_prompts += 1
        if len(kept) < MAX_KEPT_PROMPTS:
            kept.append(prompt)
        if len(batch) >= 10_000 or num_changes == num_blocks:
            start = time.perf_counter()
            index.apply(batch)
            apply_s += time.perf_counter() - start
            batch = []
    return index, kept, apply_s


def make_queries(cfg: RoutingLatencyConfig, prompts: list[list[int]],
                 rng: random.Random) -> list[list[int]]:
    """Half share a random number of leading blocks with an indexed prompt, half nothing."""
    queries = []
    for i in range(cfg.num_queries):
        fresh = random_prompt(rng, cfg.prompt_tokens)
        if i % 2 == 0:
            shared = rng.randrange(1, cfg.prompt_tokens // cfg.block_size + 1) * cfg.block_size
            fresh[:shared] = rng.choice(prompts)[:shared]
        queries.append(fresh)
    return queries


def _rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _stats_us(samples_s: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_s) * 1e6
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return {"p50_us": p50, "p90_us": p90, "p99_us": p99, "mean_us": float(arr.mean())}


def time_decisions(cfg: RoutingLatencyConfig, num_blocks: int) -> dict[str, object]:
    rng = random.Random(cfg.seed)
    prefill = [f"prefill-{i}" for i in range(cfg.num_workers)]
    infos = [make_info(w, WorkerRole.PREFILL, cfg.block_size) for w in prefill]
    infos.append(make_info("decode-0", WorkerRole.DECODE, cfg.block_size))
    gc.collect()
    rss0 = _rss_bytes()
    index, prompts, build_s = build_index(cfg, num_blocks, rng, prefill)
    gc.collect()
    index_mib = (_rss_bytes() - rss0) / 2**20
    placer = Placer(PlacementConfig(), StaticPool(infos, rng), prefix_match=index.match)
    hasher = PromptHasher(lambda: infos)
    hash_s, match_s, place_s, total_s, hits = [], [], [], [], 0
    for tokens in make_queries(cfg, prompts, rng):
        t0 = time.perf_counter()
        blocks = hasher(tokens)
        t1 = time.perf_counter()
        placement = placer.place(len(tokens), blocks.block_hashes, blocks.block_size)
        index.insert_speculative(placement.prefill_worker.worker_id, blocks.block_hashes)
        t2 = time.perf_counter()
        index.match(blocks.block_hashes)
        t3 = time.perf_counter()
        hash_s.append(t1 - t0)
        place_s.append(t2 - t1)
        total_s.append(t2 - t0)
        match_s.append(t3 - t2)
        hits += placement.cached_prefix_tokens > 0
    return {"index_blocks": index.num_blocks, "build_s": build_s,
            "index_rss_mib": index_mib, "queries": cfg.num_queries,
            "queries_with_hit": hits, "hash": _stats_us(hash_s), "match": _stats_us(match_s),
            "place_incl_match_and_speculative": _stats_us(place_s),
            "decision_total": _stats_us(total_s)}


def run(cfg: RoutingLatencyConfig, output: Path = RESULTS) -> dict[str, object]:
    runs = []
    for num_blocks in cfg.index_sizes:
        logger.info("index of %d blocks ...", num_blocks)
        runs.append(time_decisions(cfg, num_blocks))
    doc = {"benchmark": "routing_latency", "date": datetime.now(UTC).isoformat(),
           "config": asdict(cfg), "runs": runs}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def format_table(doc: dict) -> str:
    lines = ["| index blocks | hash p50/p90/p99 us | match p50/p90/p99 us | place p50/p90/p99 us "
             "| decision p50/p90/p99 us | apply s | index RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        cells = [f"{r['index_blocks']:,}"]
        for key in ("hash", "match", "place_incl_match_and_speculative", "decision_total"):
            st = r[key]
            cells.append(f"{st['p50_us']:.0f} / {st['p90_us']:.0f} / {st['p99_us']:.0f}")
        cells += [f"{r['build_s']:.1f}", f"{r['index_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="10000,1000000", help="index sizes in blocks")
    p.add_argument("--workers", type=int, default=8, help="prefill workers")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="tokens per prompt")
    p.add_argument("--queries", type=int, default=5000, help="decisions timed per size")
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON result file")


def _run(args: argparse.Namespace) -> int:
    cfg = RoutingLatencyConfig(index_sizes=tuple(int(s) for s in args.sizes.split(",")),
                               num_workers=args.workers, prompt_tokens=args.prompt_tokens,
                               num_queries=args.queries)
    doc = run(cfg, args.output)
    return report(format_table(doc), args.output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.routing_latency", __doc__.split("\n\n")[0],
                      _add_arguments, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
