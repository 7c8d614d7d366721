"""Decode role (and colocated role): pull the prompt's KV over NIXL, then stream tokens.

``Decode``: reserve blocks, one-sided NIXL READ of the prefill worker's blocks into them
(the READ's notification tells prefill to release), then join the running batch without
running the prompt through the model. If the pull fails, the request is either recomputed
locally (prompt + first token, the default) or failed with UNAVAILABLE. A READ that failed
or timed out leaves its blocks in quarantine (``decode_worker/quarantine.py``) until the
prefill peer is disconnected: NIXL may still write into them.
``Generate``: prompt in, tokens out on this worker (colocated mode, or local prefill).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import grpc

from scission.decode_worker.fault_points import FaultPoints
from scission.decode_worker.pipelined_pull import PipelinedPull
from scission.decode_worker.quarantine import KVQuarantine, QuarantinedPull
from scission.engine.request import InvalidRequestError
from scission.kv_transfer.agent import KVTransferError
from scission.kv_transfer.capability import transfer_key
from scission.kv_transfer.handle import (
    KVLayoutDescriptor,
    KVNotification,
    KVNotificationKind,
    TransferHandle,
)
from scission.kv_transfer.integrity import mismatched_blocks
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.registry.workers import WorkerInfo
from scission.worker.convert import sampling_from_proto
from scission.worker.embedding_pull import image_inputs
from scission.worker.runtime import BaseWorkerServicer, WorkerRuntime
from scission.worker.stream import claim_stream, stream_request

logger = logging.getLogger(__name__)


class DecodeServicer(BaseWorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime)
        self.pulled: OrderedDict[str, list[int]] = OrderedDict()  # rid -> local blocks (recent)
        self.num_pull_failures = 0
        self.num_kv_checksum_mismatches = 0  # pulls whose blocks did not match the handle's
        self.num_kv_blocks_pulled = 0  # blocks READ from prefill workers
        self.num_kv_blocks_reused = 0  # prompt blocks this worker's prefix cache already held
        self.quarantine = KVQuarantine()  # loop thread only
        self._key = transfer_key(runtime.config.cluster_token)  # verifies transfer handles
        self._faults = FaultPoints.from_env()  # tests only: tests/faults/test_death_during_pull
        self.loop.add_hook(self._end_quarantine)
        self._pipelined = PipelinedPull(self)  # Decode with a pipeline: pipelined_pull.py

    def close(self) -> None:
        """Role flip away from decode: disconnect the quarantined peers, free their blocks."""
        self.loop.remove_hook(self._end_quarantine)
        self.loop.call(lambda: [self._disconnect(name, "role flip")
                                for name, _ in self.quarantine.peers()])

    @property
    def num_quarantined_blocks(self) -> int:
        return self.quarantine.num_blocks

    @property
    def num_kv_pipelined_reads(self) -> int:
        return self._pipelined.num_reads

    def Generate(self, request: pb.GenerateRequest, context):
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        params = self._params(request.sampling, context)
        outputs = list(request.output_token_ids)
        mm = image_inputs(self.runtime, request.images, prompt, True, context)
        if outputs:  # migrated here: recompute prompt + what was already streamed
            add = lambda: self.engine.add_recompute_request(rid, prompt, outputs, params, mm)  # noqa: E731
        else:
            add = lambda: self.engine.add_request(rid, prompt, params, mm_inputs=mm)  # noqa: E731
        yield from stream_request(self.loop, rid, add, context,
                                  self.runtime.config.request_timeout_s)

    def Decode(self, request: pb.DecodeRequest, context):
        if request.HasField("pipeline"):  # pipelined hand-off (pipelined_pull.py)
            yield from self._pipelined.decode(request, context)
            return
        handle = self._checked_handle(request, context)
        rid, prompt, params, mm, q, blocks, num_cached = self._admit(request, context)
        first = request.first_token_id
        if self._pull(handle, rid, blocks, num_cached):
            add = lambda: self.engine.add_prefilled_request(rid, prompt, first, params, blocks,  # noqa: E731
                                                            mm_inputs=mm)
            undo = lambda: self.loop.call(lambda: self.engine.free_reserved(rid, blocks))  # noqa: E731
        else:  # the blocks were freed or quarantined
            # An image request's embeddings were released after the prefill pulled them:
            # recomputing here would need them again, so the router re-runs it instead.
            if mm or not self.runtime.config.kv_pull_failure_recompute:
                self.loop.close_stream(rid, q)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"KV pull for {rid} failed")
            add = lambda: self.engine.add_recompute_request(rid, prompt, [first], params)  # noqa: E731
            undo = lambda: None  # noqa: E731
        yield from stream_request(self.loop, rid, add, context,
                                  self.runtime.config.request_timeout_s, q, undo)

    # -- helpers -----------------------------------------------------------------------
    def _admit(self, request: pb.DecodeRequest, context):
        """A Decode's common start: sampling params, image inputs, the stream claimed for the
        request id (a duplicate reserves nothing), and its prompt blocks (``_reserve``).

        Returns:
            ``(rid, prompt, params, mm_inputs, queue, block_ids, num_cached_blocks)``.
        """
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        params = self._params(request.sampling, context)
        mm = image_inputs(self.runtime, request.images, prompt, False, context)
        q = claim_stream(self.loop, rid, context)
        try:
            blocks, num_cached = self._reserve(rid, prompt, mm, context)
        except BaseException:
            self.loop.close_stream(rid, q)
            raise
        return rid, prompt, params, mm, q, blocks, num_cached

    def _params(self, m: pb.SamplingParams, context):
        try:
            return sampling_from_proto(m)
        except InvalidRequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _checked_handle(self, request: pb.DecodeRequest, context) -> TransferHandle:
        """The request's transfer handle; INVALID_ARGUMENT if malformed or not this prompt's."""
        try:
            handle = TransferHandle.from_bytes(request.transfer_handle)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer_handle: {e}")
        if not handle.verify(self._key):  # a capability: minted by a prefill worker only
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transfer_handle: not issued by "
                          "this cluster's prefill workers (its MAC does not verify)")
        if handle.num_tokens != len(request.prompt_token_ids) \
                or handle.block_size != self.engine.kv_cache.block_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "transfer_handle: num_tokens/block_size do not match this request")
        return handle

    def _reserve(self, rid: str, prompt: list[int], mm, context) -> tuple[list[int], int]:
        """Blocks for the pulled prompt and how many leading ones this worker's prefix cache
        already holds (those are not pulled), waiting while the cache is full: running
        requests finish and free theirs (an overload queues here rather than failing), up to
        ``WorkerConfig.kv_reserve_timeout_s``, then RESOURCE_EXHAUSTED. If the prefill
        worker's hold ran out meanwhile, the pull fails and the prompt is recomputed here."""
        deadline = time.monotonic() + self.runtime.config.kv_reserve_timeout_s
        while True:
            reserved = self.loop.call(lambda: self.engine.reserve_prompt_blocks(rid, prompt, mm))
            if reserved is not None:
                return reserved
            if time.monotonic() > deadline or not context.is_active():
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"no free KV blocks for {len(prompt)} prompt tokens")
            time.sleep(0.05)

    def _pull(self, handle: TransferHandle, rid: str, blocks: list[int], num_cached: int) -> bool:
        """NIXL READ of the handle's blocks after the first ``num_cached`` (already here)
        into ``blocks[num_cached:]``; False on any failure, with ``blocks`` freed, or
        quarantined if NIXL failed or timed out: the READ may have been posted, and until
        the peer is known dead (``_end_quarantine``) it may still land."""
        note = KVNotification(kind=KVNotificationKind.PULL_DONE, request_id=handle.request_id,
                              incarnation=handle.incarnation, hold_id=handle.hold_id).to_bytes()
        reading = False  # the READ may have been posted
        try:
            self._ensure_peer(handle)
            self._faults.reach("decode.pull", {"request_id": rid, "worker_id": self.runtime.config
                                .worker_id, "prefill_worker_id": handle.prefill_worker_id})
            reading = True
            self.runtime.agent.read_blocks(handle.agent_name, list(handle.block_ids[num_cached:]),
                                           blocks[num_cached:], note,
                                           timeout_s=self.runtime.config.kv_pull_timeout_s)
        except (KVTransferError, LookupError, ValueError) as e:
            self.num_pull_failures += 1
            logger.warning("KV pull for %s from %s failed: %s", handle.request_id,
                           handle.prefill_worker_id, e)
            # A NIXL error is not proof the READ is dead: one of its requests failed, others
            # may be in flight (checkXfer reports the first error). A dead peer's quarantine
            # ends within its lease TTL, when its incarnation leaves the directory.
            if reading and isinstance(e, KVTransferError):
                pull = QuarantinedPull(rid, handle.prefill_worker_id, tuple(blocks),
                                       time.monotonic())
                self.loop.call(lambda: self.quarantine.add(handle.agent_name, pull))
            else:
                self.loop.call(lambda: self.engine.free_reserved(rid, blocks))
            return False
        self.num_kv_blocks_pulled += len(blocks) - num_cached
        self.num_kv_blocks_reused += num_cached
        if handle.block_checksums:
            bad = mismatched_blocks(handle.block_checksums[num_cached:],
                                    self.engine.kv_cache.layers, blocks[num_cached:])
            if bad:  # the READ is complete: the blocks can be reused at once
                self.num_pull_failures += 1
                self.num_kv_checksum_mismatches += 1
                logger.error("KV pull for %s from %s: %d of %d blocks fail their checksum "
                             "(first at block %d); recomputing", handle.request_id,
                             handle.prefill_worker_id, len(bad), len(blocks) - num_cached,
                             num_cached + bad[0])
                self.loop.call(lambda: self.engine.free_reserved(rid, blocks))
                return False
        self.pulled[handle.request_id] = list(blocks)
        while len(self.pulled) > 256:
            self.pulled.popitem(last=False)
        return True

    def _ensure_peer(self, handle: TransferHandle) -> None:
        if handle.agent_name in self.runtime.agent.peers():
            return
        info: WorkerInfo | None = self.runtime.directory.get(handle.prefill_worker_id)
        if info is None or info.agent_name != handle.agent_name:
            raise LookupError(f"prefill worker {handle.prefill_worker_id} ({handle.agent_name}) "
                              "is not registered")
        self.runtime.agent.add_peer(info.agent_name, info.agent_metadata,
                                    KVLayoutDescriptor.from_bytes(info.kv_layout))

    # -- loop-thread helpers -----------------------------------------------------------
    def _end_quarantine(self) -> None:
        """Hook: a quarantined peer whose incarnation left the directory, or whose oldest
        quarantined pull is ``kv_quarantine_max_s`` old, is disconnected: its transfers are
        dead and their blocks are freed."""
        if not self.quarantine:
            return
        now, max_s = time.monotonic(), self.runtime.config.kv_quarantine_max_s
        for name, oldest in self.quarantine.peers():
            info = self.runtime.directory.get(oldest.prefill_worker_id)
            if info is None or info.agent_name != name:
                self._disconnect(name, "its incarnation left the directory")
            elif now - oldest.since_s > max_s:
                self._disconnect(name, f"quarantined for over {max_s:.0f}s")

    def _disconnect(self, agent_name: str, why: str) -> None:
        """Remove the peer from the agent (nothing it sends lands any more), then free the
        blocks quarantined for it."""
        self.runtime.agent.remove_peer(agent_name)
        pulls = self.quarantine.pop(agent_name)
        for pull in pulls:
            self.engine.free_reserved(pull.request_id, list(pull.block_ids))
        logger.info("disconnected KV peer %s (%s): freed %d quarantined block(s) of %d "
                    "pull(s); %d still quarantined", agent_name, why,
                    sum(len(p.block_ids) for p in pulls), len(pulls), self.quarantine.num_blocks)
