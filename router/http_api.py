"""The OpenAI-compatible HTTP door of the router (Starlette app served by uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
(and ``/v1/models/{id}``), ``GET /health``. A body becomes a ``scission.v1.GenerateRequest``
(``router/openai_types.py``) and runs through ``GenerationServicer.generate``: the same
validation, admission control, placement, migration and metrics as the gRPC door. Streaming
is server-sent events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``).

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``: 400 bad
input, 404 unknown model or route, 413 body or prompt too large, 429 over capacity (with
``Retry-After``), 503 no workers, 504 deadline. An error after a stream started (a worker
failed and the request could not migrate) is sent as one ``data: {"error": ...}`` event
before ``[DONE]``. A client that disconnects cancels its request.

Starlette rather than FastAPI: bodies are parsed here (size bound first, then pydantic), so
every failure has the OpenAI shape; nothing else of FastAPI would be used.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import grpc
import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scission.registry.workers import WorkerRole
from scission.router.auth import ApiKeys, HttpAuthMiddleware
from scission.router.errors import RequestRejected
from scission.router.http_stream import (
    SSE_DONE,
    ClientGone,
    Formatter,
    Pump,
    SseResponse,
    race_disconnect,
    sse,
)
from scission.router.openai_types import (
    BodyError,
    ChatCompletionRequest,
    CompletionRequest,
)

if TYPE_CHECKING:
    from scission.router.generation import GenerationServicer

logger = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error",
                504: "timeout_error"}


def served_model_name(model_path: str) -> str:
    """The model id clients use: the model file's name without ``.gguf`` (or the checkpoint
    directory's name)."""
    return os.path.basename(os.path.normpath(model_path)).removesuffix(".gguf")


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _rejected_status(e: RequestRejected) -> int:
    # OUT_OF_RANGE on the input itself = the prompt does not fit the context: 413.
    if e.code == grpc.StatusCode.OUT_OF_RANGE and e.param == "input":
        return 413
    return _HTTP_STATUS.get(e.code, 500)


def _openai_param(param: str | None, chat: bool) -> str | None:
    """The body field an error names: ``chat.messages[1].parts[2].image`` (a proto field) is
    ``messages[1].content[2].image_url``."""
    if param is None:
        return None
    if param in ("input", "chat.messages", "messages", "token_ids", "prompt"):
        return "messages" if chat else "prompt"
    if param.startswith("chat.messages["):
        return param.removeprefix("chat.").replace(".parts[", ".content[").replace(
            "].image", "].image_url")
    return param.removeprefix("sampling.")


def _rejected(e: RequestRejected, chat: bool) -> JSONResponse:
    status = _rejected_status(e)
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
    return error_response(status, e.message, _openai_param(e.param, chat), e.code.name.lower(),
                          headers)


def _rejected_event(e: RequestRejected, chat: bool) -> bytes:
    status = _rejected_status(e)
    return sse({"error": {"message": e.message, "type": _ERROR_TYPES.get(status, "server_error"),
                          "param": _openai_param(e.param, chat), "code": e.code.name.lower()}})


