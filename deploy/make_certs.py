"""Makes the certificates and the API key file the Kubernetes manifests mount (deploy/k8s/).

    python deploy/make_certs.py --out certs/ [--namespace scission] [--router-san NAME ...]

writes one folder per Secret, each holding the files under the keys the Secret has
(deploy/secrets.example.yaml), ready for ``kubectl create secret generic NAME
--from-file=DIR``:

- ``scission-etcd-tls/``        ca.crt, tls.crt, tls.key: every etcd member's certificate (server
                                and peer TLS: serverAuth + clientAuth; the Services' and the
                                members' DNS names, localhost, 127.0.0.1)
- ``scission-etcd-client-tls/`` ca.crt, tls.crt, tls.key: the client certificate scission
                                presents to etcd (``scission up --etcd-cacert/--etcd-cert/
                                --etcd-key``; clientAuth; CN=scission, the etcd user should
                                etcd auth be enabled)
- ``scission-router-tls/``      ca.crt, tls.crt, tls.key: the router's doors (serverAuth; the
                                router Service's names, 127.0.0.1 and each ``--router-san``)
- ``scission-api-keys/``        keys.txt: one fresh random API key
- ``ca.key``                    the CA's private key (keep it out of the cluster)

One self-signed CA (EC P-256) signs all three certificates. Needs ``cryptography``. For
production, a certificate manager (cert-manager, your PKI) can issue the same files instead.
"""

from __future__ import annotations

import argparse
import logging
import secrets
from pathlib import Path

from scission.cluster.certs import CLIENT_AUTH, SERVER_AUTH, issue, make_ca, pem_cert, pem_key
from scission.cluster.certs import write_private as _write_private

logger = logging.getLogger(__name__)

ETCD_MEMBERS = 3  # deploy/k8s/etcd.yaml: the StatefulSet's replicas


def etcd_names(namespace: str) -> list[str]:
    """The client Service, the headless peer Service and every member, short and qualified."""
    names = ["localhost", "127.0.0.1"]
    for base in ("scission-etcd", "scission-etcd-peer",
                 *(f"scission-etcd-{i}.scission-etcd-peer" for i in range(ETCD_MEMBERS))):
        names += [base, f"{base}.{namespace}", f"{base}.{namespace}.svc",
                  f"{base}.{namespace}.svc.cluster.local"]
    return names


def router_names(namespace: str, extra: list[str]) -> list[str]:
    base = "scission-router"
    return [base, f"{base}.{namespace}", f"{base}.{namespace}.svc",
            f"{base}.{namespace}.svc.cluster.local", "localhost", "127.0.0.1", *extra]


def _write_secret_dir(out: Path, name: str, files: dict[str, bytes]) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in files.items():
        _write_private(folder / key, data)


def make_all(out: Path, namespace: str, router_sans: list[str], days: int) -> None:
    ca_key, ca_cert = make_ca(days)
    ca_pem = pem_cert(ca_cert)
    server, client = SERVER_AUTH, CLIENT_AUTH
    leaves = {
        "scission-etcd-tls": issue(ca_key, ca_cert, "scission-etcd", etcd_names(namespace),
                                   [server, client], days),
        "scission-etcd-client-tls": issue(ca_key, ca_cert, "scission", [], [client], days),
        "scission-router-tls": issue(ca_key, ca_cert, "scission-router",
                                     router_names(namespace, router_sans), [server], days),
    }
    for secret, (key, cert) in leaves.items():
        _write_secret_dir(out, secret, {"ca.crt": ca_pem, "tls.key": pem_key(key),
                                        "tls.crt": pem_cert(cert)})
    _write_secret_dir(out, "scission-api-keys",
                      {"keys.txt": f"sk-{secrets.token_urlsafe(32)}\n".encode()})
    _write_private(out / "ca.key", pem_key(ca_key))
    logger.warning("wrote %s: %s, ca.key", out, ", ".join([*leaves, "scission-api-keys"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--namespace", default="scission", help="namespace (default scission)")
    parser.add_argument("--router-san", action="append", default=[], metavar="NAME",
                        help="another DNS name or IP of the router (repeatable), e.g. the "
                             "load balancer's")
    parser.add_argument("--days", type=int, default=365, help="validity (default 365)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    make_all(args.out, args.namespace, args.router_san, args.days)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
