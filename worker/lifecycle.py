"""Drain and role flip of a running worker (the controller's verbs; DESIGN: Planner).

The gRPC server holds one ``RoleServicer`` for the worker's life: it forwards each call to
the current role's servicer and counts the calls in flight, so a role flip swaps the servicer
without restarting the server or reloading weights, and a drain knows when the worker is idle.

Drain (``drain``): the worker re-puts its ``WorkerInfo`` with ``draining=True`` (same lease),
so routers stop placing requests on it; the requests it runs finish. A worker is idle when no
role call is in flight and no prefill KV is held for a pull. At ``deadline_s`` whatever still
runs is evicted: its stream ends with UNAVAILABLE and the router migrates it (decode: another
worker recomputes prompt + streamed tokens; prefill: placed again), held KV is released.
Flip (``flip``): drain, deregister (the lease and every key under it go), swap the servicer,
register again as the new role under a new lease (a new incarnation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scission.proto.scission.internal.v1 import worker_pb2_grpc as pb_grpc
from scission.registry.workers import WorkerRole

if TYPE_CHECKING:
    from scission.worker.runtime import BaseWorkerServicer, WorkerRuntime

logger = logging.getLogger(__name__)
IDLE_POLL_S = 0.02


@dataclass(frozen=True)
class DrainResult:
    duration_s: float
    num_evicted: int  # requests still running at the deadline, handed back for migration
    num_released: int  # held prefill KV released at the deadline

    def to_dict(self) -> dict[str, float | int]:
        return {"duration_s": self.duration_s, "num_evicted": self.num_evicted,
                "num_released": self.num_released}


class RoleServicer(pb_grpc.WorkerServicer):
    """The servicer registered with gRPC: forwards to ``current`` and counts calls in flight."""

    def __init__(self, current: BaseWorkerServicer) -> None:
        self.current = current
        self._lock = threading.Lock()
        self._inflight = 0

    @property
    def num_inflight(self) -> int:
        with self._lock:
            return self._inflight

    def _add(self, n: int) -> None:
        with self._lock:
            self._inflight += n

    def _unary(self, name: str, request, context):
        self._add(1)
        try:
            return getattr(self.current, name)(request, context)
        finally:
            self._add(-1)

    def _stream(self, name: str, request, context) -> Iterator:
        self._add(1)
        try:
            yield from getattr(self.current, name)(request, context)
        finally:
            self._add(-1)

    def Prefill(self, request, context):
        return self._unary("Prefill", request, context)

    def Release(self, request, context):
        return self._unary("Release", request, context)

    def WatchPrefill(self, request, context):
        return self._stream("WatchPrefill", request, context)

    def Decode(self, request, context):
        return self._stream("Decode", request, context)

    def Generate(self, request, context):
        return self._stream("Generate", request, context)

    def Encode(self, request, context):
        return self._unary("Encode", request, context)

    def Abort(self, request, context):
        return self.current.Abort(request, context)

    def GetStats(self, request, context):
        return self.current.GetStats(request, context)


def _idle(runtime: WorkerRuntime) -> bool:
    return runtime.role_servicer.num_inflight == 0 and \
        runtime.loop.call(lambda: not runtime.engine.held)


def _wait_idle(runtime: WorkerRuntime, until_s: float) -> bool:
    while not _idle(runtime):
        if time.monotonic() >= until_s:
            return False
        time.sleep(IDLE_POLL_S)
    return True


def drain(runtime: WorkerRuntime, deadline_s: float) -> DrainResult:
    """Stop taking requests, let running ones finish for up to ``deadline_s``, then evict the
    rest for migration and release held KV. Returns once idle. Raises etcd errors if the
    draining mark cannot be written (nothing changed then)."""
    t0 = time.monotonic()
    runtime.info = runtime.registration.set_draining(True)
    evicted = released = 0
    if not _wait_idle(runtime, t0 + deadline_s):
        evicted = runtime.loop.evict_all()
        released = runtime.loop.call(lambda: _release_all_held(runtime))
        logger.warning("drain of %s: deadline %.0fs passed; %d requests migrate, %d holds "
                       "released", runtime.config.worker_id, deadline_s, evicted, released)
        _wait_idle(runtime, time.monotonic() + 30.0)
    result = DrainResult(time.monotonic() - t0, evicted, released)
    logger.info("drained %s: %s", runtime.config.worker_id, result)
    return result


def _release_all_held(runtime: WorkerRuntime) -> int:
    held = list(runtime.engine.held)
    for rid in held:
        runtime.engine.release(rid)
    return len(held)


def flip(runtime: WorkerRuntime, role: WorkerRole, deadline_s: float,
         servicer_for: Callable[[WorkerRole], Callable[[WorkerRuntime], BaseWorkerServicer]]
         ) -> DrainResult:
    """Drain, then serve as ``role`` in this process (weights and KV cache stay); the worker
    registers again under a new lease. Raises ValueError if it already has ``role``."""
    if role is runtime.role:
        raise ValueError(f"{runtime.config.worker_id} already has role {role.value}")
    t0 = time.monotonic()
    drained = drain(runtime, deadline_s)
    runtime.registration.deregister()  # lease revoked: info, stats and KV-index keys go
    old = runtime.role_servicer.current
    close = getattr(old, "close", None)
    if close is not None:
        close()
    runtime.role = role
    runtime.role_servicer.current = servicer_for(role)(runtime)
    runtime.role_since_s = time.time()  # the planner's lifetime and cold-start age of the role
    runtime.register()
    logger.info("flipped %s to %s in %.2fs", runtime.config.worker_id, role.value,
                time.monotonic() - t0)
    return DrainResult(time.monotonic() - t0, drained.num_evicted, drained.num_released)
