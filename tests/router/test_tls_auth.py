"""TLS and API keys on the router's public doors, in one process: a real RouterServer (gRPC +
HTTP) and etcd, fake workers (``gated_workers.py``) that count what reaches them, and
certificates made at test time (``tls_certs.py``). A refused client — plaintext against TLS,
a wrong CA, no client certificate under mTLS, a missing or wrong key — gets its status and
reaches no worker."""

from __future__ import annotations

import ssl
import time

import grpc
import httpx
import pytest
from gated_workers import NUM_DECODE_TOKENS, GatedWorker, serve_gated_workers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tls_certs import Certs, make_certs

from scission.cluster.client import connect, generate, make_request
from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.router.auth import MISSING_KEY, WRONG_KEY, load_api_keys
from scission.router.config import RouterConfig
from scission.router.server import RouterServer

KEY = "sk-test-0123456789"
EXPECTED_TOKENS = [7, *range(8, 8 + NUM_DECODE_TOKENS)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def keys_file(tmp_path) -> str:
    path = tmp_path / "api-keys"
    path.write_text(f"# scission API keys\n\nsk-other  # retired next week\n{KEY}\n")
    return str(path)


@pytest.fixture
def worker(etcd_client, etcd_prefix):
    with serve_gated_workers(etcd_client, etcd_prefix) as w:
        yield w


@pytest.fixture
def make_router(etcd_server, etcd_prefix, certs, keys_file):
    """Starts a TLS RouterServer with API keys (gRPC and HTTP on free ports), waits for the
    fake workers; stops them at teardown."""
    routers: list[RouterServer] = []

    def make(**overrides) -> RouterServer:
        cfg = dict(etcd=EtcdClientConfig(endpoints=(etcd_server.endpoint,)),
                   registry=RegistryConfig(prefix=etcd_prefix), http_port=0,
                   tls_cert_file=str(certs.server_cert), tls_key_file=str(certs.server_key),
                   api_keys_file=keys_file)
        routers.append(RouterServer(RouterConfig(**{**cfg, **overrides})).start())
        deadline = time.monotonic() + 10
        while len(routers[-1].directory.workers()) < 2:
            assert time.monotonic() < deadline, "fake workers not discovered"
            time.sleep(0.02)
        return routers[-1]

    yield make
    for r in routers:
        r.stop()


def untouched(worker: GatedWorker) -> bool:
    return worker.prompts == [] and worker.decodes_started == 0


def chat(router: RouterServer) -> dict:
    return {"model": router.http.app.model, "messages": [{"role": "user", "content": "hi"}]}


def https(router: RouterServer, path: str) -> str:
    return f"https://{router.http_address}{path}"


def tls(ca, client: tuple | None = None) -> ssl.SSLContext:
    """What an HTTPS client trusts (and presents, under mTLS)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_call(router: RouterServer, ca, api_key: str | None = None,
              client: tuple | None = None):
    """One request through the CLI's client; returns its result (errors as ``error``)."""
    cert, key = client or (None, None)
    stub = connect(router.address, ca_file=ca and str(ca), api_key=api_key,
                   cert_file=cert and str(cert), key_file=key and str(key))
    return generate(stub, make_request("hi", True, 8, 0.0), timeout_s=10)


def test_right_ca_and_key_are_served(make_router, worker, certs):
    """With the router's CA and a configured key (either of the file's), gRPC streams the
    workers' tokens and HTTPS answers the chat completion; the key is not needed for health."""
    router = make_router()
    res = grpc_call(router, certs.ca, KEY)
    assert res.error == "" and res.token_ids == EXPECTED_TOKENS
    with httpx.Client(verify=tls(certs.ca), timeout=10) as client:
        resp = client.post(https(router, "/v1/chat/completions"), json=chat(router),
                           headers=bearer("sk-other"))
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"] == "a" + "b" * NUM_DECODE_TOKENS
        assert client.get(https(router, "/health")).status_code == 200
    assert len(worker.prompts) == 2 and worker.decodes_started == 2


def test_plaintext_client_is_refused(make_router, worker):
    """A plaintext client against the TLS ports fails in the handshake (gRPC UNAVAILABLE,
    HTTP a transport error) and reaches no worker."""
    router = make_router()
    assert grpc_call(router, None, KEY).error.startswith("UNAVAILABLE")
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://{router.http_address}/v1/chat/completions", json=chat(router),
                   headers=bearer(KEY), timeout=10)
    assert untouched(worker)


