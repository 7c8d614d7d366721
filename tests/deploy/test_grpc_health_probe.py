"""The head's readiness probe (deploy/grpc_health_probe.py with raycluster.yaml's arguments)
against a gRPC server built like the router's public door: its TLS credentials and API-key
interceptor (router/auth.py) from the files deploy/make_certs.py writes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from deploy_manifests import REPO, flag_values, head_container, make_certs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scission.router import auth
from scission.router.config import RouterConfig
from scission.worker.ports import find_free_port

SERVICE = "scission.v1.Generation"


class Door:
    def __init__(self, port: int, certs: Path, health: health.HealthServicer) -> None:
        self.port, self.certs, self.health = port, certs, health


@pytest.fixture(scope="module")
def door(tmp_path_factory) -> Iterator[Door]:
    """A server with the router's TLS and API keys (health exempt, as by default)."""
    certs = make_certs(tmp_path_factory.mktemp("probe") / "certs")
    tls = certs / "scission-router-tls"
    config = RouterConfig(tls_cert_file=str(tls / "tls.crt"), tls_key_file=str(tls / "tls.key"),
                          api_keys_file=str(certs / "scission-api-keys" / "keys.txt"))
    keys = auth.ApiKeys(auth.load_api_keys(config.api_keys_file, None))
    assert config.auth_exempt_health, "the router's default exempts health from API keys"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[auth.GrpcAuthInterceptor(keys, auth.GRPC_HEALTH_METHODS)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(  # a stand-in door
        "scission.v1.Generation",
        {"Generate": grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()))})])
    port = find_free_port()
    server.add_secure_port(f"127.0.0.1:{port}", auth.grpc_server_credentials(config))
    server.start()
    try:
        yield Door(port, certs, servicer)
    finally:
        server.stop(grace=None)


def run_probe(door: Door, ca: Path | None = None, service: str | None = None) -> int:
    """The head's readiness command with the address, CA path and script moved here."""
    command = head_container()["readinessProbe"]["exec"]["command"]
    assert command[0] == "python"
    argv = [sys.executable, *(a.replace("/opt/scission/", f"{REPO}/") for a in command[1:])]
    flags = flag_values(argv)
    replace = {flags["--addr"]: f"127.0.0.1:{door.port}",
               flags["--tls-ca"]: str(ca or door.certs / "scission-router-tls" / "ca.crt")}
    if service is not None:
        replace[SERVICE] = service
    argv = [replace.get(a, a) for a in argv]
    return subprocess.run(argv, capture_output=True, timeout=60).returncode


def test_probe_passes_without_an_api_key_while_serving(door):
    """SERVING for scission.v1.Generation, checked over TLS against the certificate's name
    as the probe gives it, with no API key: the probe passes (exit 0)."""
    door.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert run_probe(door) == 0


def test_probe_fails_when_not_serving_unknown_or_untrusted(door, tmp_path):
    """NOT_SERVING, a service the server does not know, and a CA that did not sign the
    router's certificate each fail the probe (exit 1)."""
    door.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_probe(door) == 1
    door.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert run_probe(door, service="scission.v1.Nothing") == 1
    other = make_certs(tmp_path / "other")
    assert run_probe(door, ca=other / "scission-router-tls" / "ca.crt") == 1
    assert run_probe(door) == 0


def test_the_door_refuses_other_calls_without_a_key(door):
    """The same server refuses Generate without the API key (UNAUTHENTICATED) and serves it
    with the key from keys.txt: the probe passes because health is exempt, not because the
    door is open."""
    ca = (door.certs / "scission-router-tls" / "ca.crt").read_bytes()
    key = (door.certs / "scission-api-keys" / "keys.txt").read_text().strip()
    options = [("grpc.ssl_target_name_override", "scission-router.scission.svc")]
    with grpc.secure_channel(f"127.0.0.1:{door.port}", grpc.ssl_channel_credentials(ca),
                             options) as channel:
        call = channel.unary_stream("/scission.v1.Generation/Generate")
        with pytest.raises(grpc.RpcError) as exc:
            list(call(b"", timeout=5))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert list(call(b"", timeout=5, metadata=[("authorization", f"Bearer {key}")])) == []
