"""Streaming engine outputs to a gRPC caller, shared by the roles that stream tokens, and
the intake every role shares: claim the request's id, add it, map a refusal to a status.

A request_id is claimed once per worker at a time (``EngineLoop.open_stream``): a duplicate
is refused with ALREADY_EXISTS (gRPC's code for "the entity already exists": the caller's
own id collides, nothing is wrong with its input, and a caller that retries elsewhere may
tell it from INVALID_ARGUMENT) and never touches the original's stream, blocks or held KV.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator

import grpc

from scission.engine.engine_loop import MIGRATE, EngineLoop, StreamClosedError, wait_output
from scission.engine.llm_engine import RequestOutput
from scission.engine.request import DuplicateRequestError
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.worker.convert import output_to_chunk

logger = logging.getLogger(__name__)
Stream = queue.SimpleQueue[RequestOutput]


def claim_stream(loop: EngineLoop, request_id: str, context) -> Stream:
    """``loop.open_stream``; a duplicate id ends the call with ALREADY_EXISTS."""
    try:
        return loop.open_stream(request_id)
    except DuplicateRequestError as e:
        context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))


def start_request(loop: EngineLoop, request_id: str, q: Stream, add: Callable[[], object],
                  context, undo: Callable[[], None] = lambda: None) -> None:
    """Add the request claimed as ``q`` with ``add()`` on the loop thread. If it is not
    added, ``undo()`` gives back what the caller reserved for it (decode: KV blocks), the
    claim is dropped and the call ends: ALREADY_EXISTS (duplicate id), INVALID_ARGUMENT
    (bad input), CANCELLED (aborted before it started)."""
    try:
        loop.add_to_stream(request_id, q, add)
        return
    except BaseException as e:
        undo()
        loop.close_stream(request_id, q)
        if isinstance(e, DuplicateRequestError):
            code = grpc.StatusCode.ALREADY_EXISTS
        elif isinstance(e, ValueError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(e, StreamClosedError):
            code = grpc.StatusCode.CANCELLED
        else:
            raise
        context.abort(code, str(e))


def stream_request(loop: EngineLoop, request_id: str, add: Callable[[], object], context,
                   timeout_s: float, q: Stream | None = None,
                   undo: Callable[[], None] = lambda: None) -> Iterator[pb.TokenChunk]:
    """Add a request with ``add()`` on the loop thread and yield its chunks until it finishes.

    ``q``: the stream already claimed for it (``claim_stream``), else claimed here; ``undo``
    as in ``start_request``. A caller that goes away (cancel, deadline) aborts the request,
    freeing its blocks. A request evicted by a drain ends the call with UNAVAILABLE (the
    router migrates it). Each chunk is ``ack``ed once sent (``EngineLoop`` settling).
    """
    q = claim_stream(loop, request_id, context) if q is None else q
    start_request(loop, request_id, q, add, context, undo)
    first, finished = True, False
    try:
        while not finished:
            out = wait_output(q, timeout_s, context.is_active)
            if out is None:
                break
            if out is MIGRATE:  # this worker drains: the router migrates the request
                finished = True
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"worker draining: request {request_id} migrates")
            finished = out.finish_reason is not None
            yield output_to_chunk(out, first)
            loop.ack(q)  # gRPC sent it (it resumes us once the send completed): next step
            first = False
    finally:
        if not finished:
            logger.info("request %s: caller gone or timed out; aborting", request_id)
            loop.abort(request_id, q)
        loop.close_stream(request_id, q)
