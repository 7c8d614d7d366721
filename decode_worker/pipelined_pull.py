"""Pipelined KV hand-off, decode side: pull each piece of a prompt's KV as soon as the
prefill worker has computed it, so the transfer overlaps the prefill instead of following it.

``Decode`` with ``DecodeRequest.pipeline`` set (the router sends it together with the
``Prefill``, not after it) reserves blocks as a plain ``Decode`` does, then watches the
prefill (``WatchPrefill`` on the prefill worker, ``prefill_worker/progress.py``):

1. each partial handle (the full prompt blocks computed so far): READ the blocks not read yet
   and not held by this worker's prefix cache, with no notification;
2. the final message (full handle of the hold + first token): READ the rest with the
   PULL_DONE notification, which releases the prefill hold as in the plain pull. Blocks read
   under another preemption count or other block ids than the final handle's are read again
   (a preempted prefill request's blocks were freed and may have been reused meanwhile);
3. checksums (if the handle has them) are checked over every pulled block, then the request
   joins the batch with the first token, as after a plain pull.

Failures follow the plain pull's rules (``DecodeServicer._pull``): a failed READ leaves the
blocks quarantined (freed otherwise), the rest of the watch is only waited through for the
first token, and the prompt is recomputed here (or the call fails with UNAVAILABLE). If the
watch ends without a first token (the prefill failed, was cancelled, or its worker died) the
call ends with ABORTED and frees its blocks: the router retries or migrates the request. A
caller that goes away at any point cancels the watch and frees the blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from scission.decode_worker.quarantine import QuarantinedPull
from scission.kv_transfer.agent import KVTransferError
from scission.kv_transfer.handle import KVNotification, KVNotificationKind, TransferHandle
from scission.kv_transfer.integrity import mismatched_blocks
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as pb_grpc
from scission.worker.cluster_auth import with_cluster_token
from scission.worker.stream import stream_request

if TYPE_CHECKING:
    from scission.decode_worker.servicer import DecodeServicer

logger = logging.getLogger(__name__)


class PullFailedError(Exception):
    """A piece of the hand-off failed; the blocks were freed or quarantined."""


class PipelinedPull:
    """``Decode`` with a pipeline, for one decode servicer (whose reservation, peer set,
    quarantine and counters it shares)."""

    def __init__(self, servicer: DecodeServicer) -> None:
        self.s = servicer
        self.num_reads = 0  # READs made before the prefill's final message
        self._lock = threading.Lock()
        self._stubs: dict[str, pb_grpc.WorkerStub] = {}  # prefill endpoint -> stub

    def decode(self, request: pb.DecodeRequest, context) -> Iterator[pb.TokenChunk]:
        s = self.s
        rid, prompt, params, mm, q, blocks, num_cached = s._admit(request, context)
        pull = _Pull(self, request, blocks, num_cached)
        try:
            final = pull.run(context)
        except BaseException:  # the caller went away, or the prefill ended without a token
            pull.give_back()
            s.loop.close_stream(rid, q)
            raise
        first = final.first_token_id
        if final.finished:  # the first token ended the request: nothing to decode
            pull.give_back()
            s.loop.close_stream(rid, q)
            return
        if pull.ok:
            add = lambda: s.engine.add_prefilled_request(rid, prompt, first, params, blocks,  # noqa: E731
                                                         mm_inputs=mm)
            undo = lambda: s.loop.call(lambda: s.engine.free_reserved(rid, blocks))  # noqa: E731
        else:  # freed or quarantined; the rules of DecodeServicer.Decode
            if mm or not s.runtime.config.kv_pull_failure_recompute:
                s.loop.close_stream(rid, q)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"KV pull for {rid} failed")
            add = lambda: s.engine.add_recompute_request(rid, prompt, [first], params)  # noqa: E731
            undo = lambda: None  # noqa: E731
        yield from stream_request(s.loop, rid, add, context,
                                  s.runtime.config.request_timeout_s, q, undo)

    def watch(self, pipeline: pb.KVPipeline, request_id: str):
        """The ``WatchPrefill`` stream on the pipeline's prefill worker (cluster token)."""
        rt = self.s.runtime
        info = rt.directory.get(pipeline.prefill_worker_id)
        if info is None:
            raise PullFailedError(f"prefill worker {pipeline.prefill_worker_id} is not "
                                  "registered")
        with self._lock:
            stub = self._stubs.get(info.endpoint)
            if stub is None:
                channel = with_cluster_token(grpc.insecure_channel(info.endpoint),
                                             rt.config.cluster_token)
                stub = self._stubs[info.endpoint] = pb_grpc.WorkerStub(channel)
        return stub.WatchPrefill(pb.WatchPrefillRequest(
            request_id=request_id, pipeline_secret=pipeline.pipeline_secret),
            timeout=rt.config.request_timeout_s)


