"""Test double of the router's public Generation API (the network peer only), for bench tests.

Imported by conftest.py and the loadgen tests; the file name is unique in the test tree so that
it never collides with another directory's helper module.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from scission.proto.scission.v1 import generation_pb2, generation_pb2_grpc

FIRST_TOKEN_DELAY_S = 0.05  # request received -> first chunk
TOKEN_GAP_S = 0.02  # between token chunks
SLOW_DELAY_S = 3.0  # "slow-*" requests wait this long (or until cancelled) before the first chunk


@dataclass
class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Test double of the router's public API (the network peer only).

    Streams ``max_tokens`` one-token chunks: the first after ``FIRST_TOKEN_DELAY_S``, the rest
    ``TOKEN_GAP_S`` apart, then a token-less last chunk with finish_reason LENGTH and usage.
    Request ids starting with ``fail`` are aborted with RESOURCE_EXHAUSTED before any token;
    ``slow`` ones wait ``SLOW_DELAY_S`` (or until the client goes away) first; ``error`` ones end
    with FINISH_REASON_ERROR and ``cut`` ones end without a finish chunk, after their tokens.
    """

    received: list[generation_pb2.GenerateRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        with self.lock:
            self.received.append(request)
        if request.request_id.startswith("fail"):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "fake overload")
        gone = threading.Event()
        context.add_callback(gone.set)
        if request.request_id.startswith("slow") and gone.wait(SLOW_DELAY_S):
            return
        time.sleep(FIRST_TOKEN_DELAY_S)
        num_tokens = request.sampling.max_tokens
        for i in range(num_tokens):
            if i:
                time.sleep(TOKEN_GAP_S)
            yield generation_pb2.GenerateResponse(
                request_id=request.request_id, token_ids=[100 + i], text=f"t{i}"
            )
        if request.request_id.startswith("cut"):
            return
        error = request.request_id.startswith("error")
        yield generation_pb2.GenerateResponse(
            request_id=request.request_id,
            finish_reason=(
                generation_pb2.FINISH_REASON_ERROR if error else generation_pb2.FINISH_REASON_LENGTH
            ),
            usage=generation_pb2.Usage(
                prompt_tokens=len(request.token_ids.ids),
                output_tokens=num_tokens,
                ttft_ms=FIRST_TOKEN_DELAY_S * 1e3,
                prefill_worker="fake-prefill",
                decode_worker="fake-decode",
            ),
        )


@dataclass
class FakeRouter:
    address: str
    servicer: FakeGeneration


@contextlib.contextmanager
def serve_fake_router() -> Iterator[FakeRouter]:
    """Run a FakeGeneration gRPC server on 127.0.0.1 (port chosen by the kernel)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    servicer = FakeGeneration()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeRouter(address=f"127.0.0.1:{port}", servicer=servicer)
    finally:
        server.stop(grace=None)
