"""Worker registry against a real etcd: registration, leases, directory view, fault paths."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import (
    ETCD_ERRORS,
    EtcdClientConfig,
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
    WorkerStatsRecord,
    connect,
)
from scission.worker.ports import find_free_port

TTL_S = 2


def make_info(worker_id: str, role: WorkerRole = WorkerRole.PREFILL) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        endpoint=f"127.0.0.1:{50000 + len(worker_id)}",
        agent_name=f"nixl-{worker_id}",
        agent_metadata=b"\x00nixl-md\xff" + worker_id.encode(),
        kv_layout=msgpack.packb({"num_layers": 2, "dtype": "bf16"}),
        num_blocks=128,
        block_size=16,
        model_id="tiny-llama",
        started_at_s=1700000000.25,
    )


def make_stats(num_free_blocks: int = 100) -> WorkerStatsRecord:
    return WorkerStatsRecord(
        num_free_blocks=num_free_blocks,
        num_running=3,
        num_waiting=1,
        queued_prefill_tokens=512,
        updated_at_s=1700000001.5,
    )


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Fails after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(0.01)
    return time.monotonic() - start


class Recorder:
    """Collects directory callbacks (called from the watch thread)."""

    def __init__(self) -> None:
        self.added: list[WorkerInfo] = []
        self.removed: list[str] = []

    def on_added(self, info: WorkerInfo) -> None:
        self.added.append(info)

    def on_removed(self, worker_id: str) -> None:
        self.removed.append(worker_id)


@pytest.fixture
def registry_config(etcd_prefix: str) -> RegistryConfig:
    return RegistryConfig(prefix=etcd_prefix, retry_interval_s=0.1)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def directory(etcd_client, registry_config, recorder) -> Iterator[WorkerDirectory]:
    with WorkerDirectory(
        etcd_client, registry_config, on_added=recorder.on_added, on_removed=recorder.on_removed
    ) as view:
        yield view


def test_worker_info_roundtrip_exact() -> None:
    """to_bytes/from_bytes round-trips every field exactly, bytes fields included."""
    info = make_info("w0", WorkerRole.ENCODE)
    assert WorkerInfo.from_bytes(info.to_bytes()) == info
    assert WorkerStatsRecord.from_bytes(make_stats(7).to_bytes()) == make_stats(7)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1not msgpack",
        msgpack.packb([1, 2, 3]),
        make_stats().to_bytes(),  # right codec, wrong kind
        msgpack.packb({**msgpack.unpackb(make_info("w").to_bytes()), "version": 99}),
        msgpack.packb({**msgpack.unpackb(make_info("w").to_bytes()), "num_blocks": "8"}),
        msgpack.packb({**msgpack.unpackb(make_info("w").to_bytes()), "role": "router"}),
        msgpack.packb({k: v for k, v in msgpack.unpackb(make_info("w").to_bytes()).items()
                       if k != "endpoint"}),
        msgpack.packb({**msgpack.unpackb(make_info("w").to_bytes()), "num_blocks": -1}),
        b"",
    ],
    ids=["garbage", "list", "wrong-kind", "version", "type", "role", "missing", "range", "empty"],
)
def test_from_bytes_rejects_bad_input_with_value_error(data: bytes) -> None:
    """Anything but a valid current-version WorkerInfo raises ValueError (never another error)."""
    with pytest.raises(ValueError, match="worker_info"):
        WorkerInfo.from_bytes(data)


def test_register_two_workers_directory_sees_both(
    etcd_client, registry_config, directory, recorder
) -> None:
    """Two registrations appear in a running directory with exact fields, incarnation = lease."""
    with (
        WorkerRegistration(etcd_client, registry_config) as reg_a,
        WorkerRegistration(etcd_client, registry_config) as reg_b,
    ):
        info_a = reg_a.register(make_info("prefill-0"), ttl_s=TTL_S)
        info_b = reg_b.register(make_info("decode-0", WorkerRole.DECODE), ttl_s=TTL_S)
        assert info_a == replace(make_info("prefill-0"), incarnation=info_a.incarnation)
        assert info_a.incarnation > 0 and info_b.incarnation not in (0, info_a.incarnation)
        assert etcd_client.get_lease_info(info_a.incarnation).TTL > 0
        wait_until(lambda: len(directory.workers()) == 2)
        assert directory.workers() == [info_b, info_a]  # sorted by worker_id
        assert directory.workers(WorkerRole.PREFILL) == [info_a]
        assert directory.workers(WorkerRole.ENCODE) == []
        assert directory.get("decode-0") == info_b
        assert sorted(recorder.added, key=lambda i: i.worker_id) == [info_b, info_a]
        assert recorder.removed == []


def test_deregister_removes_exactly_that_worker(
    etcd_client, registry_config, directory, recorder
) -> None:
    """deregister() revokes the lease: its info and stats keys vanish, on_removed fires once,
    the other worker stays."""
    keep = WorkerRegistration(etcd_client, registry_config)
    gone = WorkerRegistration(etcd_client, registry_config)
    info_keep = keep.register(make_info("keep"), ttl_s=TTL_S)
    gone.register(make_info("gone"), ttl_s=TTL_S)
    gone.update_stats(make_stats())
    wait_until(lambda: directory.stats("gone") is not None)
    gone.deregister()
    gone.deregister()  # idempotent
    wait_until(lambda: directory.get("gone") is None)
    assert directory.workers() == [info_keep]
    assert directory.stats("gone") is None
    assert recorder.removed == ["gone"]
    assert etcd_client.get(f"{registry_config.workers_prefix}gone") == (None, None)
    assert etcd_client.get(f"{registry_config.stats_prefix}gone") == (None, None)
    keep.deregister()
    wait_until(lambda: directory.workers() == [])
    assert recorder.removed == ["gone", "keep"]


def _register_and_hang(endpoint: str, prefix: str, info_bytes: bytes, ready) -> None:
    """Child process body: register, publish stats, report the incarnation, wait to be killed."""
    client = connect(EtcdClientConfig(endpoints=(endpoint,)))
    registration = WorkerRegistration(client, RegistryConfig(prefix=prefix))
    info = registration.register(WorkerInfo.from_bytes(info_bytes), ttl_s=TTL_S)
    registration.update_stats(make_stats(5))
    ready.put(info.incarnation)
    threading.Event().wait()


def test_killed_worker_vanishes_within_ttl(
    etcd_server, etcd_client, registry_config, directory, recorder
) -> None:
    """A worker process killed with SIGKILL (no deregister) leaves the directory within its TTL
    (+ etcd's 0.5 s expiry scan), with on_removed fired exactly once."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    info = make_info("doomed", WorkerRole.DECODE)
    child = ctx.Process(
        target=_register_and_hang,
        args=(etcd_server.endpoint, registry_config.prefix, info.to_bytes(), ready),
        daemon=True,
    )
    child.start()
    try:
        incarnation = ready.get(timeout=30)
        wait_until(lambda: directory.stats("doomed") == make_stats(5))
        assert directory.workers() == [replace(info, incarnation=incarnation)]
        child.kill()
        child.join(timeout=5)
        elapsed_s = wait_until(lambda: directory.get("doomed") is None, timeout_s=TTL_S + 3)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        ready.close()
    assert elapsed_s <= TTL_S + 1.0, f"took {elapsed_s:.2f}s"
    assert recorder.removed == ["doomed"]
    wait_until(lambda: directory.stats("doomed") is None)


def test_directory_created_after_registrations_rebuilds_from_range_read(
    etcd_client, registry_config, recorder
) -> None:
    """A directory started after the workers registered holds the same set (and stats) as soon
    as start() returns, and fires on_added once per worker."""
    regs = [WorkerRegistration(etcd_client, registry_config) for _ in range(3)]
    infos = [
        reg.register(make_info(f"w{i}", role), ttl_s=TTL_S)
        for i, (reg, role) in enumerate(zip(regs, WorkerRole, strict=False))
    ]
    regs[1].update_stats(make_stats(42))
    try:
        with WorkerDirectory(etcd_client, registry_config, on_added=recorder.on_added) as view:
            assert view.workers() == infos
            assert view.stats("w1") == make_stats(42)
            assert view.stats("w0") is None
            assert recorder.added == infos
    finally:
        for reg in regs:
            reg.deregister()


def test_stats_updates_are_visible(etcd_client, registry_config, directory, recorder) -> None:
    """Each update_stats() replaces the record the directory returns; stats do not fire
    on_added."""
    with WorkerRegistration(etcd_client, registry_config) as reg:
        info = reg.register(make_info("s0"), ttl_s=TTL_S)
        for num_free_blocks in (100, 64, 3):
            reg.update_stats(make_stats(num_free_blocks))
            wait_until(lambda n=num_free_blocks: directory.stats("s0") == make_stats(n))
        assert recorder.added == [info]


def test_malformed_values_are_logged_and_skipped(
    etcd_client, registry_config, directory, recorder, caplog
) -> None:
    """Garbage under the prefix (at list time and while watching) is logged and treated as
    absent; the watch keeps running and valid workers are unaffected."""
    caplog.set_level(logging.WARNING, logger="scission.registry.workers")
    workers, stats = registry_config.workers_prefix, registry_config.stats_prefix
    etcd_client.put(workers + "bad-listed", b"\x00garbage")
    with WorkerRegistration(etcd_client, registry_config) as reg:
        info = reg.register(make_info("good"), ttl_s=TTL_S)
        with WorkerDirectory(etcd_client, registry_config) as view:
            assert view.workers() == [info]
        wait_until(lambda: directory.workers() == [info])
        etcd_client.put(workers + "bad-watched", b"\xc1")
        etcd_client.put(stats + "good", b"not stats")
        etcd_client.put(workers + "mismatch", make_info("other").to_bytes())
        etcd_client.put(workers + "good", b"\xc1")  # a valid worker overwritten with garbage
        wait_until(lambda: directory.workers() == [])
        assert recorder.removed == ["good"]
        messages = "\n".join(r.getMessage() for r in caplog.records)
        for key in ("bad-listed", "bad-watched", "mismatch"):
            assert key in messages
        etcd_client.put(workers + "late", make_info("late").to_bytes())  # still watching
        wait_until(lambda: directory.workers() == [make_info("late")])


def test_lost_lease_reregisters_as_new_incarnation(
    etcd_client, registry_config, directory, recorder
) -> None:
    """If the lease is revoked behind the worker's back, the keepalive thread re-registers with
    a new lease id (incarnation) and the last stats; the directory sees remove then add."""
    new_infos: list[WorkerInfo] = []
    with WorkerRegistration(etcd_client, registry_config, new_infos.append) as reg:
        old = reg.register(make_info("phoenix"), ttl_s=TTL_S)
        reg.update_stats(make_stats(11))
        wait_until(lambda: directory.get("phoenix") == old)
        etcd_client.revoke_lease(old.incarnation)
        wait_until(lambda: len(new_infos) == 1)
        new = new_infos[0]
        assert new.incarnation != old.incarnation and reg.info == new
        assert replace(new, incarnation=old.incarnation) == old
        wait_until(lambda: directory.get("phoenix") == new)
        wait_until(lambda: directory.stats("phoenix") == make_stats(11))
        assert recorder.removed == ["phoenix"] and recorder.added == [old, new]


def test_directory_and_keepalive_survive_etcd_restart(tmp_path: Path) -> None:
    """etcd down (~1.5 s restart) then back on the same data: the registration is still (or again)
    present, the directory's watch resumes (a worker registered afterwards is seen), and
    close() stops the watch thread."""
    config = EmbeddedEtcdConfig(
        data_dir=str(tmp_path), client_port=find_free_port(), peer_port=find_free_port(),
        unsafe_no_fsync=True,
    )
    server = EmbeddedEtcd(config).start()
    client = connect(EtcdClientConfig(endpoints=(server.endpoint,), timeout_s=1.0))
    reg_config = RegistryConfig(prefix="/restart", retry_interval_s=0.1)
    try:
        with (
            WorkerRegistration(client, reg_config) as before,
            WorkerDirectory(client, reg_config) as view,
        ):
            before.register(make_info("before"), ttl_s=TTL_S)
            wait_until(lambda: view.get("before") is not None)
            server.stop()  # the outage lasts until the restarted member has elected itself
            server.start()
            with WorkerRegistration(client, reg_config) as after:
                wait_until(lambda: _try_register(after, make_info("after")), timeout_s=10)
                wait_until(lambda: [i.worker_id for i in view.workers()] == ["after", "before"])
                assert view.get("before") == before.info
            watch_threads = [t for t in threading.enumerate() if t.name == "worker-directory"]
        assert watch_threads and not any(t.is_alive() for t in watch_threads)
    finally:
        client.close()
        server.stop()


def _try_register(registration: WorkerRegistration, info: WorkerInfo) -> bool:
    try:
        registration.register(info, ttl_s=TTL_S)
    except ETCD_ERRORS:  # etcd still coming back: the caller polls
        return False
    return True


def test_workers_bound_to_all_interfaces_advertise_a_reachable_address():
    """A worker bound to 0.0.0.0 registers this node's IP (a server bound to the wildcard
    accepts connections there); an explicit bind address is advertised as is."""
    import socket

    from scission.worker.ports import advertised_host

    assert advertised_host("127.0.0.1") == "127.0.0.1"
    ip = advertised_host("0.0.0.0")
    assert ip not in ("0.0.0.0", "", "::")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("0.0.0.0", 0))
        server.listen(1)
        with socket.create_connection((ip, server.getsockname()[1]), timeout=5):
            pass
