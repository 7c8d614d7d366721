"""The router's encode step: a chat request's images become prompt segments + embeddings.

For each image (in parallel, one ``Encode`` call each)::

    image_hash(bytes) -> encoder:  encode pool? -> one that holds it (embedding index hit),
                                                   else the least loaded
                                   no pool     -> the worker that will likely run the
                                                   prompt (EP-D; colocated)
    Encode -> segment token ids + EmbeddingHandle (pages pinned for the prefill's READ)

then the chat template is rendered with one image marker per image and each marker is
replaced by its segment (``engine.multimodal.splice_segments``); the ``ImageRef``s carry each segment's offset,
the image hash (the KV blocks' extra key) and the handle. An encoder that fails is marked
suspect and the image goes to another one, or to a prefill worker (local encoding): a dead
encoder never hangs a request. Text-only requests never come here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent import futures

import grpc

from scission.engine.mm_processor import MultimodalProcessor
from scission.engine.multimodal import splice_segments
from scission.engine.request import InvalidRequestError
from scission.engine.tokenizer import Tokenizer
from scission.proto.scission.internal.v1 import worker_pb2 as wpb
from scission.registry.workers import WorkerInfo, WorkerRole
from scission.router.convert import ValidatedRequest
from scission.router.placement import NoWorkersError, Placer
from scission.router.prefix_index import PrefixIndex
from scission.router.worker_pool import WorkerPool
from scission.worker.embedding_cache import index_key

logger = logging.getLogger(__name__)
MAX_ENCODE_ATTEMPTS = 3
SUSPECT_S = 10.0
# An encoder that failed this way may be gone or full: another one takes the image.
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION)


class EncodeStep:
    def __init__(self, pool: WorkerPool, placer: Placer, tokenizer: Tokenizer,
                 processor: MultimodalProcessor, embedding_index: PrefixIndex | None,
                 timeout_s: float, max_parallel: int = 32) -> None:
        self.pool = pool
        self.placer = placer
        self.tokenizer = tokenizer
        self.processor = processor
        self.index = embedding_index
        self.timeout_s = timeout_s
        self._executor = futures.ThreadPoolExecutor(max_parallel, thread_name_prefix="encode")
        self.num_encoded = 0  # images encoded by a worker's vision tower
        self.num_cache_hits = 0  # images served from a worker's embedding cache
        self.num_retries = 0  # Encode calls repeated on another worker after a failure

    def prepare(self, vr: ValidatedRequest) -> ValidatedRequest:
        """``vr`` with its prompt built and its images encoded (see the module docstring).

        Raises:
            InvalidRequestError: an image the worker cannot decode, or a chat template
                problem (field named).
            NoWorkersError: no worker can encode.
            grpc.RpcError: an Encode failed on every worker tried.
        """
        hashes = [self.processor.image_hash(img.data) for img in vr.images]
        calls = []
        for i, (img, image_hash) in enumerate(zip(vr.images, hashes, strict=True)):
            worker = self._pick(image_hash, frozenset())
            self.pool.begin(worker.worker_id)  # counts now: the next image goes elsewhere
            calls.append(self._executor.submit(self._encode, vr.request_id, i, img.data,
                                               image_hash, worker))
        results = [c.result() for c in calls]
        messages = [_render_parts(m) for m in vr.chat_messages]
        ids = self.tokenizer.apply_chat_template(messages, self.processor.image_marker)
        try:
            prompt, offsets = splice_segments(ids, self.processor.image_token_id,
                                              [tuple(r.token_ids) for _, r in results])
        except ValueError as e:  # a chat template that drops image parts
            self.release_pins(tuple((w, _pin(r)) for w, r in results))
            raise InvalidRequestError("messages", str(e)) from None
        refs = tuple(wpb.ImageRef(offset=o, length=len(r.token_ids), image_hash=r.image_hash,
                                  embedding_handle=r.embedding_handle)
                     for o, (_, r) in zip(offsets, results, strict=True))
        hits = sum(1 for _, r in results if r.cache_hit)
        self.num_cache_hits += hits
        self.num_encoded += len(results) - hits
        return dataclasses.replace(vr, prompt_token_ids=prompt, image_refs=refs,
                                   image_pins=tuple((w, _pin(r)) for w, r in results),
                                   num_cached_images=hits)

    def release_pins(self, pins: Sequence[tuple[WorkerInfo, str]]) -> None:
        """End pins the prefill did not consume (cancellation, failure); fire and forget:
        the encoder's hold timeout frees any this misses."""
        by_worker: dict[str, tuple[WorkerInfo, list[str]]] = {}
        for worker, pin_id in pins:
            by_worker.setdefault(worker.worker_id, (worker, []))[1].append(pin_id)
        for worker, pin_ids in by_worker.values():
            req = wpb.ReleaseRequest(embedding_pin_ids=pin_ids)
            self.pool.stub(worker).Release.future(req, timeout=5.0)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------
    def _encode(self, request_id: str, index: int, data: bytes, image_hash: bytes,
                worker: WorkerInfo) -> tuple[WorkerInfo, wpb.EncodeResponse]:
        tried: set[str] = set()
        for attempt in range(MAX_ENCODE_ATTEMPTS):
            if attempt:
                worker = self._pick(image_hash, frozenset(tried))
                self.pool.begin(worker.worker_id)
                self.num_retries += 1
            try:
                resp = self.pool.stub(worker).Encode(
                    wpb.EncodeRequest(request_id=request_id, image=data), timeout=self.timeout_s)
                if resp.image_hash != image_hash:
                    raise InvalidRequestError(f"images[{index}]", "encoder hashed it differently "
                                              "(a worker of another model or version?)")
                return worker, resp
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequestError(f"images[{index}]", e.details()) from None
                if e.code() not in _RETRY_CODES or attempt + 1 == MAX_ENCODE_ATTEMPTS:
                    raise
                logger.warning("request %s: Encode of image %d on %s failed (%s); retrying "
                               "elsewhere", request_id, index, worker.worker_id, e.code())
                tried.add(worker.worker_id)
                self.pool.mark_suspect(worker.worker_id, SUSPECT_S)
            finally:
                self.pool.end(worker.worker_id)
        raise AssertionError("unreachable")

    def _pick(self, image_hash: bytes, exclude: frozenset[str]) -> WorkerInfo:
        """An encode worker (holding the image, else the least loaded), or without one the
        worker likely to run the prompt (EP-D / colocated)."""
        hits = self.index.match([index_key(image_hash)]) if self.index else {}
        encoders = [w for w in self.pool.workers(WorkerRole.ENCODE)
                    if w.accepts_images and w.worker_id not in exclude]
        if encoders:
            holding = [w for w in encoders if hits.get(w.worker_id)]
            return min(holding or encoders, key=self._encode_load)
        # EP-D: prefill / colocated workers publish their cached images to the same index
        holding = [w for role in (WorkerRole.PREFILL, WorkerRole.COLOCATED)
                   for w in self.pool.workers(role)
                   if w.accepts_images and w.worker_id not in exclude and hits.get(w.worker_id)]
        if holding:
            return min(holding, key=self._encode_load)
        try:
            local = self.placer.place(1, [], 0).prefill_worker
        except NoWorkersError:
            local = None
        if local is not None and local.worker_id not in exclude and local.accepts_images:
            return local
        others = [w for role in (WorkerRole.PREFILL, WorkerRole.COLOCATED, WorkerRole.DECODE)
                  for w in self.pool.workers(role)
                  if w.accepts_images and w.worker_id not in exclude]
        if not others:
            raise NoWorkersError("no worker can encode images (none registered with a vision "
                                 "encoder)")
        return min(others, key=self._encode_load)

    def _encode_load(self, w: WorkerInfo) -> tuple[int, str]:
        stats = self.pool.directory.stats(w.worker_id)
        queued = stats.num_encode_waiting if stats is not None else 0
        return queued + self.pool.load(w).num_running, w.worker_id


def _pin(resp: wpb.EncodeResponse) -> str:
    from scission.kv_transfer.embeddings import EmbeddingHandle

    return EmbeddingHandle.from_bytes(resp.embedding_handle).pin_id


def _render_parts(message: dict) -> dict:
    """A ``ValidatedRequest.chat_messages`` entry as the tokenizer takes it (image parts
    without their index: they come in order)."""
    content = message["content"]
    if isinstance(content, str):
        return message
    return {"role": message["role"],
            "content": [{"type": "image"} if p["type"] == "image" else p for p in content]}
