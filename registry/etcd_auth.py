"""etcd user/password authentication for the etcd client (``etcd_client.connect``).

etcd (auth enabled) answers ``Authenticate(user, password)`` with a token that every later
call carries as ``token`` metadata. python3-etcd3 0.13 does this once in its constructor and
never again, and sends it as gRPC *call credentials*, which gRPC refuses on a plaintext
channel ("Established channel does not have a sufficient security level to transfer call
credential"). A token does not live for ever: etcd's simple tokens expire after
``--auth-token-ttl`` (300 s) without use and all die when the member restarts; JWT tokens
expire at a fixed time. A long-running worker would then fail every call.

``EtcdTokenAuth`` is a client interceptor on one endpoint's channel instead (simple tokens are
per member, so one per endpoint). It authenticates at the first call, adds the token to every
call, plaintext or TLS, and authenticates again when etcd says the token is no good, as
etcd's Go client does (client/v3/retry_interceptor.go ``shouldRefreshToken``: invalid auth
token, auth store revision too old, or "user name is empty" after auth was enabled):
- a unary call (put, get, range, txn, lease grant/revoke) is retried once with the new token;
- a stream (watch, lease keep-alive) that fails so drops the token: the caller reopens it
  (``WatchLoop``, ``WorkerRegistration`` retry) and the new stream carries a fresh one.
If auth is not enabled on the server, calls carry no token (as the Go client does).
"""

from __future__ import annotations

import logging
import threading

import etcd3
import grpc
from etcd3.etcdrpc import rpc_pb2 as etcd_rpc
from etcd3.etcdrpc import rpc_pb2_grpc as etcd_rpc_grpc

logger = logging.getLogger(__name__)

_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
# etcd's error texts (api/v3rpc/rpctypes/error.go) after which a new token is needed.
_STALE_TOKEN = ("invalid auth token", "revision of auth store is old", "user name is empty")
_NOT_ENABLED = "authentication is not enabled"


class EtcdAuthError(etcd3.exceptions.Etcd3Exception):
    """etcd refused to authenticate the configured user (wrong user or password)."""


def _stale(call) -> bool:
    """True if ``call`` (done) failed because its token was missing, expired or old."""
    code = call.code()
    if code in (None, grpc.StatusCode.OK):
        return False
    return any(text in (call.details() or "") for text in _STALE_TOKEN)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d: grpc.ClientCallDetails, metadata: tuple) -> None:
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials, self.wait_for_ready = d.credentials, d.wait_for_ready
        self.compression = getattr(d, "compression", None)


class EtcdTokenAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``user``'s etcd auth token to every call on ``channel`` (see the module doc).

    Raises (from the intercepted call): ``EtcdAuthError`` when etcd refuses the user or
    password; the ``grpc.RpcError`` of ``Authenticate`` when etcd cannot be reached.
    """

    def __init__(self, channel: grpc.Channel, user: str, password: str, timeout_s: float) -> None:
        assert user and password, "EtcdTokenAuth needs a user and a password"
        self._auth = etcd_rpc_grpc.AuthStub(channel)  # the raw channel: not intercepted
        self._user, self._password, self._timeout_s = user, password, timeout_s
        self._lock = threading.Lock()
        self._token: str | None = None  # None = authenticate at the next call; "" = auth off
        self.num_authentications = 0

    def token(self) -> str:
        """The current token, authenticating first if there is none ("" = auth is off)."""
        with self._lock:
            if self._token is None:
                self._token = self._authenticate()
                self.num_authentications += 1
            return self._token

    def _authenticate(self) -> str:
        request = etcd_rpc.AuthenticateRequest(name=self._user, password=self._password)
        try:
            return self._auth.Authenticate(request, timeout=self._timeout_s).token
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if _NOT_ENABLED in details:
                logger.warning("etcd user %r configured but etcd has auth off", self._user)
                return ""
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                              grpc.StatusCode.FAILED_PRECONDITION):
                raise EtcdAuthError(f"etcd refused user {self._user!r}: {details}") from None
            raise

    def drop(self, token: str) -> None:
        """Forget ``token`` (if still current): the next call authenticates again."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _with_token(self, details: grpc.ClientCallDetails) -> tuple[str, grpc.ClientCallDetails]:
        token = self.token()
        extra = (("token", token),) if token else ()
        return token, _Details(details, tuple(details.metadata or ()) + extra)

    def _unary(self, continuation, details, request):
        if details.method == _AUTHENTICATE:
            return continuation(details, request)
        token, with_token = self._with_token(details)
        call = continuation(with_token, request)
        if _stale(call):
            logger.info("etcd auth token of %r no longer valid (%s); authenticating again",
                        self._user, call.details())
            self.drop(token)
            call = continuation(self._with_token(details)[1], request)
        return call

    def _stream(self, continuation, details, request):
        token, with_token = self._with_token(details)
        call = continuation(with_token, request)

        def on_done(done) -> None:
            if _stale(done):
                self.drop(token)

        call.add_done_callback(on_done)
        return call

    def intercept_unary_unary(self, continuation, details, request):
        return self._unary(continuation, details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return self._stream(continuation, details, request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return self._stream(continuation, details, request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return self._stream(continuation, details, request_iterator)
