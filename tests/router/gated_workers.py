"""A fake prefill + decode worker pair whose calls can be held open (not collected).

``GatedWorker`` answers Prefill with token 7 ("a") and streams Decode tokens 8, 9, ... ("b"
each); ``prefill_gate`` / ``decode_gate`` (set = open) hold calls before they answer, so a
test can keep requests in flight for as long as it needs. It records what it received.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import msgpack

from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as wpb_grpc
from scission.registry.workers import (
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
)

NUM_DECODE_TOKENS = 4  # after the first token


class GatedWorker(wpb_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.prefill_gate = threading.Event()
        self.decode_gate = threading.Event()
        self.prefill_gate.set()
        self.decode_gate.set()
        self.lock = threading.Lock()
        self.prompts: list[list[int]] = []  # prompt_token_ids of every Prefill
        self.released: list[str] = []  # request ids of Release calls
        self.prefill_ids: list[str] = []  # request ids of Prefill calls, in order
        self.decodes_started = 0
        self.decodes_cancelled = 0  # Decode calls that saw their caller go away

    def Prefill(self, request, context) -> wpb.PrefillResponse:
        with self.lock:
            self.prompts.append(list(request.prompt_token_ids))
            self.prefill_ids.append(request.request_id)  # the router's internal ids
        while not self.prefill_gate.wait(0.05):
            if not context.is_active():
                return wpb.PrefillResponse()
        return wpb.PrefillResponse(first_token_id=7, transfer_handle=b"h", text="a",
                                   cached_tokens=0)

    def Decode(self, request, context) -> Iterator[wpb.TokenChunk]:
        with self.lock:
            self.decodes_started += 1
        for i in range(NUM_DECODE_TOKENS):
            while not self.decode_gate.wait(0.05):
                if not context.is_active():
                    with self.lock:
                        self.decodes_cancelled += 1
                    return
            last = i == NUM_DECODE_TOKENS - 1
            yield wpb.TokenChunk(token_ids=[8 + i], text="b",
                                 finish_reason="length" if last else "")

    def Release(self, request, context) -> wpb.ReleaseResponse:
        with self.lock:
            self.released.append(request.request_id)
        return wpb.ReleaseResponse(released=True)


@contextmanager
def serve_gated_workers(etcd_client, prefix: str) -> Iterator[GatedWorker]:
    """One fake prefill and one fake decode worker (one gRPC server), registered in etcd."""
    worker = GatedWorker()
    server = grpc.server(futures.ThreadPoolExecutor(64))
    wpb_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    regs = []
    for worker_id, role in (("p0", WorkerRole.PREFILL), ("d0", WorkerRole.DECODE)):
        reg = WorkerRegistration(etcd_client, RegistryConfig(prefix=prefix))
        reg.register(WorkerInfo(worker_id=worker_id, role=role, endpoint=f"127.0.0.1:{port}",
                                agent_name=f"nixl-{worker_id}", agent_metadata=b"md",
                                kv_layout=msgpack.packb({}), num_blocks=64, block_size=16,
                                model_id="fake", started_at_s=1.0), ttl_s=5)
        regs.append(reg)
    try:
        yield worker
    finally:
        worker.prefill_gate.set()
        worker.decode_gate.set()
        for reg in regs:
            reg.deregister()
        server.stop(grace=0)
