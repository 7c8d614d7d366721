"""How one request runs once placed: disaggregated (prefill -> NIXL -> decode) or on one
worker (colocated / local prefill). Both yield public ``GenerateResponse`` chunks; the
last one carries ``finish_reason`` and ``Usage``.

Disaggregated, the Decode call goes out after the Prefill returned (the KV is pulled then),
or, with ``pipelining`` (``RouterConfig.kv_pipelining``), together with the Prefill: the
decode worker pulls the KV piece by piece while it is computed (``_pipelined``)."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.router.convert import ValidatedRequest, finish_to_proto
from scission.router.placement import NoWorkersError, Placement
from scission.router.worker_pool import WorkerPool
from scission.worker.convert import sampling_to_proto

logger = logging.getLogger(__name__)


class FlowError(Exception):
    """A worker call failed; carries the gRPC status to end the client's stream with.
    ``failed_worker`` is set when another try may succeed (the worker to avoid; "" =
    retry without avoiding anyone)."""

    def __init__(self, code: grpc.StatusCode, message: str, failed_worker: str | None = None):
        super().__init__(message)
        self.code = code
        self.failed_worker = failed_worker


@dataclass(frozen=True)
class Resume:
    """A request continuing on a new worker after its decode worker failed mid-stream."""

    output_token_ids: tuple[int, ...]  # already streamed to the client
    first_token_s: float  # when the client got its first token (TTFT stays as it was)
    prefill_worker: str


@dataclass
class UsageTracker:
    """Router-side timings: TTFT from receipt to the first token sent."""

    start_s: float
    num_prompt_tokens: int
    prefill_worker: str
    decode_worker: str
    num_output_tokens: int = 0
    cached_tokens: int = 0
    num_images: int = 0
    num_cached_images: int = 0
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.first_token_s is None and n:
            self.first_token_s = now
        self.num_output_tokens += n

    def usage(self) -> pb.Usage:
        end = time.monotonic()
        ttft_ms = ((self.first_token_s or end) - self.start_s) * 1e3
        e2e_ms = (end - self.start_s) * 1e3
        n = self.num_output_tokens
        tpot_ms = (e2e_ms - ttft_ms) / (n - 1) if n > 1 else 0.0
        return pb.Usage(prompt_tokens=self.num_prompt_tokens, output_tokens=n,
                        cached_tokens=self.cached_tokens, ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                        e2e_ms=e2e_ms, prefill_worker=self.prefill_worker,
                        decode_worker=self.decode_worker, images=self.num_images,
                        cached_images=self.num_cached_images)

    @classmethod
    def of(cls, vr: ValidatedRequest, start_s: float, prefill_worker: str,
           decode_worker: str) -> UsageTracker:
        return cls(start_s, len(vr.prompt_token_ids), prefill_worker, decode_worker,
                   num_images=len(vr.image_refs), num_cached_images=vr.num_cached_images)


def _no_fault(e: grpc.RpcError) -> str | None:
    """ABORTED = the worker could not fetch an image's embeddings (the encoder is gone):
    retry (the images are encoded again) without blaming the worker ("" = no one)."""
    return "" if e.code() == grpc.StatusCode.ABORTED else None


def _status(e: grpc.RpcError) -> grpc.StatusCode:
    code = e.code()
    return grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.CANCELLED else code


def stream_chunks(vr: ValidatedRequest, chunks: Iterator[wpb.TokenChunk],
                  track: UsageTracker, lost: Callable[[], bool] = lambda: False
                  ) -> Iterator[pb.GenerateResponse]:
    """Worker TokenChunks -> public responses; raises FlowError if the worker fails.
    ``lost()``: the pool cancelled the call because the worker stopped answering."""
    try:
        for c in chunks:
            if c.cached_tokens:
                track.cached_tokens = c.cached_tokens
            track.add(len(c.token_ids))
            resp = pb.GenerateResponse(request_id=vr.client_request_id,
                                       token_ids=list(c.token_ids), text=c.text)
            if c.finish_reason:
                resp.finish_reason = finish_to_proto(c.finish_reason)
                resp.usage.CopyFrom(track.usage())
                if c.finish_reason == "error":
                    raise FlowError(grpc.StatusCode.INTERNAL, c.error or "worker error")
            yield resp
            if c.finish_reason:
                return
    except grpc.RpcError as e:
        # The worker died or went away, or changed role meanwhile (a flip: UNIMPLEMENTED):
        # the request migrates.
        gone = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED) \
            or lost()
        raise FlowError(_status(e), f"worker {track.decode_worker}: {e.details()}",
                        track.decode_worker if gone else _no_fault(e)) from None
    raise FlowError(grpc.StatusCode.UNAVAILABLE, f"worker {track.decode_worker} ended the stream",
                    track.decode_worker)


def run_local(vr: ValidatedRequest, placement: Placement, pool: WorkerPool, start_s: float,
              timeout_s: float, resume: Resume | None = None) -> Iterator[pb.GenerateResponse]:
    """Prefill and decode on one worker; with ``resume``, continue a migrated request."""
    w = placement.decode
    track = UsageTracker.of(vr, start_s, w.worker_id, w.worker_id)
    req = wpb.GenerateRequest(request_id=vr.request_id, prompt_token_ids=vr.prompt_token_ids,
                              sampling=sampling_to_proto(vr.params), images=vr.image_refs)
    if resume is not None:
        req.output_token_ids.extend(resume.output_token_ids)
        track.prefill_worker = resume.prefill_worker
        track.first_token_s = resume.first_token_s
        track.num_output_tokens = len(resume.output_token_ids)
    pool.begin(w.worker_id, len(vr.prompt_token_ids))
    call = pool.stub(w).Generate(req, timeout=timeout_s)
    try:
        with pool.tracked(w, call):
            yield from stream_chunks(vr, call, track, lambda: pool.was_lost(call))
    finally:
        call.cancel()  # no-op when finished; aborts on the worker otherwise
        pool.end(w.worker_id, len(vr.prompt_token_ids))


def run_disaggregated(vr: ValidatedRequest, placement: Placement, pool: WorkerPool,
                      start_s: float, prefill_timeout_s: float, timeout_s: float,
                      repick: Callable[[], Placement] | None = None, pipelining: bool = False
                      ) -> Iterator[pb.GenerateResponse]:
    """Prefill on ``placement.prefill``, then decode where the KV is pulled. ``repick``
    (``Placer.place_decode``) replaces the decode worker chosen at placement when it stopped
    serving while the prompt was prefilled (drained, flipped to another role, failed): the
    KV is pulled by the new one, nothing is recomputed. ``pipelining``: the decode worker
    pulls while the prompt is prefilled (``_pipelined``; no re-pick: it is already called)."""
    pre = placement.prefill
    assert pre is not None, "disaggregated flow needs a prefill worker"
    track = UsageTracker.of(vr, start_s, pre.worker_id, placement.decode.worker_id)
    # The request counts against its decode worker (``track.decode_worker``; a re-pick moves
    # it) from placement on, not only once its prefill is done, so a burst spreads over the
    # decode pool.
    pool.begin(track.decode_worker)
    try:
        if pipelining:
            yield from _pipelined(vr, pre, placement.decode, pool, track, prefill_timeout_s,
                                  timeout_s)
        else:
            yield from _prefill_then_decode(vr, pre, placement.decode, pool, track,
                                            prefill_timeout_s, timeout_s, repick)
    finally:
        pool.end(track.decode_worker)


def _still_serving(pool: WorkerPool, info) -> bool:
    """``info`` (same incarnation) is still routable in its role: registered, not draining,
    not suspect."""
    return any(w.worker_id == info.worker_id and w.incarnation == info.incarnation
               for w in pool.workers(info.role))


def _recheck_decode(vr: ValidatedRequest, dec, pool: WorkerPool,
                    repick: Callable[[], Placement] | None, track: UsageTracker):
    """The decode worker to call now: ``dec``, or another one if ``dec`` stopped serving."""
    if repick is None or _still_serving(pool, dec):
        return dec
    try:
        new = repick().decode
    except NoWorkersError:
        return dec  # its Decode call fails and the request migrates, or fails clearly
    logger.info("request %s: decode worker %s stopped serving during the prefill; %s pulls "
                "the KV instead", vr.request_id, dec.worker_id, new.worker_id)
    pool.end(track.decode_worker)
    pool.begin(new.worker_id)
    track.decode_worker = new.worker_id
    return new


def _prefill_then_decode(vr: ValidatedRequest, pre, dec, pool: WorkerPool,
                         track: UsageTracker, prefill_timeout_s: float, timeout_s: float,
                         repick: Callable[[], Placement] | None
                         ) -> Iterator[pb.GenerateResponse]:
    first = _prefill(vr, pre, pool, prefill_timeout_s)
    resp = _first_response(vr, first, track)
    if first.finished:  # nothing held on the prefill worker
        yield resp
        return
    done, call = False, None
    try:
        yield resp  # the client may already be gone: GeneratorExit here releases below
        dec = _recheck_decode(vr, dec, pool, repick, track)
        req = _decode_request(vr, first_token_id=first.first_token_id,
                              transfer_handle=first.transfer_handle)
        call = pool.stub(dec).Decode(req, timeout=timeout_s)
        with pool.tracked(dec, call):
            yield from stream_chunks(vr, call, track, lambda: pool.was_lost(call))
        done = True
    finally:
        if call is not None:
            call.cancel()
        if not done:  # cancelled or failed, maybe before the pull: free the prefill KV now
            _release(pool, pre, vr.request_id, first.hold_id)


def _pipelined(vr: ValidatedRequest, pre, dec, pool: WorkerPool, track: UsageTracker,
               prefill_timeout_s: float, timeout_s: float) -> Iterator[pb.GenerateResponse]:
    """Prefill and Decode called together: the decode worker watches the prefill (with a
    secret only this attempt's two calls know) and pulls each piece of KV as it is computed
    (``decode_worker/pipelined_pull.py``). The first token is streamed when the Prefill
    returns, then Decode's chunks. A failed Prefill cancels the Decode (FlowError: retry); a
    failed Decode releases the hold and the request migrates as in the plain flow."""
    secret = secrets.token_bytes(16)
    req = _decode_request(vr, pipeline=wpb.KVPipeline(prefill_worker_id=pre.worker_id,
                                                      pipeline_secret=secret))
    calls: list = []
    first, done = None, False
    with contextlib.ExitStack() as tracked:
        def start_decode() -> None:
            calls.append(pool.stub(dec).Decode(req, timeout=timeout_s))
            tracked.enter_context(pool.tracked(dec, calls[0]))

        try:
            first = _prefill(vr, pre, pool, prefill_timeout_s, secret, start_decode)
            yield _first_response(vr, first, track)
            if not first.finished:  # else nothing is held, and Decode is cancelled below
                yield from stream_chunks(vr, calls[0], track, lambda: pool.was_lost(calls[0]))
            done = True
        finally:
            for call in calls:
                call.cancel()  # no-op when finished; frees its reserved blocks otherwise
            if not done and first is not None and not first.finished:
                _release(pool, pre, vr.request_id, first.hold_id)


def _first_response(vr: ValidatedRequest, first: wpb.PrefillResponse,
                    track: UsageTracker) -> pb.GenerateResponse:
    """The first token's response (with finish reason and usage if it ended the request)."""
    track.cached_tokens = first.cached_tokens
    track.add(1)
    resp = pb.GenerateResponse(request_id=vr.client_request_id,
                               token_ids=[first.first_token_id], text=first.text)
    if first.finished:
        resp.finish_reason = finish_to_proto(first.finish_reason)
        resp.usage.CopyFrom(track.usage())
    return resp


def _decode_request(vr: ValidatedRequest, **kv) -> wpb.DecodeRequest:
    """``kv``: the first token and transfer handle, or the pipeline."""
    return wpb.DecodeRequest(request_id=vr.request_id, prompt_token_ids=vr.prompt_token_ids,
                             sampling=sampling_to_proto(vr.params),
                             images=[wpb.ImageRef(offset=r.offset, length=r.length,
                                                  image_hash=r.image_hash)
                                     for r in vr.image_refs],  # keys only: KV is pulled
                             **kv)


def _prefill(vr: ValidatedRequest, pre, pool: WorkerPool, timeout_s: float,
             pipeline_secret: bytes = b"", on_sent: Callable[[], None] = lambda: None
             ) -> wpb.PrefillResponse:
    """The Prefill call's answer; ``on_sent()`` runs once it is sent (pipelining: Decode)."""
    n = len(vr.prompt_token_ids)
    req = wpb.PrefillRequest(request_id=vr.request_id, prompt_token_ids=vr.prompt_token_ids,
                             sampling=sampling_to_proto(vr.params), images=vr.image_refs,
                             pipeline_secret=pipeline_secret)
    pool.begin(pre.worker_id, n)
    try:
        future = pool.stub(pre).Prefill.future(req, timeout=timeout_s)
        on_sent()
        with pool.tracked(pre, future):
            return future.result()
    except grpc.FutureCancelledError:  # the pool's: the worker stopped answering
        raise FlowError(grpc.StatusCode.UNAVAILABLE,
                        f"prefill worker {pre.worker_id} stopped answering", pre.worker_id
                        ) from None
    except grpc.RpcError as e:
        retry = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        raise FlowError(_status(e), f"prefill worker {pre.worker_id}: {e.details()}",
                        pre.worker_id if retry else _no_fault(e)) from None
    finally:
        pool.end(pre.worker_id, n)


def _release(pool: WorkerPool, pre, request_id: str, hold_id: int) -> None:
    """Free the hold this attempt's prefill made (``hold_id``), and no later one of the
    same request_id."""
    try:
        pool.stub(pre).Release(wpb.ReleaseRequest(request_id=request_id, hold_id=hold_id),
                               timeout=5)
    except grpc.RpcError as e:  # the hold timeout frees it anyway
        logger.warning("release of %s on %s failed: %s", request_id, pre.worker_id, e.code())
