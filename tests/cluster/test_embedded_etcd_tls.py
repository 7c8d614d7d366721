"""The embedded etcd with TLS (``scission up --embedded-etcd-tls``): a real etcd serving only
https with client certificates; the cluster's client certificate reads and writes (and holds
a lease as a worker does), a plaintext client, one without a certificate and one trusting
another CA get nothing; after a SIGKILL the supervisor brings it back, still TLS only."""

from __future__ import annotations

import os
import signal
import ssl
import stat
import tempfile
import urllib.request
from pathlib import Path

import etcd3
import pytest
from serving_helpers import wait_until

from scission.cluster.certs import make_ca, pem_cert
from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.workers import EtcdClientConfig, connect

REFUSED = ETCD_ERRORS + (etcd3.exceptions.Etcd3Exception,)


@pytest.fixture(scope="module")
def tls_etcd():
    with EmbeddedEtcd(EmbeddedEtcdConfig(tls=True, unsafe_no_fsync=True)) as server:
        yield server


def _client(server: EmbeddedEtcd, **overrides) -> etcd3.MultiEndpointEtcd3Client:
    cfg = server.client_config()
    fields = dict(endpoints=cfg.endpoints, ca_pem=cfg.ca_pem, cert_pem=cfg.cert_pem,
                  key_pem=cfg.key_pem, timeout_s=2.0)
    return connect(EtcdClientConfig(**{**fields, **overrides}))


def _served(server: EmbeddedEtcd) -> bool:
    client = _client(server)
    try:
        client.put("/tls/probe", b"1")
        return True
    except REFUSED:
        return False
    finally:
        client.close()


def test_files_are_private_and_the_client_certificate_works(tls_etcd):
    tls = tls_etcd.tls_files
    assert tls is not None and tls_etcd.client_url.startswith("https://")
    assert stat.S_IMODE(tls.ca.parent.stat().st_mode) == 0o700
    for path in (tls.ca, tls.server_cert, tls.server_key, tls.client_cert, tls.client_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    cfg = tls_etcd.client_config()
    assert cfg.ca_pem == tls.ca.read_bytes() and cfg.key_pem == tls.client_key.read_bytes()
    assert "BEGIN" not in repr(cfg)
    client = _client(tls_etcd)
    try:
        client.put("/tls/k", b"v")
        assert client.get("/tls/k")[0] == b"v"
        lease = client.lease(5)  # as WorkerRegistration: grant, put under it, keep alive
        client.put("/tls/leased", b"w", lease=lease)
        assert [r.TTL for r in client.refresh_lease(lease.id)] == [5]
        assert client.get("/tls/leased")[0] == b"w"
    finally:
        client.close()


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "another CA"])
def test_without_the_cluster_credentials_nothing_is_read(tls_etcd, who):
    good = _client(tls_etcd)
    good.put("/tls/secret", b"s")
    good.close()
    other_ca = pem_cert(make_ca(1, "some other CA")[1])
    overrides = {"plaintext": dict(ca_pem=b"", cert_pem=b"", key_pem=b""),
                 "no client certificate": dict(cert_pem=b"", key_pem=b""),
                 "another CA": dict(ca_pem=other_ca)}[who]
    client = _client(tls_etcd, **overrides)
    try:
        with pytest.raises(REFUSED):
            client.get("/tls/secret")
    finally:
        client.close()


def test_health_needs_the_client_certificate(tls_etcd):
    """etcd's own /health over https: refused without a client certificate."""
    context = ssl.create_default_context(cafile=str(tls_etcd.tls_files.ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    with pytest.raises(OSError):
        opener.open(f"{tls_etcd.client_url}/health", timeout=2).read()


def test_restarted_after_sigkill_still_serves_tls_only():
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=str(Path(tmp) / "etcd"), tls=True,
                                                 unsafe_no_fsync=True)).start().supervise()
        try:
            client = _client(server)
            client.put("/tls/kept", b"k")
            client.close()
            old_pid = server.pid
            os.kill(old_pid, signal.SIGKILL)
            wait_until(lambda: server.num_restarts >= 1 and server.pid != old_pid, 30.0)
            wait_until(lambda: _served(server), 30.0)
            client = _client(server)
            assert client.get("/tls/kept")[0] == b"k"  # same data dir, same certificates
            client.close()
            plain = _client(server, ca_pem=b"", cert_pem=b"", key_pem=b"")
            with pytest.raises(REFUSED):
                plain.get("/tls/kept")
            plain.close()
        finally:
            server.stop()
