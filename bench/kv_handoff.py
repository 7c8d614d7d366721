"""The KV hand-off in a running cluster (1 prefill + 1 decode worker, the default model).

The workers expose no per-phase timings, so the parts are measured from outside, each
request alone (no other load), prefix caching off (every pull moves the whole prompt):

- ``router`` path (public ``Generate``, token ids): ``ttft_ms`` = client send -> first token;
  ``t2_ms`` = client send -> second token; ``step_ms`` = median gap between later tokens.
  scission streams the first token as soon as ``Prefill`` returns, so the hand-off is not in
  TTFT: it delays the *second* token (``t2_ms - ttft_ms`` = Decode call + pull + first step).
- ``direct`` path (the workers' internal API with the cluster token): ``prefill_ms`` = the
  ``Prefill`` RPC (queue + prompt forward + first token + pin + handle);
  ``decode_first_ms`` = ``Decode`` RPC -> its first chunk (block reservation, peer lookup in
  the directory, descriptor plan, NIXL READ with its notification, joining the batch, one
  decode step, the chunk's way back); ``step_ms`` = median gap between its later chunks.
- ``read_ms``: ``KVTransferAgent.read_blocks``'s own DEBUG log in the decode worker (NIXL
  descriptor lists + transfer request + READ + release; not the Python descriptor plan),
  enabled by ``SCISSION_LOG_LEVEL=DEBUG`` only. One READ per ``Decode``, matched in order.

``handoff_ms`` = ``decode_first_ms - step_ms``: what the hand-off adds on top of the decode
step the request needs anyway; ``other_ms`` = ``handoff_ms - read_ms``.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

READ_LOG = re.compile(r"READ (\d+) descriptors, (\d+) bytes from \S+ in ([\d.]+) ms")
_VOCAB_RANGE = (100, 40000)  # plain tokens of SmolLM2's 49,152 (no special tokens)


@dataclass(frozen=True)
class HandoffConfig:
    prompt_tokens: tuple[int, ...] = (256, 1024, 4096)
    requests: int = 4  # per prompt length and path
    max_tokens: int = 8
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.max_tokens < 4:
            raise ValueError(f"requests >= 1 and max_tokens >= 4 needed: {self}")


def parse_read_logs(text: str) -> list[dict[str, float]]:
    """``KVTransferAgent``'s DEBUG READ lines -> ``{"descriptors", "bytes", "read_ms"}``."""
    return [{"descriptors": int(d), "bytes": int(b), "read_ms": float(ms)}
            for d, b, ms in READ_LOG.findall(text)]


def chunk_times(chunks, start_s: float) -> list[float]:
    """Arrival (ms after ``start_s``) of every chunk that carries tokens, one per token."""
    out: list[float] = []
    for c in chunks:
        now_ms = (time.perf_counter() - start_s) * 1e3
        out.extend([now_ms] * len(c.token_ids))
    return out


def _gaps_median(times_ms: list[float], first: int) -> float:
    gaps = [b - a for a, b in zip(times_ms[first:], times_ms[first + 1:], strict=False)]
    return statistics.median(gaps)


def _router_request(stub, ids: list[int], cfg: HandoffConfig) -> dict[str, float]:
    from scission.proto.scission.v1 import generation_pb2 as pb

    sampling = pb.SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, ignore_eos=True)
    start_s = time.perf_counter()
    times = chunk_times(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                         sampling=sampling), timeout=600),
                        start_s)
    assert len(times) == cfg.max_tokens, f"{len(times)} tokens, expected {cfg.max_tokens}"
    return {"ttft_ms": times[0], "t2_ms": times[1], "step_ms": _gaps_median(times, 1)}


