"""Streaming engine outputs to a gRPC caller, shared by the roles that stream tokens."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc

from scission.engine.engine_loop import MIGRATE, EngineLoop, wait_output
from scission.engine.request import InvalidRequestError
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.worker.convert import output_to_chunk

logger = logging.getLogger(__name__)


def stream_request(loop: EngineLoop, request_id: str, add: Callable[[], object], context,
                   timeout_s: float) -> Iterator[pb.TokenChunk]:
    """Add a request with ``add()`` on the loop thread and yield its chunks until it finishes.

    A caller that goes away (cancel, deadline) aborts the request, freeing its blocks. A
    request evicted by a drain ends the call with UNAVAILABLE (the router migrates it).
    """
    q = loop.open_stream(request_id)
    try:
        loop.call(add)
    except (InvalidRequestError, ValueError) as e:
        loop.close_stream(request_id)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
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
            first = False
    finally:
        if not finished:
            logger.info("request %s: caller gone or timed out; aborting", request_id)
            loop.abort(request_id)
        loop.close_stream(request_id)
