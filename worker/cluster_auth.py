"""The internal door: only the cluster's own callers reach a worker's gRPC API.

``scission up`` generates a per-cluster token (``new_cluster_token``) and hands it, in memory
through Ray, to every worker (``WorkerConfig.cluster_token``) and to the router
(``RouterConfig.cluster_token``). Workers refuse any call whose metadata does not carry it
(``UNAUTHENTICATED``; health checks exempt, so probes work); the router's worker channels add
it to every call. The token never appears on a command line, in etcd or in logs.

An empty token turns the check off (in-process tests that build a worker by hand); the
worker logs a warning then.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from collections.abc import Callable

import grpc

logger = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "x-scission-cluster-token"
# Health checks stay open: Kubernetes and `grpc_health_probe` carry no token.
EXEMPT_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def new_cluster_token() -> str:
    """A fresh token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _deny(message: str) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def _deny_stream(message: str) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - a generator, so gRPC treats it as a stream handler

    return grpc.unary_stream_rpc_method_handler(abort)


class ClusterTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the cluster token before any handler runs."""

    def __init__(self, token: str) -> None:
        assert token, "an empty token means no check: do not install the interceptor"
        self._token = token.encode()
        self._lock = threading.Lock()
        self.num_refused = 0

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        if details.method in EXEMPT_METHODS:
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._token):
            return continuation(details)
        with self._lock:
            self.num_refused += 1
        logger.warning("refused %s: no valid cluster token", details.method)
        handler = continuation(details)
        message = "internal worker API: missing or wrong cluster token"
        if handler is not None and handler.response_streaming:
            return _deny_stream(message)
        return _deny(message)


class _TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor,
                              grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = ((TOKEN_METADATA_KEY, token),)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = tuple(details.metadata or ()) + self._metadata
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready = credentials, wait_for_ready
        self.compression = compression


def with_cluster_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` whose every call carries ``token`` (unchanged when ``token`` is empty)."""
    return grpc.intercept_channel(channel, _TokenClientInterceptor(token)) if token else channel
