"""Elastic pools on a real cluster (Ray, etcd, NIXL, the default model): scale, drain, role
flip and replacement of a dead worker, each under concurrent streaming requests. Every
request must finish with exactly the engine-alone greedy tokens, and every KV block must
come back. The tests run in order on one cluster (2 prefill + 1 decode at start)."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from serving_helpers import token_request, wait_until

from scission.cluster.client import connect, generate
from scission.cluster.launcher import ClusterConfig, LocalCluster
from scission.cluster.launcher import worker_stub as launcher_worker_stub
from scission.engine.config import CacheConfig, EngineConfig
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as wpb_grpc
from scission.registry.directory import WorkerDirectory
from scission.registry.pools import CommandKind, CommandState, PoolStore, TargetWriter
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole
from scission.registry.workers import connect as etcd_connect

NEW_TOKENS = 48
DRAIN_DEADLINE_S = 3.0  # short: a drain under load migrates what still runs


@pytest.fixture(scope="module")
def cluster():
    cfg = ClusterConfig(num_prefill=2, num_decode=1, lease_ttl_s=3, threads_per_worker=1,
                        max_worker_restarts=0, max_workers=6, drain_deadline_s=DRAIN_DEADLINE_S,
                        control_metrics_port=0,
                        engine=EngineConfig(cache=CacheConfig(num_blocks=384)))
    c = LocalCluster(cfg)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def etcd(cluster):
    return etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,)))


@pytest.fixture(scope="module")
def directory(cluster, etcd):
    with WorkerDirectory(etcd, RegistryConfig(prefix=cluster.config.registry_prefix)) as d:
        yield d


@pytest.fixture(scope="module")
def store(cluster, etcd):
    return PoolStore(etcd, RegistryConfig(prefix=cluster.config.registry_prefix))


class Load:
    """Concurrent greedy streams; ``wait_streaming`` returns once every stream has seen
    tokens (so an action that follows hits requests that are running)."""

    def __init__(self, address: str, prompts: list[list[int]], references: list[list[int]]):
        self.stub = connect(address)
        self.references = [ref[:NEW_TOKENS] for ref in references]
        self.streamed = [0] * len(prompts)
        self.pool = ThreadPoolExecutor(len(prompts))
        self.futures = [self.pool.submit(self._run, i, ids) for i, ids in enumerate(prompts)]

    def _run(self, i: int, ids: list[int]):
        def on_text(_delta: str) -> None:
            self.streamed[i] += 1
        return generate(self.stub, token_request(ids, NEW_TOKENS), timeout_s=600,
                        on_text=on_text)

    def wait_streaming(self) -> None:
        wait_until(lambda: min(self.streamed) >= 2, 180, interval_s=0.01)

    def results_exact(self):
        """All results; asserts none failed and each has exactly the reference tokens."""
        results = [f.result(timeout=600) for f in self.futures]
        self.pool.shutdown()
        for i, (res, ref) in enumerate(zip(results, self.references, strict=True)):
            assert res.error == "", f"request {i} failed: {res.error}"
            assert res.token_ids == ref, f"request {i} differs from the engine alone"
        return results


def blocks_all_free(cluster, directory) -> bool:
    for w in directory.workers():
        stub = connect_worker(cluster, directory, w.worker_id)
        s = stub.GetStats(wpb.StatsRequest(), timeout=5)
        if s.num_free_blocks != s.num_blocks or s.num_held or s.num_running or s.num_waiting:
            return False
    return True


def connect_worker(cluster, directory, worker_id: str) -> wpb_grpc.WorkerStub:
    return launcher_worker_stub(directory.get(worker_id).endpoint, cluster.cluster_token)


def roles(directory) -> dict[str, WorkerRole]:
    return {w.worker_id: w.role for w in directory.workers()}


def wait_command(store: PoolStore, command_id: str, timeout_s: float = 240):
    wait_until(lambda: store.get_command(command_id).finished, timeout_s)
    command = store.get_command(command_id)
    assert command.state is CommandState.DONE, command.message
    return command


def test_scale_decode_up_under_load(cluster, directory, store, chat_prompt_ids,
                                    engine_reference):
    """Targets decode 1 -> 2 (as `scission pools scale decode 2` writes them) while 6
    streams run: a new worker with a new id starts and serves; no request fails."""
    load = Load(cluster.router_address, chat_prompt_ids[:6], engine_reference[:6])
    load.wait_streaming()
    targets, revision = store.read_targets()
    assert (targets.prefill, targets.decode) == (2, 1)
    t0 = time.monotonic()
    assert store.write_targets(targets.with_role(WorkerRole.DECODE, 2), revision)
    wait_until(lambda: "decode-1" in roles(directory), 240)
    start_s = time.monotonic() - t0
    print(f"\nnew decode worker registered {start_s:.1f}s after the target changed "
          "(model load included)")
    load.results_exact()
    assert roles(directory) == {"prefill-0": WorkerRole.PREFILL, "prefill-1": WorkerRole.PREFILL,
                                "decode-0": WorkerRole.DECODE, "decode-1": WorkerRole.DECODE}
    time.sleep(1.0)  # the router's own watch sees decode-1
    after = Load(cluster.router_address, chat_prompt_ids[6:10], engine_reference[6:10])
    assert "decode-1" in {r.decode_worker for r in after.results_exact()}
    wait_until(lambda: blocks_all_free(cluster, directory), 30)
    port = ray.get(cluster.controller.bound_metrics_port.remote())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'scission_pool_target_workers{role="decode"} 2.0' in text
    assert 'scission_pool_workers{role="decode",state="serving"} 2.0' in text
    assert 'scission_pool_workers{role="prefill",state="serving"} 2.0' in text


def test_drain_decode_worker_under_load(cluster, directory, store, chat_prompt_ids,
                                        engine_reference):
    """`pools drain decode-0` while it streams: it stops taking requests, its streams finish
    there or migrate to decode-1 after the deadline, then it deregisters and exits."""
    load = Load(cluster.router_address, chat_prompt_ids[:6], engine_reference[:6])
    load.wait_streaming()
    targets, revision = store.read_targets()
    command = store.submit_command(CommandKind.DRAIN, "decode-0", reason="test drain",
                                   targets=targets.with_role(WorkerRole.DECODE, 1),
                                   expected_revision=revision)
    assert command is not None
    done = wait_command(store, command.command_id)
    results = load.results_exact()
    assert {r.decode_worker for r in results} <= {"decode-0", "decode-1"}
    wait_until(lambda: "decode-0" not in roles(directory), 30)
    assert "decode-0" not in cluster.workers
    print(f"\ndrain of decode-0 took {done.duration_s:.1f}s: {done.message}")
    wait_until(lambda: blocks_all_free(cluster, directory), 30)


def test_flip_prefill_to_decode_under_load(cluster, directory, store, chat_prompt_ids,
                                           engine_reference):
    """`pools flip prefill-1 --to decode` while prompts stream: prefill-1 drains, serves as a
    decode worker in the same process (no model load: far faster than a start) and then
    decodes requests."""
    load = Load(cluster.router_address, chat_prompt_ids[:6], engine_reference[:6])
    load.wait_streaming()
    pid = ray.get(cluster.workers["prefill-1"].pid.remote())
    before_s = time.time()
    targets, revision = store.read_targets()
    flipped = targets.with_role(WorkerRole.PREFILL, 1).with_role(WorkerRole.DECODE, 2)
    command = store.submit_command(CommandKind.FLIP, "prefill-1", WorkerRole.DECODE,
                                   writer=TargetWriter.OPERATOR, targets=flipped,
                                   expected_revision=revision)
    done = wait_command(store, command.command_id)
    load.results_exact()
    wait_until(lambda: roles(directory).get("prefill-1") is WorkerRole.DECODE, 30)
    assert ray.get(cluster.workers["prefill-1"].pid.remote()) == pid  # same process
    info = directory.get("prefill-1")  # the planner ages the role from the flip, not the start
    assert info.started_at_s < before_s <= info.role_since_s
    print(f"\nflip of prefill-1 took {done.duration_s:.2f}s: {done.message}")
    time.sleep(1.0)  # the router's own watch sees the new role
    after = Load(cluster.router_address, chat_prompt_ids[6:12], engine_reference[6:12])
    results = after.results_exact()
    assert "prefill-1" in {r.decode_worker for r in results}
    assert {r.prefill_worker for r in results} == {"prefill-0"}
    wait_until(lambda: blocks_all_free(cluster, directory), 30)


def test_worker_that_used_up_its_restarts_is_replaced(cluster, directory, store,
                                                       chat_prompt_ids, engine_reference):
    """decode-1 crashes with no Ray restarts left (max_worker_restarts=0) while streaming:
    its requests migrate, and the controller starts decode-2 to meet the target again."""
    load = Load(cluster.router_address, chat_prompt_ids[:4], engine_reference[:4])
    load.wait_streaming()
    cluster.crash_worker("decode-1")
    load.results_exact()
    wait_until(lambda: "decode-2" in roles(directory), 240)
    targets, _ = store.read_targets()
    assert targets.decode == 2
    assert sorted(w for w, r in roles(directory).items() if r is WorkerRole.DECODE) == \
        ["decode-2", "prefill-1"]
    assert ray.get(cluster.controller.num_replaced.remote()) == 1
    wait_until(lambda: blocks_all_free(cluster, directory), 30)
