"""A worker that starts while etcd is away (Ray restarting it during an etcd outage) waits
for etcd with backoff instead of failing for good."""

from __future__ import annotations

import logging

from etcd_wait_helpers import etcd_not_started, start_in_background, wait_for

from scission.cluster.etcd_server import EmbeddedEtcd
from scission.engine.config import AttentionBackendKind, CacheConfig, EngineConfig
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerInfo, WorkerRole
from scission.registry.workers import connect as etcd_connect
from scission.worker.runtime import BaseWorkerServicer, WorkerConfig, WorkerRuntime


def test_worker_started_while_etcd_is_away_registers_once_it_is_back(tmp_path, caplog):
    """start() with no etcd listening keeps retrying (logged once); once etcd serves on that
    endpoint, start() returns and the worker is registered there as itself."""
    etcd_cfg, endpoint = etcd_not_started(tmp_path)
    cfg = WorkerConfig(worker_id="w0", role=WorkerRole.COLOCATED,
                       etcd=EtcdClientConfig(endpoints=(endpoint,), timeout_s=2.0),
                       registry=RegistryConfig(prefix="/etcd-wait"), etcd_wait_s=60.0,
                       engine=EngineConfig(num_threads=1, cache=CacheConfig(num_blocks=32),
                                           attention_backend=AttentionBackendKind.TORCH))
    runtime = WorkerRuntime(cfg, lambda role: BaseWorkerServicer)  # no etcd call yet
    caplog.set_level(logging.WARNING, logger="scission.registry.etcd_retry")
    starter, errors = start_in_background(runtime.start)
    etcd = None
    try:
        assert wait_for(lambda: "etcd unreachable" in caplog.text or errors, 30) and not errors, \
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
