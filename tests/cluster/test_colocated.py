"""Colocated mode (one worker runs both phases) on a real local cluster."""

from __future__ import annotations

import pytest
import ray
from serving_helpers import run_concurrently, token_request, wait_until

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
