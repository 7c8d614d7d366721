"""Test-time PEM certificates (``scission.cluster.certs``): a CA, a server certificate for
127.0.0.1 / localhost and a client certificate it signed, and an unrelated CA that signed
nothing here."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from scission.cluster.certs import CLIENT_AUTH, SERVER_AUTH, issue, make_ca, pem_cert, pem_key


class Certs(NamedTuple):
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


def _write(directory: Path, name: str, cert, key=None) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(pem_cert(cert))
    if key is not None:
        key_path.write_bytes(pem_key(key))
    return cert_path, key_path


def make_certs(directory: Path) -> Certs:
    ca_key, ca = make_ca(days=1, common_name="scission test CA")
    _, wrong_ca = make_ca(days=1, common_name="some other CA")
    server_key, server = issue(ca_key, ca, "localhost", ["localhost", "127.0.0.1"],
                               [SERVER_AUTH], days=1)
    client_key, client = issue(ca_key, ca, "scission test client", [], [CLIENT_AUTH], days=1)
    server_cert, server_key_path = _write(directory, "server", server, server_key)
    client_cert, client_key_path = _write(directory, "client", client, client_key)
    return Certs(_write(directory, "ca", ca)[0], server_cert, server_key_path, client_cert,
                 client_key_path, _write(directory, "wrong-ca", wrong_ca)[0])
