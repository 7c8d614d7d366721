"""Readiness probe for the router: exit 0 when ``grpc.health.v1.Health/Check`` on ``--addr``
answers SERVING for ``--service``, 1 otherwise (error on stderr).

    python deploy/grpc_health_probe.py --addr 127.0.0.1:50051 --tls-ca ca.crt \\
        --server-name scission-router.scission.svc --service scission.v1.Generation

The kubelet's built-in gRPC probe speaks plaintext only, and the router's doors serve TLS;
this one connects with TLS when given ``--tls-ca`` (``--server-name``: the name to check the
certificate against, as the probe dials 127.0.0.1). The router serves the health service
without an API key (``RouterConfig.auth_exempt_health``, the default).
"""

from __future__ import annotations

import argparse
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


def check(addr: str, service: str, tls_ca: str | None, server_name: str | None,
          timeout_s: float) -> str:
    """The serving status name (``SERVING``, ``NOT_SERVING``, ...); raises ``grpc.RpcError``."""
    if tls_ca is None:
        channel = grpc.insecure_channel(addr)
    else:
        with open(tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(f.read())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(addr, credentials, options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--service", default="", help="service name ('' = the server)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA of the server's certificate")
    parser.add_argument("--server-name", default=None, help="name the certificate must carry")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        status = check(args.addr, args.service, args.tls_ca, args.server_name, args.timeout_s)
    except grpc.RpcError as exc:
        logger.error("health check of %s failed: %s", args.addr, exc.code().name)
        return 1
    if status != "SERVING":
        logger.error("%s: %s", args.service or "server", status)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