def _direct_request(prefill, decode, ids: list[int], cfg: HandoffConfig) -> dict[str, float]:
    from scission.proto.scission.internal.v1 import worker_pb2 as wpb

    rid = "kvbench-" + uuid.uuid4().hex
    sampling = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=cfg.max_tokens,
                                  ignore_eos=True)
    t0 = time.perf_counter()
    first = prefill.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=ids,
                                               sampling=sampling), timeout=600)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    req = wpb.DecodeRequest(request_id=rid, prompt_token_ids=ids,
                            first_token_id=first.first_token_id, sampling=sampling,
                            transfer_handle=first.transfer_handle)
    t1 = time.perf_counter()
    times = chunk_times(decode.Decode(req, timeout=600), t1)
    assert len(times) == cfg.max_tokens - 1, f"{len(times)} decode tokens"
    return {"prefill_ms": prefill_ms, "decode_first_ms": times[0],
            "step_ms": _gaps_median(times, 0)}


def _worker_log(pid: int) -> Path:
    """The Ray worker process's stderr file (where its logging goes)."""
    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()  # this driver's session
    found = glob.glob(os.path.join(logs_dir, f"worker-*-{pid}.err"))
    assert len(found) == 1, f"log of worker pid {pid}: {found}"
    return Path(found[0])


def code_paths() -> dict[str, str]:
    """Where this process imports scission from (a Ray worker must use the benchmark's
    checkout, not a tree others edit)."""
    import scission.engine
    import scission.kv_transfer.agent

    return {"scission.engine": scission.engine.__file__,
            "scission.kv_transfer.agent": scission.kv_transfer.agent.__file__}


def run_handoff(cfg: HandoffConfig) -> dict[str, Any]:
    """Start the cluster, run every request, stop it; raw samples and READ log records."""
    import ray

    from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
    from scission.engine.config import CacheConfig, EngineConfig
    from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
    from scission.registry.directory import WorkerDirectory
    from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole
    from scission.registry.workers import connect as etcd_connect

    os.environ["SCISSION_LOG_LEVEL"] = "DEBUG"  # the workers inherit it: READ durations
    cluster = LocalCluster(ClusterConfig(
        num_prefill=1, num_decode=1,
        engine=EngineConfig(dtype=cfg.dtype, cache=CacheConfig(enable_prefix_caching=False))))
    rng = random.Random(cfg.seed)
    samples: list[dict[str, Any]] = []
    try:
        address = cluster.start()
        paths = {"driver": code_paths(),
                 "ray_worker": ray.get(ray.remote(num_cpus=0)(code_paths).remote(), timeout=60)}
        logger.info("code paths: %s", paths)
        etcd = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
        with WorkerDirectory(etcd, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
            pre, dec = d.workers(WorkerRole.PREFILL)[0], d.workers(WorkerRole.DECODE)[0]
        etcd.close()
        decode_pid = ray.get(cluster.workers[dec.worker_id].pid.remote(), timeout=30)
        router = pb_grpc.GenerationStub(grpc.insecure_channel(address))
        prefill = worker_stub(pre.endpoint, cluster.cluster_token)
        decode = worker_stub(dec.endpoint, cluster.cluster_token)
        warm = [rng.randrange(*_VOCAB_RANGE) for _ in range(min(cfg.prompt_tokens))]
        _router_request(router, warm, cfg)  # first pull: add_peer, channels, first-call costs
        _direct_request(prefill, decode, warm, cfg)
        for n in cfg.prompt_tokens:
            for i in range(cfg.requests):
                ids = [rng.randrange(*_VOCAB_RANGE) for _ in range(n)]
                for path in (("router", "direct") if i % 2 == 0 else ("direct", "router")):
                    row = (_router_request(router, ids, cfg) if path == "router"
                           else _direct_request(prefill, decode, ids, cfg))
                    samples.append({"path": path, "num_tokens": n, **row})
                logger.info("hand-off: %d tokens, request %d/%d done", n, i + 1, cfg.requests)
        time.sleep(1.0)  # let the worker's log reach its file
        reads = parse_read_logs(_worker_log(decode_pid).read_text(errors="replace"))
    finally:
        cluster.stop()
    return {"samples": samples, "reads": reads, "warmup_reads": 2, "code_paths": paths}
