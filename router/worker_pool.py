"""The router's live view of workers: etcd directory + gRPC stubs + in-flight accounting.

Worker load = the worker's last published stats (etcd, every ~0.5 s) plus what this
router has sent it since and not seen finish, so a burst does not pile onto one worker.

Calls in flight are tracked per worker incarnation (``tracked``) so that a worker that stops
answering does not hold its requests until their deadlines: when a worker leaves etcd (its
lease lapsed) the pool probes it (``GetStats`` within ``probe_timeout_s``); if it does not
answer, or when a new incarnation of it registers, its calls are cancelled and marked lost
(``was_lost``), and the flows retry or migrate those requests as if the worker had died.
A worker that answers the probe (its lease lapsed because etcd was away) keeps its streams.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from scission.proto.scission.internal.v1 import worker_pb2 as wpb
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
                 cluster_token: str = "", probe_timeout_s: float = 2.0) -> None:
        """``cluster_token``: sent with every worker call (``worker/cluster_auth.py``).
        ``probe_timeout_s``: how long a worker that left etcd has to answer before its calls
        are cancelled as lost (see the module docstring)."""
        self.directory = directory
        self.probe_timeout_s = probe_timeout_s
        # (worker_id, incarnation) -> calls in flight (grpc futures / streams)
        self._calls: dict[tuple[str, int], set] = defaultdict(set)
        self._lost: set = set()  # calls cancelled because their worker stopped answering
        self.num_calls_lost = 0  # metric
        self.last_removed_s: float | None = None  # monotonic time a worker last left etcd
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

    @contextmanager
    def tracked(self, info: WorkerInfo, call) -> Iterator[None]:
        """Track ``call`` (a grpc future or stream to ``info``) while the body runs."""
        key = (info.worker_id, info.incarnation)
        with self._lock:
            self._calls[key].add(call)
        try:
            yield
        finally:
            with self._lock:
                calls = self._calls.get(key)
                if calls is not None:
                    calls.discard(call)
                    if not calls:
                        del self._calls[key]
                self._lost.discard(call)

    def was_lost(self, call) -> bool:
        """Whether the pool cancelled ``call`` because its worker stopped answering."""
        with self._lock:
            return call in self._lost

    def on_worker_added(self, info: WorkerInfo) -> None:
        """Directory callback: calls to older incarnations of the worker are lost."""
        self._cancel_calls(info.worker_id, keep_incarnation=info.incarnation,
                           why="a new incarnation registered")

    def on_worker_removed(self, worker_id: str) -> None:
        """Directory callback (watch thread): probe the worker off that thread; cancel its
        calls if it does not answer."""
        self.last_removed_s = time.monotonic()
        with self._lock:
            keys = [k for k in self._calls if k[0] == worker_id]
            cached = self._channels.get(worker_id)
        if not keys or cached is None:
            return
        threading.Thread(target=self._probe_then_cancel, args=(worker_id, cached[2]),
                         name=f"probe-{worker_id}", daemon=True).start()

    def _probe_then_cancel(self, worker_id: str, stub: pb_grpc.WorkerStub) -> None:
        try:
            stub.GetStats(wpb.StatsRequest(), timeout=self.probe_timeout_s)
            logger.info("worker %s left etcd but answers; its calls continue", worker_id)
        except grpc.RpcError as e:
            self._cancel_calls(worker_id, None, f"it left etcd and its probe failed "
                                                f"({e.code().name})")

    def _cancel_calls(self, worker_id: str, keep_incarnation: int | None, why: str) -> None:
        with self._lock:
            victims = [c for (wid, inc), calls in self._calls.items()
                       if wid == worker_id and inc != keep_incarnation for c in calls]
            self._lost.update(victims)
            self.num_calls_lost += len(victims)
        if victims:
            logger.warning("worker %s: cancelling %d calls in flight: %s", worker_id,
                           len(victims), why)
        for call in victims:
            call.cancel()

    def close(self) -> None:
        with self._lock:
            for _, channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
