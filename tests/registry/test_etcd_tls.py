"""The etcd client over TLS against a real etcd serving TLS with client-certificate auth:
with the cluster's CA and a client certificate it signed the registry works; without a
client certificate, or trusting another CA, nothing is read or written."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import etcd3
import pytest
from tls_certs import make_certs

from scission.cluster.etcd_server import find_etcd_binary
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.workers import EtcdClientConfig, connect
from scission.worker.ports import find_free_port


@pytest.fixture(scope="module")
def tls_etcd():
    """(endpoint, certs) of an etcd on free ports serving only TLS, client certs required."""
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp))
        client_port, peer_port = find_free_port("127.0.0.1"), find_free_port("127.0.0.1")
        url, peer = f"https://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        proc = subprocess.Popen(
            [find_etcd_binary(), "--data-dir", f"{tmp}/data", "--name", "tls",
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"tls={peer}", "--cert-file", str(certs.server_cert),
             "--key-file", str(certs.server_key), "--trusted-ca-file", str(certs.ca),
             "--client-cert-auth", "--unsafe-no-fsync"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield f"127.0.0.1:{client_port}", certs
        finally:
            proc.kill()
            proc.wait(timeout=30)


def tls_config(endpoint: str, ca: Path, cert: Path | None = None,
               key: Path | None = None) -> EtcdClientConfig:
    return EtcdClientConfig(endpoints=(endpoint,), timeout_s=3.0, ca_pem=ca.read_bytes(),
                            cert_pem=cert.read_bytes() if cert else b"",
                            key_pem=key.read_bytes() if key else b"")


def put_until_served(client, key: str, deadline_s: float = 30.0) -> None:
    """etcd needs a moment to start: retry the first put until it is served."""
    import time

    end = time.monotonic() + deadline_s
    while True:
        try:
            client.put(key, b"v")
            return
        except ETCD_ERRORS:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def test_client_certificate_and_ca_connect(tls_etcd):
    endpoint, certs = tls_etcd
    client = connect(tls_config(endpoint, certs.ca, certs.client_cert, certs.client_key))
    try:
        put_until_served(client, "/scission-tls/k")
        assert client.get("/scission-tls/k")[0] == b"v"
    finally:
        client.close()


@pytest.mark.parametrize("who", ["no client certificate", "another CA"])
def test_without_the_cluster_credentials_nothing_is_read(tls_etcd, who):
    endpoint, certs = tls_etcd
    good = connect(tls_config(endpoint, certs.ca, certs.client_cert, certs.client_key))
    put_until_served(good, "/scission-tls/secret")
    good.close()
    cfg = tls_config(endpoint, certs.ca) if who == "no client certificate" else \
        tls_config(endpoint, certs.wrong_ca, certs.client_cert, certs.client_key)
    client = connect(cfg)
    try:
        with pytest.raises(ETCD_ERRORS + (etcd3.exceptions.Etcd3Exception,)):
            client.get("/scission-tls/secret")
    finally:
        client.close()


def test_a_certificate_without_its_ca_is_refused_in_the_config():
    with pytest.raises(ValueError, match="needs its key and the CA"):
        EtcdClientConfig(cert_pem=b"x", key_pem=b"y")


def test_cli_reaches_a_tls_etcd_with_its_flags(tls_etcd, capsys):
    """`scission up` carries the PEMs of --etcd-cacert/--etcd-cert/--etcd-key into the
    cluster's etcd config (refusing them without --etcd-endpoints); `scission status` with
    the flags reads the TLS etcd, without them it says etcd is unreachable (exit 1)."""
    from scission.cluster.cli import build_parser
    from scission.cluster.commands import cluster_config, status

    endpoint, certs = tls_etcd
    tls = ["--etcd-cacert", str(certs.ca), "--etcd-cert", str(certs.client_cert),
           "--etcd-key", str(certs.client_key)]
    cfg = cluster_config(build_parser().parse_args(["up", "--etcd-endpoints", endpoint, *tls]))
    assert cfg.etcd_tls.ca_pem == certs.ca.read_bytes()
    assert cfg.etcd_tls.key_pem == certs.client_key.read_bytes()
    with pytest.raises(ValueError, match="pass --etcd-endpoints too"):
        cluster_config(build_parser().parse_args(["up", *tls]))
    put_until_served(connect(tls_config(endpoint, certs.ca, certs.client_cert,
                                        certs.client_key)), "/scission-tls/ready")
    args = build_parser().parse_args(["status", "--etcd-endpoints", endpoint, *tls])
    assert status(args) == 0 and "pools: none" in capsys.readouterr().out
    args = build_parser().parse_args(["status", "--etcd-endpoints", endpoint])
    assert status(args) == 1 and "etcd unreachable" in capsys.readouterr().err
