"""Router overhead per request: the same requests through the router and straight to the worker.

``python -m scission.bench.router_overhead`` starts a local cluster with one colocated worker
(the router then adds no disaggregation hop, only its own work: validation, tokenization for
chat input, prompt hashing, placement, the extra gRPC hop and re-streaming), and sends
``--num-requests`` sequential requests on each of three paths, interleaved so that machine
noise hits all paths alike:

- ``direct``: the worker's internal ``Generate`` with the prompt's token ids;
- ``router_ids``: the public ``Generate`` with the same token ids;
- ``router_chat``: the public ``Generate`` with the prompt as chat text (adds tokenization and
  the chat template on the router; the worker sees the same ids as ``direct``).

Every request has a fresh random prompt (prefix caching is off, so each path computes the whole
prompt) and ``max_tokens`` output tokens, greedy with EOS ignored. Per path: client-measured
TTFT and E2E (p50/p90); router overhead = median (and IQR) over rounds of the paired difference
path − direct (same prompt, same round), for TTFT and for E2E; per-token forwarding overhead =
(E2E overhead − TTFT overhead) / (output tokens − 1).
Writes ``bench/results/router_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np

from scission.bench.cli_main import bench_main, report
from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.engine.tokenizer import default_model_path, load_tokenizer
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as wpb_grpc
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.registry.workers import connect as etcd_connect

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "router_overhead.json"
PATHS = ("direct", "router_ids", "router_chat")
WORDS = ("river", "light", "stone", "garden", "window", "music", "paper", "cloud", "winter",
         "market", "bridge", "letter", "forest", "engine", "summer", "island")


@dataclass(frozen=True)
class RouterOverheadConfig:
    num_requests: int = 60  # per path
    prompt_words: int = 48  # words of the chat prompt (~60-70 tokens with the template)
    max_tokens: int = 16
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.prompt_words < 1 or self.max_tokens < 2:
            raise ValueError(f"num_requests, prompt_words >= 1 and max_tokens >= 2: {self}")


@dataclass
class Sample:
    path: str
    ttft_ms: float
    e2e_ms: float
    output_tokens: int


def _timed_stream(chunks) -> tuple[float, float, int]:
    """(TTFT ms, E2E ms, tokens) of a response stream, timed from this call."""
    start, ttft_s, tokens = time.perf_counter(), None, 0
    for chunk in chunks:
        if chunk.token_ids and ttft_s is None:
            ttft_s = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return (ttft_s or 0.0) * 1e3, (time.perf_counter() - start) * 1e3, tokens


def _public_request(text: str, ids: list[int] | None,
                    cfg: RouterOverheadConfig) -> pb.GenerateRequest:
    """The public request: token ids when given, else ``text`` as one user chat message."""
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, ignore_eos=True)
    if ids is not None:
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])
    return pb.GenerateRequest(chat=chat, sampling=sampling)


def run_path(path: str, text: str, ids: list[int], cfg: RouterOverheadConfig,
             router: pb_grpc.GenerationStub, worker: wpb_grpc.WorkerStub) -> Sample:
    if path == "direct":
        sampling = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=cfg.max_tokens,
                                      ignore_eos=True)
        req = wpb.GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=ids,
                                  sampling=sampling)
        ttft, e2e, n = _timed_stream(worker.Generate(req, timeout=120))
    else:
        req = _public_request(text, ids if path == "router_ids" else None, cfg)
        ttft, e2e, n = _timed_stream(router.Generate(req, timeout=120))
    if n != cfg.max_tokens:
        raise RuntimeError(f"{path}: {n} tokens streamed, expected {cfg.max_tokens}")
    return Sample(path, ttft, e2e, n)


def summarize(samples: list[Sample], cfg: RouterOverheadConfig) -> dict[str, object]:
    by_path = {p: [s for s in samples if s.path == p] for p in PATHS}
    stats = {}
    for path, rows in by_path.items():
        ttft, e2e = [s.ttft_ms for s in rows], [s.e2e_ms for s in rows]
        stats[path] = {"n": len(rows),
                       "ttft_ms": {"p50": statistics.median(ttft),
                                   "p90": float(np.percentile(ttft, 90))},
                       "e2e_ms": {"p50": statistics.median(e2e),
                                  "p90": float(np.percentile(e2e, 90))}}
    direct = by_path["direct"]
    overhead = {}
    for path in PATHS[1:]:  # paired: round i of ``path`` minus round i of ``direct``
        d_ttft = [s.ttft_ms - b.ttft_ms for s, b in zip(by_path[path], direct, strict=True)]
        d_e2e = [s.e2e_ms - b.e2e_ms for s, b in zip(by_path[path], direct, strict=True)]
        overhead[path] = {
            "ttft_ms_p50": statistics.median(d_ttft),
            "ttft_ms_iqr": [float(np.percentile(d_ttft, 25)), float(np.percentile(d_ttft, 75))],
            "e2e_ms_p50": statistics.median(d_e2e),
            "e2e_ms_iqr": [float(np.percentile(d_e2e, 25)), float(np.percentile(d_e2e, 75))],
            "per_token_ms": (statistics.median(d_e2e) - statistics.median(d_ttft))
            / (cfg.max_tokens - 1)}
    return {"paths": stats, "overhead_vs_direct": overhead}


def prompts(cfg: RouterOverheadConfig, tokenizer) -> list[tuple[str, list[int]]]:
    """(chat text, token ids of its templated chat) per request; fresh words each time."""
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.num_requests):
        text = " ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words))
        out.append((text, tokenizer.apply_chat_template([{"role": "user", "content": text}])))
    return out


def run(cfg: RouterOverheadConfig, output: Path = RESULTS) -> dict[str, object]:
    cluster = LocalCluster(ClusterConfig(
        num_colocated=1, threads_per_worker=cfg.threads,
        engine=EngineConfig(cache=CacheConfig(enable_prefix_caching=False))))
    samples: list[Sample] = []
    try:
        address = cluster.start()
        etcd = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
        with WorkerDirectory(etcd, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
            info = d.workers()[0]
        etcd.close()
        tokenizer = load_tokenizer(cluster.config.engine.model_path or default_model_path())
        router = pb_grpc.GenerationStub(grpc.insecure_channel(address))
        worker = worker_stub(info.endpoint, cluster.cluster_token)
        work = prompts(cfg, tokenizer)
        for path in PATHS:  # warm-up: channels, first-call costs
            run_path(path, *work[0], cfg, router, worker)
        rng = random.Random(cfg.seed + 1)
        for i, (text, ids) in enumerate(work):
            for path in rng.sample(PATHS, len(PATHS)):  # fresh order each round
                samples.append(run_path(path, text, ids, cfg, router, worker))
            logger.info("round %d/%d done", i + 1, cfg.num_requests)
    finally:
        cluster.stop()
    doc = {"benchmark": "router_overhead", "date": datetime.now(UTC).isoformat(),
           "config": asdict(cfg), **summarize(samples, cfg),
           "samples": [asdict(s) for s in samples]}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def format_table(doc: dict) -> str:
    lines = ["| path | TTFT p50 / p90 ms | E2E p50 / p90 ms | TTFT overhead p50 [IQR] ms "
             "| E2E overhead p50 [IQR] ms | per-token overhead ms |", "|---|---|---|---|---|---|"]
    for path, st in doc["paths"].items():
        ov = doc["overhead_vs_direct"].get(path)
        extra = ([_with_iqr(ov, "ttft_ms"), _with_iqr(ov, "e2e_ms"),
                  f"{ov['per_token_ms']:.2f}"] if ov else ["-", "-", "-"])
        lines.append("| " + " | ".join(
            [path, f"{st['ttft_ms']['p50']:.1f} / {st['ttft_ms']['p90']:.1f}",
             f"{st['e2e_ms']['p50']:.1f} / {st['e2e_ms']['p90']:.1f}", *extra]) + " |")
    return "\n".join(lines)


def _with_iqr(overhead: dict, key: str) -> str:
    lo, hi = overhead[f"{key}_iqr"]
    return f"{overhead[f'{key}_p50']:.2f} [{lo:.2f}, {hi:.2f}]"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = RouterOverheadConfig()
    p.add_argument("--num-requests", type=int, default=d.num_requests, help="requests per path")
    p.add_argument("--prompt-words", type=int, default=d.prompt_words,
                   help="words per chat prompt (random, fresh per request)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="output tokens")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads of the worker")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON result file")


def _run(args: argparse.Namespace) -> int:
    cfg = RouterOverheadConfig(num_requests=args.num_requests, prompt_words=args.prompt_words,
                               max_tokens=args.max_tokens, threads=args.threads, seed=args.seed)
    return report(format_table(run(cfg, args.output)), args.output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.router_overhead", __doc__.split("\n\n")[0],
                      _add_arguments, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
