"""Helpers for cluster tests (not collected: no test_ prefix)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from scission.cluster.client import GenerationResult, connect, generate
from scission.cluster.launcher import ClusterConfig, LocalCluster, worker_stub
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.registry.workers import connect as etcd_connect


@contextmanager
def running_cluster(config: ClusterConfig) -> Iterator[LocalCluster]:
    """A started ``LocalCluster``, stopped on exit (also after a failed start)."""
    cluster = LocalCluster(config)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def cluster_directory(cluster: LocalCluster) -> Iterator[WorkerDirectory]:
    """A started ``WorkerDirectory`` on the cluster's etcd and registry prefix."""
    client = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))
    with WorkerDirectory(client, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
        yield d


def worker_stats(cluster: LocalCluster, directory: WorkerDirectory,
                 worker_id: str) -> wpb.WorkerStats:
    """``GetStats`` of one registered worker, over its internal API with the cluster token."""
    stub = worker_stub(directory.get(worker_id).endpoint, cluster.cluster_token)
    return stub.GetStats(wpb.StatsRequest(), timeout=5)


def all_blocks_free(cluster: LocalCluster, directory: WorkerDirectory) -> bool:
    """Every registered worker (at least one) has all its KV blocks free and nothing held,
    running or waiting."""
    workers = directory.workers()
    for w in workers:  # the listed records: a worker may leave the directory meanwhile
        s = worker_stub(w.endpoint, cluster.cluster_token).GetStats(wpb.StatsRequest(),
                                                                     timeout=5)
        if s.num_free_blocks != s.num_blocks or s.num_held or s.num_running or s.num_waiting:
            return False
    return bool(workers)


def token_request(ids: list[int], max_tokens: int, **sampling) -> pb.GenerateRequest:
    sp = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sp)


def run_concurrently(address: str, requests: list[pb.GenerateRequest],
                     in_flight: int) -> list[GenerationResult]:
    stub = connect(address)
    with ThreadPoolExecutor(in_flight) as ex:
        return list(ex.map(lambda r: generate(stub, r, timeout_s=600), requests))


def wait_until(pred, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until ``pred()`` held; raises AssertionError after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pred():
            return time.monotonic() - start
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")
