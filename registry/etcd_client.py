"""The etcd client every component uses: ``EtcdClientConfig`` (endpoints, TLS, user/password)
and ``connect``.

python3-etcd3 0.13 quirks handled here:
- ``Etcd3Client`` blacklists its only endpoint for 300 s after one UNAVAILABLE error (then raises
  ``ValueError('Trying to use a failed node')`` although etcd is back): see ``connect()``.
- its user/password support authenticates once and cannot send the token over plaintext:
  ``registry/etcd_auth.py`` does it instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import etcd3
import grpc

from scission.registry.etcd_auth import EtcdTokenAuth
from scission.registry.etcd_failover import FailoverEtcdClient

ETCD_PASSWORD_ENV = "SCISSION_ETCD_PASSWORD"  # the etcd user's password, if no file is given


@dataclass(frozen=True)
class EtcdClientConfig:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)  # "host:port"; a list is accepted
    timeout_s: float = 5.0  # per unary RPC
    endpoint_retry_s: float = 0.5  # a failed endpoint is skipped this long (Etcd3Client: 300 s)
    keepalive_s: float = 10.0  # gRPC ping interval (etcd refuses < 5 s): finds a dead etcd
    max_reconnect_backoff_s: float = 2.0  # reconnect soon after an etcd restart (gRPC: 120 s)
    use_http_proxy: bool = False  # honour http(s)_proxy env vars (gRPC's default) for etcd
    # TLS (PEM bytes, not paths: the config travels through Ray to workers on other nodes).
    # ca_pem set = TLS, the server checked against it; cert_pem + key_pem = a client
    # certificate (etcd's --client-cert-auth: only holders of one signed by its CA connect).
    ca_pem: bytes = field(default=b"", repr=False)
    cert_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False)
    # etcd user/password auth (etcd `auth enable`); both or neither. The password travels
    # like the key (in memory through Ray), never in a repr, a log or a command line.
    user: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if bool(self.cert_pem) != bool(self.key_pem) or (self.cert_pem and not self.ca_pem):
            raise ValueError("an etcd client certificate needs its key and the CA (ca_pem)")
        if bool(self.user) != bool(self.password):
            raise ValueError("etcd auth needs both a user and a password "
                             f"(--etcd-user with --etcd-password-file or ${ETCD_PASSWORD_ENV})")
        if not self.endpoints or not all(_split_endpoint(e) for e in self.endpoints):
            raise ValueError(f"etcd endpoints must be host:port, got {self.endpoints!r}")
        if self.timeout_s <= 0 or self.endpoint_retry_s < 0 or self.keepalive_s < 5:
            raise ValueError("timeout_s > 0, endpoint_retry_s >= 0, keepalive_s >= 5 required")
        if self.max_reconnect_backoff_s <= 0:
            raise ValueError("max_reconnect_backoff_s must be > 0")


def read_etcd_password(password_file: str | None) -> str:
    """The password from ``password_file`` (first line, without its newline), else from
    ``$SCISSION_ETCD_PASSWORD``; "" when neither is set.

    Raises:
        ValueError: the file cannot be read or is empty.
    """
    if not password_file:
        return os.environ.get(ETCD_PASSWORD_ENV, "")
    try:
        with open(password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"etcd password file {password_file!r}: {e.strerror}") from None
    if not password:
        raise ValueError(f"etcd password file {password_file!r} is empty")
    return password


def etcd_config_from_files(endpoints, ca_file: str | None = None,
                           cert_file: str | None = None, key_file: str | None = None,
                           user: str = "", password_file: str | None = None
                           ) -> EtcdClientConfig:
    """An ``EtcdClientConfig`` with the PEMs read from files (``--etcd-cacert/--etcd-cert/
    --etcd-key``; no files = plaintext) and, for ``user`` (``--etcd-user``), the password
    from ``password_file`` (``--etcd-password-file``) or ``$SCISSION_ETCD_PASSWORD``.

    Raises:
        ValueError: a file cannot be read, a certificate without its key or CA, a user
            without a password or a password without a user.
    """
    pems = {}
    for name, path in (("ca_pem", ca_file), ("cert_pem", cert_file), ("key_pem", key_file)):
        if path:
            try:
                pems[name] = open(path, "rb").read()
            except OSError as e:
                raise ValueError(f"etcd TLS file {path!r}: {e.strerror}") from None
    if password_file and not user:
        raise ValueError("--etcd-password-file needs --etcd-user")
    password = read_etcd_password(password_file) if user else ""
    return EtcdClientConfig(endpoints=tuple(endpoints), user=user, password=password, **pems)


def _split_endpoint(endpoint: str) -> tuple[str, int] | None:
    host, _, port = endpoint.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def connect(config: EtcdClientConfig) -> etcd3.MultiEndpointEtcd3Client:
    """An etcd client that recovers after etcd outages; makes no RPC. TLS (and a client
    certificate) when the config carries PEMs, else an insecure channel. With a user, each
    endpoint's channel authenticates at its first call and again whenever etcd refuses the
    token (``etcd_auth.EtcdTokenAuth``); a wrong password raises ``EtcdAuthError`` from the
    first call.

    Returns the base class of ``etcd3.Etcd3Client`` (same API) built with ``endpoint_retry_s``
    instead of Etcd3Client's fixed 300 s blacklist, and failover across ``endpoints`` that
    leaves a failed endpoint at once (``etcd_failover.FailoverEtcdClient``).
    """
    backoff_ms = int(config.max_reconnect_backoff_s * 1000)
    options = [
        ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.timeout_s * 1000)),
        ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ("grpc.enable_http_proxy", int(config.use_http_proxy)),
        # gRPC shares connections between channels to the same address in a process; a
        # client must never ride on one that another config (another certificate) opened.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    creds = None
    if config.ca_pem:
        creds = grpc.ssl_channel_credentials(root_certificates=config.ca_pem,
                                             private_key=config.key_pem or None,
                                             certificate_chain=config.cert_pem or None)
    endpoints = [
        etcd3.Endpoint(host, port, secure=creds is not None, creds=creds,
                       time_retry=config.endpoint_retry_s, opts=options)
        for host, port in map(_split_endpoint, config.endpoints)  # type: ignore[misc]
    ]
    if config.user:
        for endpoint in endpoints:
            auth = EtcdTokenAuth(endpoint.channel, config.user, config.password,
                                 config.timeout_s)
            endpoint.channel = grpc.intercept_channel(endpoint.channel, auth)
    return FailoverEtcdClient(endpoints, timeout=config.timeout_s, failover=True)
