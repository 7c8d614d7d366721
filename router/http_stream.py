"""Bridges between the router's synchronous generation path and the asyncio HTTP door.

``Pump`` runs ``GenerationServicer.generate`` on a worker thread and hands its responses to
the event loop; ``SseResponse`` streams server-sent events and cancels the request when the
client goes away; ``Formatter`` turns ``scission.v1`` responses into OpenAI JSON objects.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from scission.proto.scission.v1 import generation_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
SSE_DONE = b"data: [DONE]\n\n"
_END = object()


class Pump:
    """Runs ``generate(request)`` on an executor thread; ``next()`` awaits its items.

    ``cancel()`` makes the thread close the generator (which cancels the request's worker
    calls and releases held KV) as soon as its current step returns, as the gRPC server does
    for a client that went away.
    """

    def __init__(self, generate: Callable[[pb.GenerateRequest], Iterator[pb.GenerateResponse]],
                 request: pb.GenerateRequest, executor: Executor) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._cancelled = threading.Event()
        executor.submit(self._run, generate, request)

    def _run(self, generate, request: pb.GenerateRequest) -> None:
        if self._cancelled.is_set():
            return
        gen = generate(request)
        try:
            for item in gen:
                if self._cancelled.is_set():
                    return
                self._put(item)
            self._put(_END)
        except BaseException as e:  # handed to the reader, which raises it in its task
            self._put(e)
        finally:
            gen.close()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server stopped): nobody reads
            self._cancelled.set()

    async def next(self) -> pb.GenerateResponse | None:
        """The next response, None at the end; raises what ``generate`` raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, pb.GenerateResponse), type(item)
        return item

    def cancel(self) -> None:
        self._cancelled.set()


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closed the connection (the body must be read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(awaitable, request: Request, pump: Pump):
    """``await awaitable``, unless the client goes away first: then cancel the request and
    raise ``ClientGone``."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            pump.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone()
    return work.result()


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


class SseResponse(StreamingResponse):
    """Server-sent events; always listens for the client's disconnect (whatever the ASGI
    spec version) and cancels the request then, or when the stream ends in any way."""

    def __init__(self, events: AsyncIterator[bytes], pump: Pump) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._pump = pump

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._pump.cancel()


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage_json(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.prompt_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class Formatter:
    """OpenAI response objects for one request: every chunk has the same ``id``, ``created``
    and ``model``. ``chat`` selects chat.completion(.chunk) over text_completion."""

    def __init__(self, chat: bool, model: str, return_token_ids: bool,
                 include_usage: bool) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.return_token_ids = return_token_ids
        self.include_usage = include_usage

    def _obj(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, body: dict, token_ids, finish_reason: str | None) -> dict:
        choice = {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def response(self, chunks: list[pb.GenerateResponse]) -> dict:
        """The whole (non-streamed) response from all chunks, the last one final."""
        text = "".join(c.text for c in chunks)
        token_ids = [t for c in chunks for t in c.token_ids]
        last = chunks[-1]
        reason = FINISH_REASONS.get(last.finish_reason, "stop")
        if self.chat:
            body = {"message": {"role": "assistant", "content": text}}
            obj = self._obj("chat.completion", [self._choice(body, token_ids, reason)])
        else:
            obj = self._obj("text_completion", [self._choice({"text": text}, token_ids, reason)])
        obj["usage"] = usage_json(last.usage)
        return obj

    def events(self, chunk: pb.GenerateResponse, first: bool) -> Iterator[bytes]:
        """The SSE events for one streamed chunk (the role delta before the first chat one;
        a finish chunk, then the usage chunk if asked for, after the final one)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        final = chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        reason = FINISH_REASONS.get(chunk.finish_reason, "stop") if final else None
        if self.chat:
            if first:
                role = {"delta": {"role": "assistant", "content": ""}}
                yield sse(self._obj(kind, [self._choice(role, (), None)]))
            if chunk.text or chunk.token_ids:
                delta = {"delta": {"content": chunk.text}}
                yield sse(self._obj(kind, [self._choice(delta, chunk.token_ids, None)]))
            if final:
                yield sse(self._obj(kind, [self._choice({"delta": {}}, (), reason)]))
        else:
            yield sse(self._obj(kind, [self._choice({"text": chunk.text}, chunk.token_ids,
                                                    reason)]))
        if final and self.include_usage:
            obj = self._obj(kind, [])
            obj["usage"] = usage_json(chunk.usage)
            yield sse(obj)
