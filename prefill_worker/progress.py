"""Pipelined KV hand-off, prefill side: publish a prompt's KV as its blocks fill.

A ``PrefillRequest`` with a ``pipeline_secret`` opens a ``Pipeline`` here. After every
engine step a loop hook (``PrefillProgressHub._publish``) looks at each pipelined request
still computing its prompt and notes its full prompt blocks::

    prompt   |0 ...... bs-1|bs ..... 2bs-1| ... |     not yet computed      |
    blocks   | block_table[0] | block_table[1] | ... |
             |<--- n = min(num_computed_tokens, num_prompt_tokens) // bs --->|

A full block is never written again while the request runs (later tokens go to later
blocks), unless the request is preempted: its blocks are freed and may be reused, so each
note carries ``num_preemptions`` and the reader reads again what it read under an earlier
count. The decode worker's ``WatchPrefill`` (``watch``) streams those notes as signed
partial ``TransferHandle`` s (``hold_id`` 0, no checksums: the final handle has them), then a
final message: the ``PrefillResponse``'s full handle (same ``hold_id``) and first token, put
here by the ``Prefill`` call itself (``finish``), or the call's failure (``fail``).

``WatchPrefill`` may arrive before the ``Prefill`` call opened its pipeline: it waits up to
``admit_wait_s``, then NOT_FOUND. A wrong secret is refused (PERMISSION_DENIED) and leaves
the pipeline alone; a second watcher of one pipeline gets ALREADY_EXISTS. A pipeline nobody
watched is dropped ``hold_timeout_s`` after it ended (its hold is gone by then).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from scission.kv_transfer.handle import TransferHandle
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)
ADMIT_WAIT_S = 10.0  # WatchPrefill waits this long for its Prefill call to arrive
_POLL_S = 0.25  # a waiting watcher re-checks that its caller is still there this often


@dataclass(eq=False, slots=True)
class Pipeline:
    """One pipelined prefill; fields written under the hub's lock."""

    request_id: str
    secret: bytes
    block_ids: tuple[int, ...] = ()  # full prompt blocks computed so far (prefill-side ids)
    num_preemptions: int = 0
    final: pb.PrefillProgress | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    watched: bool = False
    ended_s: float | None = None  # monotonic time of final / error

    @property
    def state(self) -> tuple[tuple[int, ...], int]:
        return self.block_ids, self.num_preemptions