def test_client_trusting_a_wrong_ca_is_refused(make_router, worker, certs):
    """A client that trusts another CA rejects the router's certificate: nothing is sent."""
    router = make_router()
    assert grpc_call(router, certs.wrong_ca, KEY).error.startswith("UNAVAILABLE")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.post(https(router, "/v1/chat/completions"), json=chat(router),
                   headers=bearer(KEY), verify=tls(certs.wrong_ca), timeout=10)
    assert untouched(worker)


@pytest.mark.parametrize("key, message", [(None, MISSING_KEY), ("sk-wrong", WRONG_KEY)])
def test_missing_or_wrong_key_is_unauthenticated(make_router, worker, certs, key, message):
    """No key / a wrong key: gRPC UNAUTHENTICATED (trailing www-authenticate: Bearer), HTTP
    401 with OpenAI's invalid_api_key error object and WWW-Authenticate, on every route
    (models too); no worker call. Reflection is checked too; health stays open."""
    router = make_router()
    assert grpc_call(router, certs.ca, key).error == f"UNAUTHENTICATED: {message}"
    channel = grpc.secure_channel(router.address, grpc.ssl_channel_credentials(
        certs.ca.read_bytes()))
    metadata = () if key is None else (("authorization", f"Bearer {key}"),)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata,
        timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        list(reflect)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("www-authenticate", "Bearer") in e.value.trailing_metadata()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    headers = {} if key is None else bearer(key)
    with httpx.Client(verify=tls(certs.ca), timeout=10, headers=headers) as client:
        for resp in (client.post(https(router, "/v1/chat/completions"), json=chat(router)),
                     client.get(https(router, "/v1/models"))):
            assert resp.status_code == 401
            assert resp.headers["www-authenticate"] == "Bearer"
            assert resp.json() == {"error": {"message": message, "type": "invalid_request_error",
                                             "param": None, "code": "invalid_api_key"}}
        assert client.get(https(router, "/health")).status_code == 200
    assert untouched(worker)


def test_health_needs_a_key_when_not_exempt(make_router, worker, certs):
    """auth_exempt_health=False: gRPC health and HTTP /health need the key like the rest."""
    router = make_router(auth_exempt_health=False)
    with grpc.secure_channel(router.address, grpc.ssl_channel_credentials(
            certs.ca.read_bytes())) as channel, pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with httpx.Client(verify=tls(certs.ca), timeout=10) as client:
        assert client.get(https(router, "/health")).status_code == 401
        assert client.get(https(router, "/health"), headers=bearer(KEY)).status_code == 200


def test_mtls_requires_a_client_certificate(make_router, worker, certs):
    """With a client CA, a client without a certificate is refused in the handshake (no
    worker call); with the certificate the CA signed, gRPC and HTTPS are served."""
    router = make_router(tls_client_ca_file=str(certs.ca))
    assert grpc_call(router, certs.ca, KEY).error.startswith("UNAVAILABLE")
    with pytest.raises(httpx.TransportError):
        httpx.post(https(router, "/v1/chat/completions"), json=chat(router),
                   headers=bearer(KEY), verify=tls(certs.ca), timeout=10)
    assert untouched(worker)
    client = (certs.client_cert, certs.client_key)
    assert grpc_call(router, certs.ca, KEY, client).token_ids == EXPECTED_TOKENS
    with httpx.Client(verify=tls(certs.ca, client),
                      timeout=10) as http:
        resp = http.post(https(router, "/v1/chat/completions"), json=chat(router),
                         headers=bearer(KEY))
    assert resp.status_code == 200
    assert len(worker.prompts) == 2


def test_plaintext_with_keys(make_router, worker):
    """Keys without TLS (a trusted network): the key is still checked on both doors."""
    router = make_router(tls_cert_file=None, tls_key_file=None)
    assert grpc_call(router, None, "sk-wrong").error == f"UNAUTHENTICATED: {WRONG_KEY}"
    assert untouched(worker)
    assert grpc_call(router, None, KEY).token_ids == EXPECTED_TOKENS
    resp = httpx.post(f"http://{router.http_address}/v1/chat/completions", json=chat(router),
                      headers=bearer(KEY), timeout=10)
    assert resp.status_code == 200