class HttpSecurity(NamedTuple):
    """TLS files (PEM; a client CA = mTLS) and API keys for the HTTP door; None = off."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    api_keys: ApiKeys | None = None
    exempt_paths: frozenset[str] = frozenset()  # served without a key


NO_SECURITY = HttpSecurity()  # plaintext, no API keys


class _BodyTooLarge(Exception):
    pass


class OpenAIApp:
    """The routes; requests run on ``executor`` threads through ``servicer.generate``."""

    def __init__(self, servicer: GenerationServicer, model: str, max_body_bytes: int,
                 executor: ThreadPoolExecutor, security: HttpSecurity = NO_SECURITY) -> None:
        self.servicer = servicer
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.executor = executor
        self.created = int(time.time())
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        keys = security.api_keys  # checked before routing: a refused call reads no body
        middleware = [] if keys is None else [
            Middleware(HttpAuthMiddleware, keys=keys, exempt_paths=security.exempt_paths)]
        self.app = Starlette(routes=routes, middleware=middleware,
                             exception_handlers={HTTPException: self._http_error})

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException), type(exc)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: "
                              f"{exc.detail}", code="not_found" if exc.status_code == 404
                              else None)

    def _model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created,
                "owned_by": "scission"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model:
            return error_response(404, f"model {model_id!r} not found", "model",
                                  "model_not_found")
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        """Liveness: 200 while the router serves, with the workers it can place on now."""
        pool = self.servicer.pool
        workers = {role.value: len(pool.workers(role)) for role in WorkerRole
                   if role != WorkerRole.ENCODE}
        return JSONResponse({"status": "ok", "workers": workers})

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, chat=False)

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge()
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise _BodyTooLarge()
        return bytes(body)

    async def _parse(self, request: Request, kind: type[BaseModel], chat: bool):
        """The request body as ``kind`` and its GenerateRequest, or an error response."""
        try:
            body = kind.model_validate_json(await self._read_body(request))
            req = body.to_proto()  # type: ignore[attr-defined]
        except _BodyTooLarge:
            return error_response(413, f"request body over {self.max_body_bytes} bytes",
                                  code="request_too_large")
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            return error_response(400, f"{param or 'body'}: {err['msg']}", param,
                                  "invalid_request")
        except BodyError as e:  # unsupported or invalid values pydantic cannot see
            return error_response(400, str(e), e.param, e.code)
        except ValueError as e:  # protobuf refused a value pydantic let through
            return error_response(400, f"invalid value: {e}", code="invalid_request")
        if body.model is not None and body.model != self.model:
            return error_response(404, f"model {body.model!r} not found; this server serves "
                                  f"{self.model!r}", "model", "model_not_found")
        return body, req

    async def _generate(self, request: Request, kind: type[BaseModel], chat: bool) -> Response:
        parsed = await self._parse(request, kind, chat)
        if isinstance(parsed, Response):
            return parsed
        body, req = parsed
        fmt = Formatter(chat, self.model, body.return_token_ids, body.include_usage)
        req.request_id = fmt.id
        pump = Pump(self.servicer.generate, req, self.executor)
        try:
            if body.stream:  # wait for the first token: a refusal still gets its status
                first = await race_disconnect(pump.next(), request, pump)
                return SseResponse(self._events(pump, fmt, first, chat), pump)
            chunks = await race_disconnect(_collect(pump), request, pump)
        except RequestRejected as e:
            return _rejected(e, chat)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; never seen
        return JSONResponse(fmt.response(chunks))

    async def _events(self, pump: Pump, fmt: Formatter, first, chat: bool
                      ) -> AsyncIterator[bytes]:
        chunk, is_first = first, True
        try:
            while chunk is not None:
                for event in fmt.events(chunk, is_first):
                    yield event
                chunk, is_first = await pump.next(), False
        except RequestRejected as e:  # after the stream started: one error event
            yield _rejected_event(e, chat)
        yield SSE_DONE


async def _collect(pump: Pump) -> list:
    chunks = []
    while (chunk := await pump.next()) is not None:
        chunks.append(chunk)
    assert chunks, "a finished request has at least its final chunk"
    return chunks


class HttpServer:
    """uvicorn on its own thread and event loop, bound at construction (so the address is
    known before ``start``); generation runs on a pool of ``max_threads`` threads."""

    def __init__(self, servicer: GenerationServicer, model: str, host: str, port: int,
                 max_body_bytes: int, max_threads: int,
                 security: HttpSecurity = NO_SECURITY) -> None:
        self.executor = ThreadPoolExecutor(max_threads, thread_name_prefix="http-generate")
        self.app = OpenAIApp(servicer, model, max_body_bytes, self.executor, security)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        tls = {} if security.cert_file is None else {
            "ssl_certfile": security.cert_file, "ssl_keyfile": security.key_file,
            "ssl_ca_certs": security.client_ca_file,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if security.client_ca_file else ssl.CERT_NONE}
        self.scheme = "http" if security.cert_file is None else "https"
        config = uvicorn.Config(self.app.app, log_level="warning", access_log=False,
                                lifespan="off", ws="none", timeout_graceful_shutdown=2, **tls)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="http-door", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.address} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