class PrefillProgressHub:
    """The pipelines of one prefill worker: opened by ``Prefill`` calls, fed by the engine
    loop, streamed by ``WatchPrefill`` calls."""

    def __init__(self, runtime: WorkerRuntime, key: bytes,
                 admit_wait_s: float = ADMIT_WAIT_S) -> None:
        """``key``: the cluster's transfer key (signs partial handles)."""
        self.runtime = runtime
        self.admit_wait_s = admit_wait_s
        self._key = key
        self._cond = threading.Condition()
        self._pipes: dict[str, Pipeline] = {}  # request_id -> its newest pipeline
        self.num_watches_refused = 0  # wrong secret
        runtime.loop.add_hook(self._publish)

    def close(self) -> None:
        """Role flip away from prefill: stop the hook; open pipelines end with UNAVAILABLE."""
        self.runtime.loop.remove_hook(self._publish)
        for p in list(self._pipes.values()):
            self.fail(p, grpc.StatusCode.UNAVAILABLE, "the worker left the prefill role")

    # -- the Prefill call's side ---------------------------------------------------------
    def open(self, request_id: str, secret: bytes) -> Pipeline | None:
        """A pipeline for this Prefill call; None when not pipelined (no secret) or the id
        has an open one (a duplicate call, refused by the engine loop right after)."""
        if not secret:
            return None
        with self._cond:
            old = self._pipes.get(request_id)
            if old is not None and old.ended_s is None:
                return None
            p = self._pipes[request_id] = Pipeline(request_id, bytes(secret))
            self._cond.notify_all()
            return p

    def finish(self, p: Pipeline | None, resp: pb.PrefillResponse) -> None:
        """The Prefill call's answer becomes the final message."""
        if p is None:
            return
        final = pb.PrefillProgress(final=True, transfer_handle=resp.transfer_handle,
                                   first_token_id=resp.first_token_id, finished=resp.finished,
                                   finish_reason=resp.finish_reason)
        with self._cond:
            if p.ended_s is None:
                final.num_preemptions = p.num_preemptions
                p.final, p.ended_s = final, time.monotonic()
                self._cond.notify_all()

    def fail(self, p: Pipeline | None, code: grpc.StatusCode, message: str) -> None:
        """The Prefill call ended without an answer: its watcher ends with ``code``."""
        if p is None:
            return
        with self._cond:
            if p.ended_s is None:
                p.error, p.ended_s = (code, message), time.monotonic()
                self._cond.notify_all()

    # -- the engine loop's side ----------------------------------------------------------
    def _publish(self) -> None:
        """Hook: note each computing pipelined request's full prompt blocks; drop pipelines
        ended ``hold_timeout_s`` ago."""
        if not self._pipes:
            return
        bs, now = self.runtime.engine.kv_cache.block_size, time.monotonic()
        requests = self.runtime.engine.requests
        with self._cond:
            for rid, p in list(self._pipes.items()):
                if p.ended_s is not None:
                    if now - p.ended_s > self.runtime.config.hold_timeout_s:
                        del self._pipes[rid]
                    continue
                req = requests.get(rid)
                if req is None:
                    continue
                n = min(req.num_computed_tokens, req.num_prompt_tokens) // bs
                if req.num_preemptions != p.num_preemptions or n != len(p.block_ids):
                    p.block_ids = tuple(req.block_table[:n])
                    p.num_preemptions = req.num_preemptions
                    self._cond.notify_all()

    # -- the watcher's side --------------------------------------------------------------
    def watch(self, request: pb.WatchPrefillRequest, context) -> Iterator[pb.PrefillProgress]:
        """``WatchPrefill``: partial handles as the blocks fill, then the final message."""
        p = self._admitted(request, context)
        sent = ((), 0)
        while True:
            with self._cond:
                self._cond.wait_for(lambda s=sent: p.ended_s is not None or p.state != s,
                                    _POLL_S)
                state, final, error = p.state, p.final, p.error
                if (final is not None or error is not None) \
                        and self._pipes.get(p.request_id) is p:
                    del self._pipes[p.request_id]  # watched to its end
            if error is not None:
                context.abort(*error)
            if final is not None:
                yield final
                return
            if not context.is_active():
                return
            if state != sent and state[0]:
                yield pb.PrefillProgress(transfer_handle=self._partial_handle(p, state[0]),
                                         num_preemptions=state[1])
            sent = state

    def _admitted(self, request: pb.WatchPrefillRequest, context) -> Pipeline:
        """The pipeline this watcher may stream, waiting for its Prefill call to open it."""
        rid, deadline = request.request_id, time.monotonic() + self.admit_wait_s
        with self._cond:
            while rid not in self._pipes and context.is_active():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, _POLL_S))
            p = self._pipes.get(rid)
            if p is not None and hmac.compare_digest(p.secret, request.pipeline_secret):
                if p.watched:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                  f"prefill of {rid} is already watched")
                p.watched = True
                return p
            if p is not None:
                self.num_watches_refused += 1
        if p is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no pipelined prefill of {rid} here "
                          f"(waited {self.admit_wait_s:.0f}s)")
        logger.warning("WatchPrefill of %s refused: wrong pipeline secret", rid)
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"wrong pipeline secret for the prefill of {rid}")

    def _partial_handle(self, p: Pipeline, block_ids: tuple[int, ...]) -> bytes:
        """Signed handle of the first ``len(block_ids)`` full blocks (mirrors
        ``PrefillServicer._handle``, without a hold or checksums)."""
        rt = self.runtime
        bs = rt.engine.kv_cache.block_size
        return TransferHandle(
            request_id=p.request_id, prefill_worker_id=rt.config.worker_id,
            incarnation=rt.info.incarnation if rt.info else 0, agent_name=rt.agent.name,
            block_ids=block_ids, num_tokens=len(block_ids) * bs, block_size=bs,
            dtype=rt.config.engine.dtype, layout=rt.agent.layout().layout,
        ).signed(self._key).to_bytes()
