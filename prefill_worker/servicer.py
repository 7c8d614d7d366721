"""Prefill role: run the prompt, return the first token and a KV transfer handle.

The request's blocks stay pinned (``LLMEngine.held``) until the decode worker's NIXL
notification says it pulled them, the router calls ``Release`` (cancellation), or
``hold_timeout_s`` passes. No KV block is ever stranded. Each hold has a random id (in the
response and the transfer handle): a Release or notification that quotes an earlier hold of
the same request_id (a cancelled attempt's cleanup arriving late) leaves the current one.
"""

from __future__ import annotations

import logging
import secrets
import time

import grpc

from scission.engine.engine_loop import MIGRATE, wait_output
from scission.engine.request import InvalidRequestError
from scission.kv_transfer.capability import transfer_key
from scission.kv_transfer.handle import KVNotification, TransferHandle
from scission.kv_transfer.integrity import block_checksums
from scission.prefill_worker.progress import PrefillProgressHub
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.worker.convert import sampling_from_proto
from scission.worker.embedding_pull import image_inputs
from scission.worker.runtime import BaseWorkerServicer, WorkerRuntime
from scission.worker.stream import claim_stream, start_request

logger = logging.getLogger(__name__)


class PrefillServicer(BaseWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime)
        self._held_at: dict[str, float] = {}  # request_id -> monotonic time pinned (loop thread)
        self._hold_ids: dict[str, int] = {}  # request_id -> id of its current hold (loop thread)
        self.num_notifications_dropped = 0  # forged, stale or foreign (``_release_pulled``)
        self._key = transfer_key(runtime.config.cluster_token)  # signs transfer handles
        self.loop.add_hook(self._release_pulled)
        self.loop.add_hook(self._release_expired)
        self.progress = PrefillProgressHub(runtime, self._key)  # pipelined hand-offs

    def close(self) -> None:
        """Role flip away from prefill: stop the hooks (held KV was released by the drain)."""
        self.loop.remove_hook(self._release_pulled)
        self.loop.remove_hook(self._release_expired)
        self.progress.close()

    def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        """With ``pipeline_secret``, the KV is also published as it is computed, and the
        answer becomes the final message of its ``WatchPrefill`` (``progress.py``)."""
        pipe = self.progress.open(request.request_id, request.pipeline_secret)
        try:
            resp = self._prefill(request, context)
        except BaseException:
            self.progress.fail(pipe, grpc.StatusCode.ABORTED,
                               f"prefill of {request.request_id} ended without a first token")
            raise
        self.progress.finish(pipe, resp)
        return resp

    def WatchPrefill(self, request: pb.WatchPrefillRequest, context):
        yield from self.progress.watch(request, context)

    def _prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
        except InvalidRequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        mm = image_inputs(self.runtime, request.images, prompt, True, context)
        q = claim_stream(self.loop, rid, context)
        start_request(self.loop, rid, q, lambda: self.engine.add_request(
            rid, prompt, params, hold_kv=True, mm_inputs=mm), context)
        out = wait_output(q, self.runtime.config.request_timeout_s, context.is_active)
        if out is None:
            self.loop.abort(rid, q)  # ours only: the id may be another request's by now
            context.abort(grpc.StatusCode.CANCELLED, f"prefill of {rid} cancelled or timed out")
        self.loop.close_stream(rid, q)
        if out is MIGRATE:  # evicted by a drain: the router places the prefill elsewhere
            context.abort(grpc.StatusCode.UNAVAILABLE, f"worker draining: prefill {rid} moves")
        if not out.new_token_ids:  # aborted (Abort) before its first token
            context.abort(grpc.StatusCode.CANCELLED, f"request {rid} was aborted")
        resp = pb.PrefillResponse(first_token_id=out.new_token_ids[0], text=out.text_delta,
                                  cached_tokens=out.num_cached_tokens)
        if out.finish_reason is not None:
            resp.finished, resp.finish_reason = True, out.finish_reason.value
            return resp
        pinned = self.loop.call(lambda: self._pin(rid))
        if pinned is None:  # aborted between the step and here
            context.abort(grpc.StatusCode.CANCELLED, f"request {rid} was aborted")
        block_ids, resp.hold_id = pinned
        resp.transfer_handle = self._handle(rid, block_ids, len(prompt), resp.hold_id).to_bytes()
        return resp

    def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        """Free the request's held KV: only the hold ``request.hold_id`` names (0 = any)."""
        rid, hold_id = request.request_id, request.hold_id
        unpinned = self.runtime.release_pins(request.embedding_pin_ids)
        return pb.ReleaseResponse(
            released=self.loop.call(lambda: self._release(rid, hold_id)) or unpinned)

    # -- loop-thread helpers ---------------------------------------------------------
    def _pin(self, rid: str) -> tuple[list[int], int] | None:
        """The held request's blocks and a new id naming this hold (None if not held)."""
        req = self.engine.held.get(rid)
        if req is None:
            return None
        hold_id = self._hold_ids[rid] = secrets.randbits(63) or 1
        self._held_at[rid] = time.monotonic()  # not an earlier hold's clock
        return list(req.block_table), hold_id

    def _release(self, rid: str, hold_id: int = 0) -> bool:
        """Unpin ``rid``'s blocks if ``hold_id`` names its hold (0 = any hold)."""
        if hold_id and self._hold_ids.get(rid) != hold_id:
            if rid in self.engine.held:
                logger.info("request %s: release of hold %x left the current hold", rid, hold_id)
            return False
        self._held_at.pop(rid, None)
        self._hold_ids.pop(rid, None)
        return self.engine.release(rid)

    def _handle(self, rid: str, block_ids: list[int], num_tokens: int,
                hold_id: int) -> TransferHandle:
        rt = self.runtime
        n = -(-num_tokens // rt.engine.kv_cache.block_size)
        return TransferHandle(
            request_id=rid, prefill_worker_id=rt.config.worker_id,
            incarnation=rt.info.incarnation if rt.info else 0, agent_name=rt.agent.name,
            block_ids=tuple(block_ids[:n]), num_tokens=num_tokens,
            block_size=rt.engine.kv_cache.block_size, dtype=rt.config.engine.dtype,
            layout=rt.agent.layout().layout, hold_id=hold_id,
            # Held blocks are not written again until released: hashing off the loop is safe.
            block_checksums=block_checksums(rt.engine.kv_cache.layers, block_ids[:n])
            if rt.config.kv_checksums else (),
        ).signed(self._key)

    def _release_pulled(self) -> None:
        """Release what decode workers pulled. NIXL notifications carry no credential, so
        each is checked before it frees anything: from a registered worker's agent, naming
        the request's current hold (a random 63-bit id only the prefill, the router and the
        puller saw; a hold of an earlier incarnation of the process is gone with its ids, so
        no incarnation check: a lease re-granted to this process keeps its holds).
        Anything else is dropped and counted."""
        for peer, msg in self.runtime.poll_notifications():
            try:
                note = KVNotification.from_bytes(msg)
            except ValueError as e:
                self._drop(peer, f"malformed ({e})")
                continue
            if not self.runtime.is_worker_agent(peer):
                self._drop(peer, "sender is no registered worker's NIXL agent")
            elif not note.hold_id or self._hold_ids.get(note.request_id) != note.hold_id:
                self._drop(peer, f"names no current hold of {note.request_id}")
            else:
                self._release(note.request_id, note.hold_id)

    def _drop(self, peer: str, why: str) -> None:
        self.num_notifications_dropped += 1
        logger.warning("dropped a KV notification from %s: %s", peer, why)

    def _release_expired(self) -> None:
        now, timeout = time.monotonic(), self.runtime.config.hold_timeout_s
        for rid in self.engine.held:  # every held request gets a clock, pinned or not
            self._held_at.setdefault(rid, now)
        for rid in [r for r, t in self._held_at.items() if now - t > timeout]:
            logger.warning("request %s: KV not pulled within %.1fs; releasing", rid, timeout)
            self._release(rid)
