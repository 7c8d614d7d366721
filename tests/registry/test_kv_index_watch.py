"""Publisher -> etcd -> router prefix index, against a real etcd: exact round trip, a second
router rebuilding the same index, and a dead worker's entries leaving with its lease."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from kv_index_helpers import make_info, stored, wait_until

from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
from scission.engine.kv_events import KVEvent, KVEventKind
from scission.registry.kv_index import KVEventPublisher, KVIndexConfig, kv_key
from scission.registry.kv_index_watch import KVIndexWatcher
from scission.registry.workers import (
    EtcdClientConfig,
    RegistryConfig,
    WorkerRegistration,
    WorkerRole,
    connect,
)
from scission.router.prefix_index import PrefixIndex
from scission.worker.ports import find_free_port

TTL_S = 2
FAST = KVIndexConfig(flush_interval_s=0.02)


@pytest.fixture
def registry(etcd_prefix: str) -> RegistryConfig:
    return RegistryConfig(prefix=etcd_prefix, retry_interval_s=0.1)


class Worker:
    """A registered worker with a running publisher (what WorkerRuntime wires up)."""

    def __init__(self, client, registry: RegistryConfig, worker_id: str,
                 role: WorkerRole = WorkerRole.PREFILL) -> None:
        self.publisher = KVEventPublisher(client, registry, worker_id, FAST)
        self.registration = WorkerRegistration(client, registry)
        info = self.registration.register(make_info(worker_id, role), ttl_s=TTL_S)
        self.publisher.set_lease(info.incarnation)
        self.publisher.start()

    def close(self) -> None:
        self.publisher.close()
        self.registration.deregister()


@pytest.fixture
def workers(etcd_client, registry) -> Iterator[dict[str, Worker]]:
    ws = {wid: Worker(etcd_client, registry, wid) for wid in ("prefill-0", "prefill-1")}
    yield ws
    for w in ws.values():
        w.close()


def start_index(client, registry: RegistryConfig, page_size: int = 10_000,
                ttl_s: float = 2.0) -> tuple[PrefixIndex, KVIndexWatcher]:
    index = PrefixIndex(ttl_s)
    return index, KVIndexWatcher(client, registry, index, page_size).start()


def index_state(index: PrefixIndex) -> dict[str, frozenset[int]]:
    return {w: index.hashes_of(w) for w in index.worker_block_counts()}


def test_round_trip_is_exact(etcd_client, registry, workers):
    """Events published by two workers reach a running router index exactly (per worker and
    per block), and match() gives each worker's leading-block count."""
    index, watcher = start_index(etcd_client, registry)
    try:
        a, b = workers["prefill-0"].publisher, workers["prefill-1"].publisher
        a.submit([stored(0, [1, 2, 3, 4])])
        b.submit([stored(0, [1, 2, 9])])
        want = {"prefill-0": frozenset({1, 2, 3, 4}), "prefill-1": frozenset({1, 2, 9})}
        wait_until(lambda: index_state(index) == want)
        assert index.match([1, 2, 3, 4, 5]) == {"prefill-0": 4, "prefill-1": 2}
        assert index.match([1, 2, 9]) == {"prefill-0": 2, "prefill-1": 3}
        assert index.match([2, 3]) == {"prefill-0": 2, "prefill-1": 1}
        assert index.match([7, 1]) == {}
        a.submit([KVEvent(1, KVEventKind.REMOVED, (2,))])
        wait_until(lambda: index.hashes_of("prefill-0") == {1, 3, 4})
        assert index.match([1, 2, 3]) == {"prefill-0": 1, "prefill-1": 2}
        assert index.num_blocks == 5 and watcher.num_keys_applied == 8
        assert watcher.num_resyncs == 1
    finally:
        watcher.close()


def test_second_router_rebuilds_the_same_index(etcd_client, registry, workers):
    """A router started later (paged snapshot, 7 keys a page) has the same index right after
    start() as one that followed the watch all along, and both follow later changes."""
    first, first_watcher = start_index(etcd_client, registry)
    a, b = workers["prefill-0"].publisher, workers["prefill-1"].publisher
    a.submit([stored(0, range(100, 130))])
    b.submit([stored(0, range(120, 140)), KVEvent(1, KVEventKind.REMOVED, (125,))])
    wait_until(lambda: a.num_pending == 0 and b.num_pending == 0
               and a.published_hashes() == a.held_hashes()
               and b.published_hashes() == b.held_hashes())
    second, second_watcher = start_index(etcd_client, registry, page_size=7)
    try:
        assert index_state(second) == {"prefill-0": frozenset(range(100, 130)),
                                       "prefill-1": frozenset(range(120, 140)) - {125}}
        assert second_watcher.num_snapshot_keys == 49
        wait_until(lambda: index_state(first) == index_state(second))
        a.submit([KVEvent(1, KVEventKind.CLEARED, ())])
        wait_until(lambda: index_state(first) == index_state(second)
                   == {"prefill-1": frozenset(range(120, 140)) - {125}})
        probe = list(range(120, 130))
        assert first.match(probe) == second.match(probe) == {"prefill-1": 5}
    finally:
        first_watcher.close()
        second_watcher.close()


