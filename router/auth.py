"""TLS and bearer-token API keys on the router's public doors (gRPC and HTTP).

TLS: both doors serve with the same certificate and key (``RouterConfig.tls_cert_file`` /
``tls_key_file``); a client CA (``tls_client_ca_file``) makes it mutual — a client without a
certificate signed by that CA is refused in the handshake.

API keys: loaded once at start from a file (one key per line, ``#`` comments) and/or an
environment variable (keys separated by commas or whitespace), never from the command line.
With keys configured, every call must carry ``authorization: Bearer <key>`` (gRPC metadata or
the HTTP header). A missing or wrong key is refused before the request is read, admitted or
placed: ``UNAUTHENTICATED`` (trailing ``www-authenticate: Bearer``) / HTTP 401 with an OpenAI
error object and ``WWW-Authenticate: Bearer``. The gRPC health service and HTTP ``/health``
stay open when ``auth_exempt_health`` (the default: load balancers and probes have no key);
reflection is checked like every other service.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from starlette.types import ASGIApp, Receive, Scope, Send

    from scission.router.config import RouterConfig

logger = logging.getLogger(__name__)

GRPC_HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
HTTP_HEALTH_PATHS = frozenset({"/health"})
MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
WRONG_KEY = "invalid API key"


def _read_file(path: str) -> str:
    # Its own function so the caller reads as "parse", not "open and close".
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_api_keys(keys_file: str | None, keys_env: str | None) -> tuple[str, ...]:
    """The configured keys, or ``()`` when neither source is set. Raises ValueError when a
    source is set but unreadable, unset or holds no key (a typo must not open the door)."""
    keys: list[str] = []
    if keys_file is not None:
        try:
            text = _read_file(keys_file)
        except OSError as e:
            raise ValueError(f"api keys file {keys_file!r}: {e.strerror}") from e
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        found = [line for line in lines if line]
        if not found:
            raise ValueError(f"api keys file {keys_file!r} holds no key")
        keys += found
    if keys_env is not None:
        value = os.environ.get(keys_env)
        if value is None or not value.replace(",", " ").split():
            raise ValueError(f"environment variable {keys_env} (api keys) is unset or empty")
        keys += value.replace(",", " ").split()
    return tuple(keys)


class ApiKeys:
    """Checks ``Authorization`` values against the keys in constant time per key."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        assert keys, "ApiKeys needs at least one key"
        self._keys = tuple(k.encode() for k in keys)

    def refusal(self, authorization: str | None) -> str | None:
        """None when ``authorization`` is ``Bearer <a configured key>``, else why not."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MISSING_KEY
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(given, key)
        return None if ok else WRONG_KEY


def _refuse(message: str):
    def behavior(request, context):
        context.set_trailing_metadata((("www-authenticate", "Bearer"),))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return behavior


class GrpcAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every method but ``exempt`` without a valid bearer key; the servicer (and so
    admission and placement) never sees a refused call."""

    def __init__(self, keys: ApiKeys, exempt: frozenset[str]) -> None:
        self.keys = keys
        self.exempt = exempt

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        refusal = self.keys.refusal(metadata.get("authorization"))
        if refusal is None:
            return handler
        logger.info("refused %s: %s", handler_call_details.method, refusal)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, handler.response_streaming)]
        return make(_refuse(refusal), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def unauthorized_response(message: str) -> JSONResponse:
    """HTTP 401 as OpenAI sends it for a bad key."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class HttpAuthMiddleware:
    """ASGI middleware: every HTTP route but ``exempt_paths`` needs a valid bearer key; a
    refusal is answered before the route runs (the body is never read)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, exempt_paths: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        refusal = self.keys.refusal(Headers(scope=scope).get("authorization"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        logger.info("refused %s %s: %s", scope.get("method"), scope["path"], refusal)
        await unauthorized_response(refusal)(scope, receive, send)


def grpc_server_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC door, or None for plaintext."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    pair = (_read_file(config.tls_key_file).encode(), _read_file(config.tls_cert_file).encode())
    client_ca = config.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read_file(client_ca).encode() if client_ca else None,
        require_client_auth=client_ca is not None)


def server_ssl_context(config: RouterConfig) -> ssl.SSLContext | None:
    """The same TLS as the doors, for a Python server (the metrics port), or None."""
    if config.tls_cert_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(config.tls_client_ca_file)
    return ctx


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
        pass


def serve_wsgi_guarded(app: WSGIApplication, host: str, port: int, keys: ApiKeys | None,
                       ssl_context: ssl.SSLContext | None) -> WSGIServer:
    """``app`` (the Prometheus exposition) on ``host:port`` behind the key check and TLS, on a
    daemon thread; stop it with ``shutdown()`` + ``server_close()``."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse):
        refusal = None if keys is None else keys.refusal(environ.get("HTTP_AUTHORIZATION"))
        if refusal is None:
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", "Bearer")])
        return [f"{refusal}\n".encode()]

    server_cls = type("_Server", (_ThreadingWSGIServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    httpd = make_server(host, port, guarded, server_cls, handler_class=_QuietHandler)
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, name="metrics-guarded", daemon=True).start()
    return httpd
