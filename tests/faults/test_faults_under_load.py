"""Faults under streaming load on one real 2 prefill + 2 decode cluster (embedded etcd, Ray,
NIXL, the default model). Each scenario asserts the suite's invariants (``conftest.py``);
each leaves every block free, so the next one starts from a healthy cluster:

- a decode / prefill worker that stops answering (SIGSTOP) rather than dying: its lease
  lapses, the router's probe fails, its calls are cancelled and the requests migrate or are
  retried; after SIGCONT it comes back as a new incarnation;
- etcd paused (SIGSTOP) for three lease TTLs, and etcd killed (the supervisor restarts it):
  streams go on, workers re-register;
- clients cancelling at each step, and slow consumers that do not read their streams.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from faults import (
    NEW_TOKENS,
    check_outcomes,
    start_load,
    stopped,
    wait_all_free,
    wait_for,
    worker_pid,
)
from serving_helpers import cluster_directory, run_concurrently, running_cluster, token_request

from scission.cluster.client import connect
from scission.cluster.launcher import ClusterConfig, worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.workers import WorkerRole

LEASE_TTL_S = 3


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(ClusterConfig(num_prefill=2, num_decode=2, lease_ttl_s=LEASE_TTL_S,
                                       threads_per_worker=1, hold_timeout_s=60,
                                       engine=EngineConfig(cache=CacheConfig(num_blocks=256)))) as c:
        yield c


@pytest.fixture(scope="module")
def directory(cluster):
    with cluster_directory(cluster) as d:
        yield d


def running(cluster, directory, worker_id: str) -> int:
    info = directory.get(worker_id)
    return worker_stub(info.endpoint, cluster.cluster_token).GetStats(
        wpb.StatsRequest(), timeout=5).num_running


def test_decode_worker_stops_answering_mid_stream(cluster, directory, fault_prompts,
                                                  fault_reference):
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        load = start_load(cluster.router_address, fault_prompts, NEW_TOKENS, pool)
        wait_for(lambda: min(load.tokens_seen) >= 3, 180, "every stream under way")
        victim = max(("decode-0", "decode-1"), key=lambda w: running(cluster, directory, w))
        before = directory.get(victim)
        with stopped(worker_pid(cluster, victim)):
            wait_for(lambda: directory.get(victim) is None, LEASE_TTL_S + 5, "lease lapses")
            results = load.results()
    counts = check_outcomes(results, fault_reference, max_failed=0)
    print(counts)
    wait_for(lambda: directory.get(victim) is not None
             and directory.get(victim).incarnation != before.incarnation, 60, "back")
    wait_all_free(cluster, directory)
    check_outcomes([(r, 0.0) for r in run_concurrently(
        cluster.router_address, [token_request(p, NEW_TOKENS) for p in fault_prompts[:4]], 4)],
        fault_reference, max_failed=0)


def test_prefill_worker_stops_answering(cluster, directory, fault_prompts, fault_reference):
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        victim = "prefill-0"
        before = directory.get(victim)
        with stopped(worker_pid(cluster, victim)):
            load = start_load(cluster.router_address, fault_prompts, NEW_TOKENS, pool)
            wait_for(lambda: directory.get(victim) is None, LEASE_TTL_S + 5, "lease lapses")
            results = load.results()
    counts = check_outcomes(results, fault_reference, max_failed=0)
    print(counts)
    assert WorkerRole.PREFILL == before.role
    wait_all_free(cluster, directory)


def _all_registered(directory) -> bool:
    return {w.worker_id for w in directory.workers()} == {"prefill-0", "prefill-1", "decode-0",
                                                          "decode-1"}


def test_etcd_paused_longer_than_the_lease_ttl(cluster, directory, fault_prompts,
                                               fault_reference):
    """Streams keep going while etcd is stopped for 3 TTLs (the router's view is stale, not
    empty); when it resumes the leases lapse, workers re-register, streams are not cut (the
    probe finds every worker answering) and every request has its exact tokens."""
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        load = start_load(cluster.router_address, fault_prompts, NEW_TOKENS, pool)
        wait_for(lambda: min(load.tokens_seen) >= 2, 180, "every stream under way")
        with stopped(cluster.etcd.pid):
            time.sleep(3 * LEASE_TTL_S)  # the fault itself lasts this long
        results = load.results()
    check_outcomes(results, fault_reference, max_failed=0)
    wait_for(lambda: _all_registered(directory), 60, "every worker registered again")
    wait_all_free(cluster, directory)


def test_etcd_killed_and_restarted_by_its_supervisor(cluster, directory, fault_prompts,
                                                     fault_reference):
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        load = start_load(cluster.router_address, fault_prompts, NEW_TOKENS, pool)
        wait_for(lambda: min(load.tokens_seen) >= 2, 180, "every stream under way")
        old_pid = cluster.etcd.pid
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: cluster.etcd.pid != old_pid and cluster.etcd.is_running, 30,
                 "etcd restarted")
        results = load.results()
    check_outcomes(results, fault_reference, max_failed=0)
    wait_for(lambda: _all_registered(directory), 60, "every worker registered again")
    wait_all_free(cluster, directory)


def test_clients_cancel_at_each_step_while_others_stream(cluster, directory, fault_prompts,
                                                         fault_reference):
    """12 streams cancelled after 0 (right after sending), 1 (the first token: prefill done,
    the pull under way or just done), 2 and 8 chunks, while 6 others run to the end: those 6
    have their exact tokens and every block and hold is free afterwards."""
    stub = connect(cluster.router_address)
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        load = start_load(cluster.router_address, fault_prompts[:6], NEW_TOKENS, pool)

        def cancel_after(i: int, num_chunks: int) -> int:
            stream = stub.Generate(token_request(fault_prompts[i], NEW_TOKENS), timeout=120)
            seen = 0
            try:
                while seen < num_chunks:
                    next(stream)
                    seen += 1
            finally:
                stream.cancel()
            return seen

        cancels = [pool.submit(cancel_after, i % len(fault_prompts), n)
                   for i, n in enumerate([0, 1, 2, 8] * 3)]
        assert [c.result(timeout=300) for c in cancels] == [0, 1, 2, 8] * 3
        results = load.results()
    check_outcomes(results, fault_reference[:6], max_failed=0)
    wait_all_free(cluster, directory)


def test_slow_consumers_do_not_hold_up_the_others(cluster, directory, fault_prompts,
                                                  fault_reference):
    """4 streams left unread while 8 others run to the end with their exact tokens; then the
    4 are read and have their exact tokens too."""
    stub = connect(cluster.router_address)
    slow = [stub.Generate(token_request(p, NEW_TOKENS), timeout=300) for p in fault_prompts[:4]]
    with ThreadPoolExecutor(8) as pool:
        load = start_load(cluster.router_address, fault_prompts[4:], NEW_TOKENS, pool)
        results = load.results()
    check_outcomes(results, fault_reference[4:], max_failed=0)
    for i, stream in enumerate(slow):
        try:
            tokens = [t for chunk in stream for t in chunk.token_ids]
        except grpc.RpcError as e:
            raise AssertionError(f"slow stream {i}: {e.code()} {e.details()}") from None
        assert tokens == fault_reference[i], f"slow stream {i} differs"
    wait_all_free(cluster, directory)
