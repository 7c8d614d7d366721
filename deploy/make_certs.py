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
import datetime
import ipaddress
import logging
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

ETCD_MEMBERS = 3  # deploy/k8s/etcd.yaml: the StatefulSet's replicas


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scission"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("scission CA"))
            .issuer_name(_name("scission CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
          names: list[str], usages: list[x509.ObjectIdentifier], days: int
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for ``common_name`` with ``names`` as SANs (none for a client)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


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
        path = folder / key
        path.write_bytes(data)
        path.chmod(0o600)


def make_all(out: Path, namespace: str, router_sans: list[str], days: int) -> None:
    ca_key, ca_cert = make_ca(days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    leaves = {
        "scission-etcd-tls": issue(ca_key, ca_cert, "scission-etcd", etcd_names(namespace),
                                   [server, client], days),
        "scission-etcd-client-tls": issue(ca_key, ca_cert, "scission", [], [client], days),
        "scission-router-tls": issue(ca_key, ca_cert, "scission-router",
                                     router_names(namespace, router_sans), [server], days),
    }
    for secret, (key, cert) in leaves.items():
        _write_secret_dir(out, secret, {"ca.crt": ca_pem, "tls.key": _pem_key(key),
                                        "tls.crt": cert.public_bytes(serialization.Encoding.PEM)})
    _write_secret_dir(out, "scission-api-keys",
                      {"keys.txt": f"sk-{secrets.token_urlsafe(32)}\n".encode()})
    (out / "ca.key").write_bytes(_pem_key(ca_key))
    (out / "ca.key").chmod(0o600)
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
