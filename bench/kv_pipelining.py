"""Pipelined vs plain KV hand-off in one running cluster (1 prefill + 1 decode worker).

Both hand-offs run on the same workers, interleaved per prompt, through the workers'
internal API with the cluster token, as the router drives them (``router/flows.py``):

- ``plain``: ``Prefill``; when it returns (TTFT) ``Decode`` with its transfer handle, which
  pulls the whole prompt's KV and streams from the second token on;
- ``pipelined``: ``Prefill`` (with a pipeline secret) and ``Decode`` (with the pipeline) sent
  together; the decode worker pulls each piece of KV as the prefill publishes it, the rest
  after the prefill's final message (``decode_worker/pipelined_pull.py``).

Per request: ``ttft_ms`` = send -> ``Prefill`` returned (the first token; the prefill time
alone, queueing included); ``t2_ms`` = send -> the first ``Decode`` chunk (the second token);
``gap_ms`` = ``t2_ms - ttft_ms``; ``step_ms`` = median gap between later chunks. Prefix
caching is off, so every prompt is prefilled and pulled whole. ``pieces`` = the decode
worker's ``num_kv_pipelined_reads_total`` gained by the request (READs before the final one).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import secrets
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from scission.bench.kv_handoff import _VOCAB_RANGE, _gaps_median, chunk_times, code_paths

logger = logging.getLogger(__name__)


def _request(prefill, decode, ids: list[int], max_tokens: int, pipelined: bool,
             pool: ThreadPoolExecutor) -> dict[str, float]:
    from scission.proto.scission.internal.v1 import worker_pb2 as wpb

    rid, secret = "kvpipe-" + uuid.uuid4().hex, secrets.token_bytes(16) if pipelined else b""
    sampling = wpb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                  ignore_eos=True)
    t0 = time.perf_counter()
    first = prefill.Prefill.future(wpb.PrefillRequest(
        request_id=rid, prompt_token_ids=ids, sampling=sampling, pipeline_secret=secret),
        timeout=600)
    if pipelined:
        chunks = pool.submit(lambda: chunk_times(decode.Decode(wpb.DecodeRequest(
            request_id=rid, prompt_token_ids=ids, sampling=sampling,
            pipeline=wpb.KVPipeline(prefill_worker_id="prefill-0", pipeline_secret=secret)),
            timeout=600), t0))
        resp = first.result()
        ttft_ms = (time.perf_counter() - t0) * 1e3
        times = chunks.result()
    else:
        resp = first.result()
        ttft_ms = (time.perf_counter() - t0) * 1e3
        times = chunk_times(decode.Decode(wpb.DecodeRequest(
            request_id=rid, prompt_token_ids=ids, first_token_id=resp.first_token_id,
            sampling=sampling, transfer_handle=resp.transfer_handle), timeout=600), t0)
    assert len(times) == max_tokens - 1, f"{len(times)} decode tokens"
    return {"ttft_ms": ttft_ms, "t2_ms": times[0], "gap_ms": times[0] - ttft_ms,
            "step_ms": _gaps_median(times, 0), "first_token_id": resp.first_token_id}


def run(prompt_tokens: list[int], requests: int, max_tokens: int, seed: int) -> dict[str, Any]:
    from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
    from scission.engine.config import CacheConfig, EngineConfig
    from scission.proto.scission.internal.v1 import worker_pb2 as wpb
    from scission.registry.directory import WorkerDirectory
    from scission.registry.workers import EtcdClientConfig, RegistryConfig
    from scission.registry.workers import connect as etcd_connect

    cluster = LocalCluster(ClusterConfig(num_prefill=1, num_decode=1, engine=EngineConfig(
        cache=CacheConfig(enable_prefix_caching=False))))
    rng, samples = random.Random(seed), []
    pool = ThreadPoolExecutor(2)
    try:
        cluster.start()
        etcd = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
        with WorkerDirectory(etcd, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
            prefill = worker_stub(d.get("prefill-0").endpoint, cluster.cluster_token)
            decode = worker_stub(d.get("decode-0").endpoint, cluster.cluster_token)
        etcd.close()

        def pieces() -> int:
            return decode.GetStats(wpb.StatsRequest(), timeout=10).num_kv_pipelined_reads_total

        warm = [rng.randrange(*_VOCAB_RANGE) for _ in range(256)]
        for pipelined in (False, True):  # first pull: add_peer, channels
            _request(prefill, decode, warm, max_tokens, pipelined, pool)
        for n in prompt_tokens:
            for i in range(requests):
                ids = [rng.randrange(*_VOCAB_RANGE) for _ in range(n)]
                tokens = {}
                for pipelined in ((False, True) if i % 2 == 0 else (True, False)):
                    before = pieces()
                    row = _request(prefill, decode, ids, max_tokens, pipelined, pool)
                    tokens[pipelined] = row.pop("first_token_id")
                    samples.append({"num_tokens": n, "pipelined": pipelined,
                                    "pieces": pieces() - before, **row})
                    logger.info("%s", samples[-1])
                assert tokens[False] == tokens[True], "first tokens differ"
    finally:
        pool.shutdown()
        cluster.stop()
    return {"samples": samples, "code_paths": code_paths()}


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (tokens, mode) and the pipelined / plain ratios."""
    rows = []
    for n in sorted({s["num_tokens"] for s in samples}):
        med = {}
        for mode in (False, True):
            cell = [s for s in samples if s["num_tokens"] == n and s["pipelined"] is mode]
            med[mode] = {k: statistics.median(s[k] for s in cell)
                         for k in ("ttft_ms", "t2_ms", "gap_ms", "step_ms", "pieces")}
        rows.append({"num_tokens": n, "plain": med[False], "pipelined": med[True],
                     "ratio": {k: med[True][k] / med[False][k] for k in
                               ("ttft_ms", "t2_ms", "gap_ms")}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--requests", type=int, default=3, help="per length and mode")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON file for samples + summary")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    result = run(args.prompt_tokens, args.requests, args.max_tokens, args.seed)
    result["summary"] = summarize(result["samples"])
    text = json.dumps(result, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