def test_load_api_keys(keys_file, monkeypatch):
    """Keys from the file (comments and blank lines skipped) then from the variable (commas or
    whitespace); a source that is set but empty, unset or unreadable is an error."""
    monkeypatch.setenv("SCISSION_TEST_KEYS", "k1, k2\nk3")
    assert load_api_keys(keys_file, "SCISSION_TEST_KEYS") == ("sk-other", KEY, "k1", "k2", "k3")
    assert load_api_keys(None, None) == ()
    monkeypatch.setenv("SCISSION_TEST_KEYS", " , ")
    with pytest.raises(ValueError, match="unset or empty"):
        load_api_keys(None, "SCISSION_TEST_KEYS")
    with pytest.raises(ValueError, match="unset or empty"):
        load_api_keys(None, "SCISSION_TEST_NO_SUCH_VARIABLE")
    with pytest.raises(ValueError, match="No such file"):
        load_api_keys("/nonexistent/keys", None)


def test_tls_config_validation():
    """The certificate and key go together; a client CA needs them."""
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(tls_cert_file="c.pem")
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        RouterConfig(tls_client_ca_file="ca.pem")


def test_metrics_port_exempt_by_default_or_guarded(make_router, worker, certs):
    """By default the Prometheus port is as without keys (plaintext, open); with
    auth_exempt_metrics=False it is served over the doors' TLS and needs the key."""
    router = make_router(metrics_port=0)
    resp = httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=10)
    assert resp.status_code == 200 and "scission_router_" in resp.text
    router = make_router(metrics_port=0, auth_exempt_metrics=False)
    metrics_url = f"https://127.0.0.1:{router.metrics_port}/metrics"
    with httpx.Client(verify=tls(certs.ca), timeout=10) as client:
        refused = client.get(metrics_url, headers=bearer("sk-wrong"))
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.text == f"{WRONG_KEY}\n"
        assert client.get(metrics_url).text == f"{MISSING_KEY}\n"
        resp = client.get(metrics_url, headers=bearer(KEY))
        assert resp.status_code == 200 and "scission_router_" in resp.text


def test_cli_up_flags_and_generate_against_a_secured_router(make_router, worker, certs,
                                                            keys_file, monkeypatch, capsys):
    """``scission up``'s TLS / key flags land in the RouterConfig as absolute paths (a missing
    key source fails before anything starts); ``scission generate --tls-ca`` with the key in
    SCISSION_API_KEY streams the answer; without the key it fails with UNAUTHENTICATED."""
    from scission.cluster.cli import build_parser
    from scission.cluster.commands import cluster_config

    monkeypatch.chdir(certs.ca.parent)
    up = build_parser().parse_args(["up", "--tls-cert", "server.pem", "--tls-key", "server.key",
                                    "--tls-client-ca", "ca.pem", "--api-keys-file", keys_file])
    cfg = cluster_config(up).router
    assert (cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file, cfg.api_keys_file) == (
        str(certs.server_cert), str(certs.server_key), str(certs.ca), keys_file)
    monkeypatch.delenv("SCISSION_TEST_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(ValueError, match="SCISSION_TEST_NO_SUCH_VARIABLE"):
        cluster_config(build_parser().parse_args(
            ["up", "--api-keys-env", "SCISSION_TEST_NO_SUCH_VARIABLE"]))
    router = make_router()
    argv = ["generate", "--router", router.address, "--tls-ca", str(certs.ca), "--chat",
            "--greedy", "hi"]
    monkeypatch.delenv("SCISSION_API_KEY", raising=False)
    args = build_parser().parse_args(argv)
    assert args.func(args) == 1
    assert f"UNAUTHENTICATED: {MISSING_KEY}" in capsys.readouterr().err
    assert untouched(worker)
    monkeypatch.setenv("SCISSION_API_KEY", KEY)
    assert args.func(args) == 0
    assert capsys.readouterr().out == "a" + "b" * NUM_DECODE_TOKENS
