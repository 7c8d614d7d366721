"""The router's live view of workers: etcd directory + gRPC stubs + in-flight accounting.

Worker load = the worker's last published stats (etcd, every ~0.5 s) plus what this
router has sent it since and not seen finish, so a burst does not pile onto one worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import grpc

from scission.proto.scission.internal.v1 import worker_pb2_grpc as pb_grpc
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.worker.cluster_auth import with_cluster_token

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    queued_prefill_tokens: int  # published + in flight from this router
    num_free_blocks: int
    num_blocks: int
    num_running: int  # published + in flight from this router

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self.num_free_blocks


class WorkerPool:
    def __init__(self, directory: WorkerDirectory, max_message_bytes: int = 4 * 1024**2,
                 cluster_token: str = "") -> None:
        """``cluster_token``: sent with every worker call (``worker/cluster_auth.py``)."""
        self.directory = directory
        self._cluster_token = cluster_token
        self._channel_options = [("grpc.max_receive_message_length", max_message_bytes),
                                 ("grpc.max_send_message_length", max_message_bytes)]
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[str, grpc.Channel, pb_grpc.WorkerStub]] = {}
        self._inflight_prefill_tokens: dict[str, int] = defaultdict(int)
        self._inflight_requests: dict[str, int] = defaultdict(int)
        self._suspect_until: dict[str, float] = {}  # worker_id -> monotonic time

    def workers(self, role: WorkerRole) -> list[WorkerInfo]:
        """Alive (registered), not draining (``WorkerInfo.draining``, set in etcd by the
        controller), not recently failed workers of ``role``."""
        now = time.monotonic()
        return [w for w in self.directory.workers(role) if not w.draining
                and self._suspect_until.get(w.worker_id, 0.0) <= now]

    def mark_suspect(self, worker_id: str, duration_s: float) -> None:
        """Stop routing to a worker whose call failed, until its lease would have expired."""
        logger.warning("worker %s failed a call; not routing to it for %.1fs", worker_id,
                       duration_s)
        self._suspect_until[worker_id] = time.monotonic() + duration_s

    def stub(self, info: WorkerInfo) -> pb_grpc.WorkerStub:
        """A cached stub for the worker's current endpoint (a new endpoint, a new channel)."""
        with self._lock:
            cached = self._channels.get(info.worker_id)
            if cached is not None and cached[0] == info.endpoint:
                return cached[2]
            if cached is not None:
                cached[1].close()
            channel = grpc.insecure_channel(info.endpoint, options=self._channel_options)
            stub = pb_grpc.WorkerStub(with_cluster_token(channel, self._cluster_token))
            self._channels[info.worker_id] = (info.endpoint, channel, stub)
            return stub

    def forget_removed(self) -> None:
        live = {w.worker_id for w in self.directory.workers()}
        with self._lock:
            for wid in [w for w in self._channels if w not in live]:
                self._channels.pop(wid)[1].close()

    def load(self, info: WorkerInfo) -> WorkerLoad:
        st = self.directory.stats(info.worker_id)
        with self._lock:
            tokens = self._inflight_prefill_tokens[info.worker_id]
            running = self._inflight_requests[info.worker_id]
        if st is None:
            return WorkerLoad(tokens, info.num_blocks, info.num_blocks, running)
        return WorkerLoad(st.queued_prefill_tokens + tokens, st.num_free_blocks, info.num_blocks,
                          st.num_running + running)

    def begin(self, worker_id: str, prefill_tokens: int = 0) -> None:
        with self._lock:
            self._inflight_prefill_tokens[worker_id] += prefill_tokens
            self._inflight_requests[worker_id] += 1

    def end(self, worker_id: str, prefill_tokens: int = 0) -> None:
        with self._lock:
            self._inflight_prefill_tokens[worker_id] -= prefill_tokens
            self._inflight_requests[worker_id] -= 1

    def close(self) -> None:
        with self._lock:
            for _, channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