def _publish_and_hang(endpoint: str, prefix: str, ready) -> None:
    """Child process body: register, publish 300 blocks, report, wait to be SIGKILLed."""
    client = connect(EtcdClientConfig(endpoints=(endpoint,)))
    registry = RegistryConfig(prefix=prefix)
    registration = WorkerRegistration(client, registry)
    info = registration.register(make_info("doomed"), ttl_s=TTL_S)
    publisher = KVEventPublisher(client, registry, "doomed", FAST)
    publisher.set_lease(info.incarnation)
    publisher.submit([stored(0, range(300))])
    publisher.flush()
    ready.put(os.getpid())
    threading.Event().wait()


def test_killed_worker_leaves_the_index_within_its_ttl(etcd_server, etcd_client, registry):
    """A SIGKILLed worker's 300 entries leave the router index within its lease TTL (+ etcd's
    0.5 s expiry scan); another worker's entries stay."""
    survivor = Worker(etcd_client, registry, "prefill-1")
    survivor.publisher.submit([stored(0, [0, 1])])
    index, watcher = start_index(etcd_client, registry)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=_publish_and_hang, args=(etcd_server.endpoint, registry.prefix,
                                                        ready), daemon=True)
    child.start()
    try:
        pid = ready.get(timeout=60)
        wait_until(lambda: len(index.hashes_of("doomed")) == 300
                   and index.hashes_of("prefill-1") == {0, 1})
        assert index.match([0, 1, 2]) == {"doomed": 3, "prefill-1": 2}
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: not index.hashes_of("doomed"), timeout_s=TTL_S + 5)
        assert time.monotonic() - killed_at <= TTL_S + 1.5
        assert index.match([0, 1, 2]) == {"prefill-1": 2}
        assert index_state(index) == {"prefill-1": frozenset({0, 1})}
    finally:
        watcher.close()
        child.kill()
        survivor.close()


def test_removed_worker_is_dropped_at_once_with_its_speculative_entries(etcd_client, registry):
    """When a worker's registration key goes, its confirmed and speculative entries go with it
    in the same watch response."""
    worker = Worker(etcd_client, registry, "decode-0", WorkerRole.DECODE)
    index, watcher = start_index(etcd_client, registry, ttl_s=60)
    try:
        worker.publisher.submit([stored(0, [5, 6])])
        wait_until(lambda: index.hashes_of("decode-0") == {5, 6})
        index.insert_speculative("decode-0", [5, 6, 7, 8])
        assert index.match([5, 6, 7, 8, 9]) == {"decode-0": 4}
        worker.close()
        wait_until(lambda: index.match([5, 6, 7, 8]) == {})
        assert index.num_speculative == 0 and index.num_blocks == 0
    finally:
        watcher.close()


def test_malformed_keys_are_ignored_and_counted(etcd_client, registry, workers):
    """Keys under kv/ that do not parse are skipped by both the snapshot and the watch."""
    prefix = registry.prefix
    etcd_client.put(f"{prefix}/kv/prefill-0/not-a-hash", b"")
    index, watcher = start_index(etcd_client, registry)
    try:
        etcd_client.put(f"{prefix}/kv/prefill-0", b"")
        etcd_client.put(kv_key(prefix, "prefill-0", 42), b"")
        wait_until(lambda: index.hashes_of("prefill-0") == {42})
        assert watcher.num_malformed == 2
    finally:
        watcher.close()


def test_lag_probe_reports_caught_up(etcd_client, registry, workers):
    """With nothing in flight the probed lag is 0 and a progress notification brings the
    index's revision up to the head, even though only other prefixes were written."""
    index, watcher = start_index(etcd_client, registry)
    try:
        for i in range(5):
            etcd_client.put(f"{registry.prefix}/elsewhere/{i}", b"x")
        head = etcd_client.get_response(f"{registry.prefix}/elsewhere/0").header.revision

        def caught_up() -> bool:  # the first probes may come before the stream is open
            watcher.probe_lag()
            return watcher.revision >= head

        wait_until(caught_up, interval_s=0.05)
        assert watcher.probe_lag() == 0
    finally:
        watcher.close()


def test_publisher_and_index_converge_after_an_etcd_restart(tmp_path):
    """etcd restarts on the same data while a worker's events keep coming: the publisher's
    failed flushes are retried, the index's watch re-lists, and both end equal to the
    worker's held blocks."""
    config = EmbeddedEtcdConfig(data_dir=str(tmp_path), client_port=find_free_port(),
                                peer_port=find_free_port(), unsafe_no_fsync=True)
    server = EmbeddedEtcd(config).start()
    client = connect(EtcdClientConfig(endpoints=(server.endpoint,), timeout_s=1.0))
    registry = RegistryConfig(prefix="/restart", retry_interval_s=0.1)
    lease = client.lease(60)
    client.put(f"{registry.workers_prefix}w0", b"", lease=lease.id)
    publisher = KVEventPublisher(client, registry, "w0", FAST)
    publisher.set_lease(lease.id)
    publisher.start()
    index, watcher = start_index(client, registry)
    try:
        publisher.submit([stored(0, [1, 2])])
        wait_until(lambda: index.hashes_of("w0") == {1, 2})
        server.stop()
        publisher.submit([KVEvent(1, KVEventKind.REMOVED, (1,)), stored(2, [3])])
        server.start()
        wait_until(lambda: index.hashes_of("w0") == {2, 3}, timeout_s=15)
        assert publisher.published_hashes() == {2, 3}
        assert watcher.num_resyncs >= 2
    finally:
        publisher.close()
        watcher.close()
        client.close()
        server.stop()
