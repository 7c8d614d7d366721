"""A router that starts while etcd is away (Ray restarting it during an etcd outage) waits for
etcd with backoff instead of failing for good, then serves its directory from etcd."""

from __future__ import annotations

import logging

from etcd_wait_helpers import etcd_not_started, start_in_background, wait_for

from scission.cluster.etcd_server import EmbeddedEtcd
from scission.registry.workers import (
    EtcdClientConfig,
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
)
from scission.registry.workers import connect as etcd_connect
from scission.router.config import RouterConfig
from scission.router.server import RouterServer


def test_router_started_while_etcd_is_away_loads_the_directory_once_it_is_back(tmp_path,
                                                                                caplog):
    etcd_cfg, endpoint = etcd_not_started(tmp_path)
    registry = RegistryConfig(prefix="/router-etcd-wait")
    router = RouterServer(RouterConfig(etcd=EtcdClientConfig(endpoints=(endpoint,), timeout_s=2.0),
                                       registry=registry, etcd_wait_s=60.0, port=0))
    caplog.set_level(logging.WARNING, logger="scission.registry.etcd_retry")
    starter, errors = start_in_background(router.start)
    etcd = registration = None
    try:
        assert wait_for(lambda: "etcd unreachable" in caplog.text or errors, 30) and not errors, \
            errors
        etcd = EmbeddedEtcd(etcd_cfg).start()
        client = etcd_connect(EtcdClientConfig(endpoints=(endpoint,)))
        registration = WorkerRegistration(client, registry)
        registration.register(WorkerInfo(
            worker_id="decode-0", role=WorkerRole.DECODE, endpoint="127.0.0.1:1",
            agent_name="a", agent_metadata=b"", kv_layout=b"", num_blocks=8, block_size=16,
            model_id="m", started_at_s=0.0), ttl_s=30)
        starter.join(60)
        assert not starter.is_alive() and not errors, errors
        assert wait_for(lambda: [w.worker_id for w in router.directory.workers()] == ["decode-0"],
                     30)
    finally:
        starter.join(90)
        if not errors:
            router.stop()
        if registration is not None:
            registration.deregister()
        if etcd is not None:
            etcd.stop()
