"""Worker death during the NIXL READ, under streaming load on a real 2 prefill + 2 decode
cluster (embedded etcd, Ray, NIXL, the default model), with the suite's invariants
(``conftest.py``).

The READ takes milliseconds, so the kill is placed with a test-only fault point
(``decode_worker/fault_points.py``, on through ``SCISSION_TEST_FAULT_DIR`` in this module's
workers): the first decode worker to reach ``decode.pull`` (blocks reserved, the prefill peer
loaded, the READ about to be posted) stops there and names itself, the request and the
prefill worker; the test SIGKILLs one of the two, waits until the process is gone, then
lets the pull go on.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from faults import NEW_TOKENS, check_outcomes, start_load, wait_all_free, wait_for, worker_pid
from serving_helpers import cluster_directory, run_concurrently, running_cluster, token_request

from scission.cluster.launcher import ClusterConfig, worker_stub
from scission.cluster.procs import pid_alive
from scission.decode_worker.fault_points import ENV_VAR
from scission.engine.config import CacheConfig, EngineConfig
from scission.proto.scission.internal.v1 import worker_pb2 as wpb

LEASE_TTL_S = 3
# Far beyond every wait here: a hold freed in this test was released (Release or the pull's
# notification), not timed out.
HOLD_TIMEOUT_S = 600
POINT = "decode.pull"


class FaultDir:
    """The test's side of ``decode_worker/fault_points.py``'s protocol."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def arm(self, point: str) -> None:
        for leftover in self.path.glob(f"{point}.*"):
            leftover.unlink()
        (self.path / f"{point}.arm").touch()

    def reached(self, point: str, timeout_s: float) -> dict:
        """The detail the worker wrote once it stopped at ``point``."""
        done = self.path / f"{point}.reached"
        wait_for(done.exists, timeout_s, f"a worker reaches {point}")
        return json.loads(done.read_text())

    def go(self, point: str) -> None:
        (self.path / f"{point}.go").touch()


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory):
    # Ray's worker processes inherit the driver's environment at ray.init (LocalCluster).
    assert not ray.is_initialized(), "Ray already up: its workers would miss " + ENV_VAR
    path = tmp_path_factory.mktemp("fault_points")
    os.environ[ENV_VAR] = str(path)
    try:
        yield FaultDir(path)
    finally:
        os.environ.pop(ENV_VAR, None)


@pytest.fixture(scope="module")
def cluster(fault_dir):
    with running_cluster(ClusterConfig(num_prefill=2, num_decode=2, lease_ttl_s=LEASE_TTL_S,
                                       threads_per_worker=1, hold_timeout_s=HOLD_TIMEOUT_S,
                                       engine=EngineConfig(cache=CacheConfig(num_blocks=256)))) as c:
        yield c


@pytest.fixture(scope="module")
def directory(cluster):
    with cluster_directory(cluster) as d:
        yield d


def stats(cluster, directory, worker_id: str) -> wpb.WorkerStats:
    info = directory.get(worker_id)
    assert info is not None, f"{worker_id} is not registered"
    return worker_stub(info.endpoint, cluster.cluster_token).GetStats(wpb.StatsRequest(),
                                                                      timeout=5)


def kill(cluster, worker_id: str) -> None:
    """SIGKILL the worker's process (a crash; Ray restarts it) and wait until it is gone."""
    pid = worker_pid(cluster, worker_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 10, f"{worker_id} (pid {pid}) gone")


def back_and_serving(cluster, directory, worker_id: str, before, fault_prompts,
                     fault_reference) -> None:
    """Ray restarted ``worker_id`` as a new incarnation, every block and hold is free on
    every worker, and new requests get their exact tokens."""
    wait_for(lambda: (w := directory.get(worker_id)) is not None
             and w.incarnation != before.incarnation, 180, f"{worker_id} back")
    wait_all_free(cluster, directory)
    results = run_concurrently(cluster.router_address,
                               [token_request(p, NEW_TOKENS) for p in fault_prompts[:4]], 4)
    check_outcomes([(r, 0.0) for r in results], fault_reference, max_failed=0)


def test_prefill_worker_killed_while_a_decode_worker_pulls_from_it(
        cluster, directory, fault_dir, fault_prompts, fault_reference):
    """The prefill worker is SIGKILLed while a decode worker is about to READ its blocks:
    that READ fails at once (no hang, no crash), the request is recomputed on the decode
    worker, and every request (also those held by or prefilling on the dead worker) ends
    with the engine-alone tokens. The failed READ's blocks stay quarantined while the dead
    incarnation is still registered (NIXL cannot tell a dead peer from a late one), and are
    freed once it leaves: afterwards every block is free, the worker is back (Ray) and
    the cluster serves."""
    fault_dir.arm(POINT)
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        load = start_load(cluster.router_address, fault_prompts, NEW_TOKENS, pool)
        at = fault_dir.reached(POINT, 180)
        victim, puller = at["prefill_worker_id"], at["worker_id"]
        before = directory.get(victim)
        kill(cluster, victim)
        fault_dir.go(POINT)

        def quarantined_while_registered() -> bool:
            # Stats first: the dead incarnation, once gone, never comes back, so seeing it
            # after the count proves it was registered while the blocks were quarantined.
            num = stats(cluster, directory, puller).num_quarantined_blocks
            w = directory.get(victim)
            return num > 0 and w is not None and w.incarnation == before.incarnation

        # Polled until the dead incarnation leaves (then it can no longer hold): the window
        # is at least 2 s (a keepalive per TTL / 3), the timeout only bounds a failure.
        wait_for(quarantined_while_registered, LEASE_TTL_S + 5, "the failed READ's blocks "
                 "quarantined while the dead prefill worker is registered")
        results = load.results()
    print(check_outcomes(results, fault_reference, max_failed=0))
    back_and_serving(cluster, directory, victim, before, fault_prompts, fault_reference)


def test_decode_worker_killed_during_its_pull(cluster, directory, fault_dir, fault_prompts,
                                              fault_reference):
    """The decode worker is SIGKILLed while it pulls: the prefill worker's hold on that
    request's blocks is released (the router's Release when the Decode call fails; the
    hold timeout is 600 s here, beyond every wait), the request migrates and ends with the
    engine-alone tokens like all others, and afterwards every block is free on every
    worker, the decode worker is back (Ray) and the cluster serves."""
    fault_dir.arm(POINT)
    with ThreadPoolExecutor(len(fault_prompts)) as pool:
        load = start_load(cluster.router_address, fault_prompts, NEW_TOKENS, pool)
        at = fault_dir.reached(POINT, 180)
        victim, holder = at["worker_id"], at["prefill_worker_id"]
        before = directory.get(victim)
        assert stats(cluster, directory, holder).num_held >= 1  # the pulled request's hold
        kill(cluster, victim)
        fault_dir.go(POINT)  # nobody waits on it any more; for symmetry
        results = load.results()
    print(check_outcomes(results, fault_reference, max_failed=0))
    wait_for(lambda: stats(cluster, directory, holder).num_held == 0, 30,
             f"{holder} holds nothing")
    back_and_serving(cluster, directory, victim, before, fault_prompts, fault_reference)
