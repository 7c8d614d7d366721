"""TLS for the embedded etcd (``scission up --embedded-etcd-tls``): a private CA made at start,
etcd's server certificate, and the one client certificate the cluster's components present.

``write_etcd_tls(dir, hosts)`` writes, in ``dir`` (mode 0700), each file mode 0600:

    ca.pem                  the CA's certificate (its private key is never written: nothing
                            else can ever be signed by it)
    server.pem, server.key  etcd's certificate: serverAuth + clientAuth (it is also the peer
                            certificate), SANs localhost, 127.0.0.1 and ``hosts``
    client.pem, client.key  the cluster's client certificate (clientAuth, CN ``scission``)

etcd then runs with ``--client-cert-auth`` on https client and peer URLs: a client without a
certificate signed by this CA, or plaintext, is refused at the TLS handshake.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from scission.cluster.certs import (
    CLIENT_AUTH,
    SERVER_AUTH,
    issue,
    make_ca,
    pem_cert,
    pem_key,
    write_private,
)
from scission.registry.etcd_client import EtcdClientConfig

CERT_DAYS = 365  # a cluster lives at most this long on one set (a new `up` makes new ones)
_LOOPBACK = ["localhost", "127.0.0.1"]


@dataclass(frozen=True)
class EtcdTlsFiles:
    """Paths of the PEM files ``write_etcd_tls`` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_args(self) -> list[str]:
        """etcd flags: TLS with client certificates on the client and the peer port."""
        server = ["--cert-file", str(self.server_cert), "--key-file", str(self.server_key)]
        peer = ["--peer-cert-file", str(self.server_cert),
                "--peer-key-file", str(self.server_key)]
        return [*server, "--trusted-ca-file", str(self.ca), "--client-cert-auth",
                *peer, "--peer-trusted-ca-file", str(self.ca), "--peer-client-cert-auth"]

    def client_config(self, endpoints: tuple[str, ...]) -> EtcdClientConfig:
        """The client config of every component: the CA and the client certificate, as PEM
        bytes (it travels through Ray)."""
        return EtcdClientConfig(endpoints=endpoints, ca_pem=self.ca.read_bytes(),
                                cert_pem=self.client_cert.read_bytes(),
                                key_pem=self.client_key.read_bytes())

    def client_files(self) -> list[str]:
        """[ca, cert, key] as ``--etcd-cacert/--etcd-cert/--etcd-key`` take them."""
        return [str(self.ca), str(self.client_cert), str(self.client_key)]

    def ssl_context(self) -> ssl.SSLContext:
        """For https health checks: trusts only the CA, presents the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def write_etcd_tls(directory: Path, hosts: list[str]) -> EtcdTlsFiles:
    """Make a fresh CA, server and client certificate; write them into ``directory`` (created
    0700; existing files replaced). ``hosts``: more names or IPs for the server certificate
    (the address etcd binds, if not loopback)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key, ca = make_ca(CERT_DAYS, "scission embedded etcd CA")
    names = _LOOPBACK + [h for h in hosts if h not in _LOOPBACK and h not in ("0.0.0.0", "::")]
    server_key, server = issue(ca_key, ca, "scission-etcd", names, [SERVER_AUTH, CLIENT_AUTH],
                               CERT_DAYS)
    client_key, client = issue(ca_key, ca, "scission", [], [CLIENT_AUTH], CERT_DAYS)
    files = EtcdTlsFiles(*(directory / n for n in ("ca.pem", "server.pem", "server.key",
                                                   "client.pem", "client.key")))
    for path, data in ((files.ca, pem_cert(ca)), (files.server_cert, pem_cert(server)),
                       (files.server_key, pem_key(server_key)),
                       (files.client_cert, pem_cert(client)),
                       (files.client_key, pem_key(client_key))):
        write_private(path, data)
    return files


# Health checks of a local etcd must not go through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def health_opener(tls: EtcdTlsFiles | None) -> urllib.request.OpenerDirector:
    """An opener for ``is_healthy``: no proxy; with ``tls``, https presenting the client
    certificate and trusting only the CA."""
    if tls is None:
        return _DIRECT
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=tls.ssl_context()))


def is_healthy(client_url: str, opener: urllib.request.OpenerDirector = _DIRECT) -> bool:
    """etcd's ``/health`` at ``client_url`` answers ``{"health": "true"}``."""
    try:
        with opener.open(f"{client_url}/health", timeout=0.5) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"
