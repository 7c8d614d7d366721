"""A worker that starts while etcd is away (Ray restarting it during an etcd outage) waits
for etcd with backoff instead of failing for good."""

from __future__ import annotations

import logging
import threading
import time

from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
from scission.engine.config import AttentionBackendKind, CacheConfig, EngineConfig
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerInfo, WorkerRole
from scission.registry.workers import connect as etcd_connect
from scission.worker.ports import find_free_port
from scission.worker.runtime import BaseWorkerServicer, WorkerConfig, WorkerRuntime


def test_worker_started_while_etcd_is_away_registers_once_it_is_back(tmp_path, caplog):
    """start() with no etcd listening keeps retrying (logged once); once etcd serves on that
    endpoint, start() returns and the worker is registered there as itself."""
    etcd_cfg = EmbeddedEtcdConfig(data_dir=str(tmp_path / "etcd"), client_port=find_free_port(),
                                  peer_port=find_free_port(), unsafe_no_fsync=True)
    endpoint = f"127.0.0.1:{etcd_cfg.client_port}"
    cfg = WorkerConfig(worker_id="w0", role=WorkerRole.COLOCATED,
                       etcd=EtcdClientConfig(endpoints=(endpoint,), timeout_s=2.0),
                       registry=RegistryConfig(prefix="/etcd-wait"), etcd_wait_s=60.0,
                       engine=EngineConfig(num_threads=1, cache=CacheConfig(num_blocks=32),
                                           attention_backend=AttentionBackendKind.TORCH))
    runtime = WorkerRuntime(cfg, lambda role: BaseWorkerServicer)  # no etcd call yet
    errors: list[BaseException] = []

    def start() -> None:
        try:
            runtime.start()
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    caplog.set_level(logging.WARNING, logger="scission.registry.etcd_retry")
    starter = threading.Thread(target=start)
    starter.start()
    etcd = None
    try:
        assert _wait(lambda: "etcd unreachable" in caplog.text or errors, 30) and not errors, \
            errors
        etcd = EmbeddedEtcd(etcd_cfg).start()
        starter.join(30)
        assert not starter.is_alive() and not errors, errors
        client = etcd_connect(EtcdClientConfig(endpoints=(endpoint,)))
        value, _ = client.get("/etcd-wait/workers/w0")
        client.close()
        assert WorkerInfo.from_bytes(value).incarnation == runtime.info.incarnation > 0
    finally:
        starter.join(90)
        runtime.stop()
        if etcd is not None:
            etcd.stop()


def _wait(predicate, timeout_s: float) -> bool:
    """True once ``predicate()`` holds, False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