class _Pull:
    """One pipelined pull into ``blocks`` (``blocks[:num_cached]`` are this worker's cached
    prefix: never read)."""

    def __init__(self, owner: PipelinedPull, request: pb.DecodeRequest, blocks: list[int],
                 num_cached: int) -> None:
        self.owner, self.s = owner, owner.s
        self.request, self.rid = request, request.request_id
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.blocks, self.num_cached = blocks, num_cached
        self.remote: list[int] = []  # prefill block ids of blocks[:len(remote)], read
        self.num_preemptions = 0  # the prefill request's, when ``remote`` was read
        self.num_blocks_read = 0
        self.handle: TransferHandle | None = None  # the last one read from
        self.failed = False  # the blocks were freed or quarantined
        self.ok = False  # the final READ (and checksums) succeeded

    def run(self, context) -> pb.PrefillProgress:
        """Pull as the pieces arrive; the final message. Ends the call with ABORTED if the
        watch ends without one."""
        try:
            call = self.owner.watch(self.request.pipeline, self.rid)
            context.add_callback(call.cancel)  # the caller going away ends the watch
            for msg in call:
                if msg.final:
                    self._final(msg)
                    return msg
                if not self.failed:
                    self._guarded(lambda m=msg: self._partial(m))
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except PullFailedError as e:
            why = str(e)
        else:
            why = "the watch ended without a final message"
        context.abort(grpc.StatusCode.ABORTED, f"prefill of {self.rid} ended before its KV "
                      f"was handed off ({why})")

    def _partial(self, msg: pb.PrefillProgress) -> None:
        handle = self._verified(msg.transfer_handle)
        self._sync(msg.num_preemptions, handle)
        if self._read(handle, b""):
            self.owner.num_reads += 1

    def _final(self, msg: pb.PrefillProgress) -> None:
        if msg.finished or self.failed:
            return
        self._guarded(lambda: self._final_read(msg))

    def _final_read(self, msg: pb.PrefillProgress) -> None:
        handle = self._verified(msg.transfer_handle)
        if handle.num_tokens != self.num_prompt_tokens or not handle.hold_id:
            raise PullFailedError("the final handle is not this prompt's hold")
        self._sync(msg.num_preemptions, handle)
        note = KVNotification(kind=KVNotificationKind.PULL_DONE, request_id=handle.request_id,
                              incarnation=handle.incarnation, hold_id=handle.hold_id)
        self._read(handle, note.to_bytes())
        s, n = self.s, self.num_cached
        if handle.block_checksums:
            bad = mismatched_blocks(handle.block_checksums[n:], s.engine.kv_cache.layers,
                                    self.blocks[n:])
            if bad:  # every READ is complete: the blocks can be reused at once
                s.num_kv_checksum_mismatches += 1
                raise PullFailedError(f"{len(bad)} of {len(self.blocks) - n} blocks fail "
                                      f"their checksum (first at block {n + bad[0]})")
        s.num_kv_blocks_pulled += self.num_blocks_read
        s.num_kv_blocks_reused += n
        s.pulled[self.rid] = list(self.blocks)
        while len(s.pulled) > 256:
            s.pulled.popitem(last=False)
        self.ok = True

    def _sync(self, num_preemptions: int, handle: TransferHandle) -> None:
        """Forget what was read if the prefill request was preempted since, or its blocks
        are not the ones read (then everything is read again)."""
        if num_preemptions != self.num_preemptions \
                or list(handle.block_ids[:len(self.remote)]) != self.remote:
            if self.remote:
                logger.info("pipelined pull of %s: prefill blocks changed (preempted %d "
                            "times); reading them again", self.rid, num_preemptions)
            self.remote, self.num_preemptions = [], num_preemptions

    def _read(self, handle: TransferHandle, note: bytes) -> bool:
        """READ ``handle``'s blocks past those read and cached here; True if any was."""
        start, end = max(len(self.remote), self.num_cached), handle.num_blocks
        remote = list(handle.block_ids[start:end])
        if remote or note:
            self.s._ensure_peer(handle)
            self.handle = handle  # a READ from its peer may be posted from here on
            self.s.runtime.agent.read_blocks(handle.agent_name, remote, self.blocks[start:end],
                                             note, timeout_s=self.s.runtime.config
                                             .kv_pull_timeout_s)
        self.remote = list(handle.block_ids[:end])
        self.num_blocks_read += len(remote)
        return bool(remote)

    def _verified(self, data: bytes) -> TransferHandle:
        try:
            handle = TransferHandle.from_bytes(data)
        except ValueError as e:
            raise PullFailedError(f"malformed transfer handle: {e}") from None
        p = self.request.pipeline
        if not handle.verify(self.s._key) or handle.request_id != self.rid \
                or handle.prefill_worker_id != p.prefill_worker_id \
                or handle.block_size != self.s.engine.kv_cache.block_size \
                or handle.num_tokens > self.num_prompt_tokens:
            raise PullFailedError("a transfer handle that does not verify or is not this "
                                  "prompt's")
        return handle

    def _guarded(self, step) -> None:
        """Run a pull step; on failure free the blocks, or quarantine them if a READ may
        still land (``DecodeServicer._pull``), and go on without pulling."""
        try:
            step()
        except (KVTransferError, LookupError, ValueError, PullFailedError) as e:
            self.s.num_pull_failures += 1
            logger.warning("pipelined KV pull for %s failed: %s", self.rid, e)
            if isinstance(e, KVTransferError) and self.handle is not None:
                pull = QuarantinedPull(self.rid, self.handle.prefill_worker_id,
                                       tuple(self.blocks), time.monotonic())
                name = self.handle.agent_name
                self.s.loop.call(lambda: self.s.quarantine.add(name, pull))
            else:
                self._free()
            self.failed = True

    def give_back(self) -> None:
        """The call ends without the request joining the batch: free the blocks (unless a
        failure already freed or quarantined them)."""
        if not self.failed:
            self._free()
            self.failed = True

    def _free(self) -> None:
        self.s.loop.call(lambda: self.s.engine.free_reserved(self.rid, self.blocks))
