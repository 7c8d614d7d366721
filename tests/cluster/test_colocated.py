"""Colocated mode (one worker runs both phases) on a real local cluster."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray
from serving_helpers import (
    all_blocks_free,
    cluster_directory,
    run_concurrently,
    token_request,
    wait_until,
)

from scission.cluster.client import connect
from scission.cluster.launcher import ClusterConfig, LocalCluster
from scission.engine.config import CacheConfig, EngineConfig


@pytest.fixture(scope="module")
def colocated_cluster():
    c = LocalCluster(ClusterConfig(num_colocated=2, threads_per_worker=1,
                                   engine=EngineConfig(cache=CacheConfig(num_blocks=384))))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_colocated_tokens_equal_engine_alone(colocated_cluster, chat_prompt_ids,
                                             engine_reference):
    """Every prompt, 16 in flight, on 2 colocated workers gives exactly the engine-alone
    greedy tokens; prefill and decode ran on the same worker."""
    reqs = [token_request(ids, len(ref)) for ids, ref in zip(chat_prompt_ids, engine_reference,
                                                               strict=True)]
    results = run_concurrently(colocated_cluster.router_address, reqs, in_flight=16)
    for i, (res, ref) in enumerate(zip(results, engine_reference, strict=True)):
        assert res.error == "", res.error
        assert res.token_ids == ref, f"prompt {i} differs"
        assert res.prefill_worker == res.decode_worker
        assert res.decode_worker in ("colocated-0", "colocated-1")
    assert {r.decode_worker for r in results} == {"colocated-0", "colocated-1"}


def test_crashed_router_is_restarted_on_the_same_address(colocated_cluster, chat_prompt_ids,
                                                         engine_reference):
    """A router process that dies is restarted by Ray on the same address, rebuilds its view
    of the workers from etcd and serves exactly the reference tokens again."""
    address = colocated_cluster.router_address
    old_pid = colocated_cluster.crash_router()

    def serves() -> bool:
        res = run_concurrently(address, [token_request(chat_prompt_ids[0], 4)], 1)[0]
        return res.error == ""

    wait_until(serves, 120, interval_s=0.5)
    assert ray.get(colocated_cluster.router.pid.remote(), timeout=30) != old_pid
    results = run_concurrently(address, [token_request(ids, 8) for ids in chat_prompt_ids[:4]], 4)
    for i, res in enumerate(results):
        assert res.error == "", res.error
        assert res.token_ids == engine_reference[i][:8], f"prompt {i} differs"


def test_router_crash_ends_the_streams_in_flight_at_once(colocated_cluster, chat_prompt_ids,
                                                         engine_reference):
    """4 streams are mid-generation (first chunk received, 400 tokens asked, a 300 s
    deadline) when the router is SIGKILLed: every client sees UNAVAILABLE within seconds,
    not at its deadline; the workers abort the orphaned requests (every block free) and the
    restarted router serves the reference tokens."""
    stub = connect(colocated_cluster.router_address)
    started = [threading.Event() for _ in range(4)]
    ended: list[tuple[grpc.StatusCode | None, float]] = [(None, 0.0)] * 4

    def stream(i: int) -> None:
        try:
            for _ in stub.Generate(token_request(chat_prompt_ids[i], 400), timeout=300):
                started[i].set()
            ended[i] = (grpc.StatusCode.OK, time.monotonic())
        except grpc.RpcError as e:
            ended[i] = (e.code(), time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: all(e.is_set() for e in started), 120)
    colocated_cluster.crash_router()
    crashed_s = time.monotonic()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client still waits on a dead router"
    assert [code for code, _ in ended] == [grpc.StatusCode.UNAVAILABLE] * 4, ended
    assert max(end for _, end in ended) - crashed_s < 30  # the deadline is 300 s
    with cluster_directory(colocated_cluster) as directory:
        wait_until(lambda: all_blocks_free(colocated_cluster, directory), 60)
    wait_until(lambda: run_concurrently(colocated_cluster.router_address,
                                        [token_request(chat_prompt_ids[0], 4)], 1)[0].error
               == "", 120, interval_s=0.5)
    [res] = run_concurrently(colocated_cluster.router_address,
                             [token_request(chat_prompt_ids[1], 8)], 1)
    assert res.error == "" and res.token_ids == engine_reference[1][:8]
