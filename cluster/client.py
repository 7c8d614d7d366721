"""A small client for the public API, used by ``scission generate`` and ``scission demo``."""

from __future__ import annotations

import io
import mimetypes
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import grpc
from PIL import Image

from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc

API_KEY_ENV = "SCISSION_API_KEY"  # `scission generate` sends it as a bearer token when set
FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower()
                for k, v in pb.FinishReason.items()}


@dataclass
class GenerationResult:
    """One finished request, as ``scission generate --json`` prints it."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float = 0.0  # router-measured
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    client_ttft_ms: float = 0.0  # measured here, includes the network
    prefill_worker: str = ""
    decode_worker: str = ""
    images: int = 0  # images in the prompt
    cached_images: int = 0  # of those, served from an embedding cache
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def load_image(path: str) -> pb.Image:
    """The file at ``path`` as an image part. Its MIME type is Pillow's sniffed format, else
    the file suffix's, else empty; the router checks the bytes themselves.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError`` when it does not exist).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "", "")
    except (OSError, SyntaxError, ValueError):  # not an image Pillow knows: the router says
        mime = ""
    return pb.Image(data=data, mime_type=mime or mimetypes.guess_type(path)[0] or "")


def make_request(prompt: str, chat: bool, max_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: tuple[str, ...] = (), system: str | None = None,
                 images: Sequence[pb.Image] = ()) -> pb.GenerateRequest:
    """``images`` (chat only) follow ``prompt`` as parts of the one user message."""
    sp = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                           max_tokens=max_tokens, stop=list(stop))
    if seed is not None:
        sp.seed = seed
    if not chat:
        assert not images, "images go in chat input only"
        return pb.GenerateRequest(prompt=prompt, sampling=sp)
    user = pb.ChatMessage(role="user", content=prompt) if not images else pb.ChatMessage(
        role="user", parts=[pb.ContentPart(text=prompt)] + [pb.ContentPart(image=im)
                                                            for im in images])
    msgs = ([pb.ChatMessage(role="system", content=system)] if system else []) + [user]
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=msgs), sampling=sp)


def generate(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, timeout_s: float = 600,
             on_text=None) -> GenerationResult:
    """Run one request to completion; ``on_text(delta)`` sees the stream as it arrives.
    gRPC errors are returned in ``error`` (code: details), not raised."""
    res, start = GenerationResult(), time.monotonic()
    try:
        for chunk in stub.Generate(request, timeout=timeout_s):
            if not res.token_ids and chunk.token_ids:
                res.client_ttft_ms = (time.monotonic() - start) * 1e3
            res.request_id = chunk.request_id
            res.token_ids.extend(chunk.token_ids)
            res.text += chunk.text
            if on_text and chunk.text:
                on_text(chunk.text)
            if chunk.finish_reason:
                _finish(res, chunk)
    except grpc.RpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    return res


def _finish(res: GenerationResult, chunk: pb.GenerateResponse) -> None:
    u = chunk.usage
    res.finish_reason = FINISH_NAMES.get(chunk.finish_reason, "unspecified")
    res.prompt_tokens, res.output_tokens, res.cached_tokens = (
        u.prompt_tokens, u.output_tokens, u.cached_tokens)
    res.ttft_ms, res.tpot_ms, res.e2e_ms = u.ttft_ms, u.tpot_ms, u.e2e_ms
    res.prefill_worker, res.decode_worker = u.prefill_worker, u.decode_worker
    res.images, res.cached_images = u.images, u.cached_images


def connect(address: str, ca_file: str | None = None, api_key: str | None = None,
            cert_file: str | None = None, key_file: str | None = None
            ) -> pb_grpc.GenerationStub:
    """A stub for the router at ``address``: TLS when ``ca_file`` (PEM, the CA that signed the
    router's certificate; ``cert_file`` + ``key_file`` = this client's certificate for mTLS),
    every call with ``authorization: Bearer <api_key>`` when ``api_key``."""
    if ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        cert_chain = _read(cert_file) if cert_file else None
        private_key = _read(key_file) if key_file else None
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
            _read(ca_file), private_key, cert_chain))
    if api_key is not None:
        channel = grpc.intercept_channel(channel, _BearerKey(api_key))
    return pb_grpc.GenerationStub(channel)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call (also over plaintext, where gRPC
    call credentials are not sent)."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, d) -> _CallDetails:
        return _CallDetails(d.method, d.timeout, (*(d.metadata or ()), self._header),
                            d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)
