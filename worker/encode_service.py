"""Encoding images on a worker: the embedding cache, a batching vision-tower thread, pins.

Any worker of a vision-language model has one ``EncodeService`` (encode role; prefill and
colocated workers encode locally when the cluster has no encode pool). ``encode(data)``::

    image_hash(bytes) -> cache hit?  yes: pin, return        (no decode, no vision tower)
                                     no:  processor (HF) -> batch queue -> vision tower
                                          -> insert pages -> pin, return

A pin keeps the pages from eviction until the reader's NIXL notification (``on_notification``),
``unpin`` (cancellation) or the hold timeout (``expire``). Cache changes become events for
the global embedding index (``take_events``).

Threading: gRPC handlers call ``encode`` concurrently; one daemon thread runs the vision
tower on up to ``max_batch_images`` queued images at a time; a lock guards the cache.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from scission.engine.mm_processor import ImageSegment, MultimodalProcessor
from scission.engine.vision import VisionEncoder
from scission.kv_transfer.embeddings import EmbeddingNotification
from scission.worker.embedding_cache import CacheEntry, EmbeddingCache

logger = logging.getLogger(__name__)


class EncodeError(RuntimeError):
    """The image could not be encoded here (no room in the cache, service stopped)."""


@dataclass(frozen=True)
class Encoded:
    """An image held (pinned) in this worker's cache, as ``Encode`` returns it."""

    entry: CacheEntry
    pin_id: str
    cache_hit: bool


class EncodeService:
    def __init__(self, vision: VisionEncoder, processor: MultimodalProcessor,
                 cache: EmbeddingCache, max_batch_images: int = 8) -> None:
        self.vision = vision
        self.processor = processor
        self.cache = cache
        self.max_batch_images = max_batch_images
        self._lock = threading.Lock()  # guards cache
        self._queue: queue.Queue[tuple[ImageSegment, Future] | None] = queue.Queue()
        self._num_waiting = 0  # images queued or in the running batch
        self._inflight: dict[bytes, Future] = {}  # image_hash -> its encode, until cached
        self.num_encoded = 0  # images run through the vision tower
        self.num_cache_hits = 0  # Encode calls served without the tower (cached or in flight)
        self.num_batches = 0
        self._thread = threading.Thread(target=self._run, name="vision", daemon=True)
        self._thread.start()

    # -- Encode ---------------------------------------------------------------------
    def encode(self, data: bytes, timeout_s: float = 120.0) -> Encoded:
        """Embeddings of one image, pinned for one reader.

        Raises:
            ValueError: the bytes do not decode as an image.
            EncodeError: no cache room (every page pinned), or the tower failed.
        """
        image_hash = self.processor.image_hash(data)
        with self._lock:
            entry = self.cache.get(image_hash)
            if entry is not None:
                self.num_cache_hits += 1
                return Encoded(entry, self.cache.pin(entry), True)
            future = self._inflight.get(image_hash)  # the same image already on its way
            first = future is None
            if first:
                future = self._inflight[image_hash] = Future()
            else:  # served by that encode: not encoded again
                self.num_cache_hits += 1
        if first:
            self._submit(data, image_hash, future)
        try:
            segment, embeddings = future.result(timeout=timeout_s)
        except BaseException:
            if first:
                with self._lock:
                    self._inflight.pop(image_hash, None)
            raise
        with self._lock:
            entry = self.cache.insert(image_hash, embeddings, segment.token_ids)
            if first:  # cached (or not) from now on: later requests look there
                self._inflight.pop(image_hash, None)
            if entry is None:
                raise EncodeError(f"embedding cache full: {self.cache.num_pinned} pins hold "
                                  f"every page")
            return Encoded(entry, self.cache.pin(entry), not first)

    def _submit(self, data: bytes, image_hash: bytes, future: Future) -> None:
        """Preprocess (HF processor) and queue for the vision thread; the future gets
        ``(segment, embeddings)`` or the error."""
        try:
            segment = self.processor.process_image(data)
        except Exception as e:
            future.set_exception(e)  # waiters get it; encode() of the first caller cleans up
            return
        with self._lock:
            self._num_waiting += 1
        self._queue.put((segment, future))

    def read(self, image_hash: bytes) -> torch.Tensor | None:
        """A copy of a cached image's embeddings (local use), or None."""
        with self._lock:
            entry = self.cache.get(image_hash, count_hit=False)
            return None if entry is None else self.cache.read(entry)

    # -- staging pages for pulls (prefill side) ---------------------------------------
    def allocate_staging(self, num_pages: int) -> list[int] | None:
        """Pages a NIXL READ may land in (evicting unpinned entries); None if none free."""
        with self._lock:
            return self.cache.allocate_pages(num_pages)

    def read_pages(self, page_ids: list[int], num_embeddings: int) -> torch.Tensor:
        """``[num_embeddings, hidden_size]`` copied out of staging pages."""
        rows = self.cache.pages[page_ids].reshape(-1, self.cache.hidden_size)
        return rows[:num_embeddings].clone()

    def free_staging(self, page_ids: list[int]) -> None:
        with self._lock:
            self.cache.free_pages(page_ids)

    # -- pins -----------------------------------------------------------------------
    def unpin(self, pin_id: str) -> bool:
        with self._lock:
            return self.cache.unpin(pin_id)

    def on_notification(self, note: EmbeddingNotification, incarnation: int) -> bool:
        """A reader's PULLED/ABORTED: unpin. One addressed to another incarnation of this
        worker is ignored (its pins died with it)."""
        if note.incarnation != incarnation:
            logger.warning("embedding notification for incarnation %d (ours %d) ignored",
                           note.incarnation, incarnation)
            return False
        return self.unpin(note.pin_id)

    def expire(self, hold_timeout_s: float) -> None:
        with self._lock:
            expired = self.cache.expire(hold_timeout_s)
        if expired:
            logger.warning("%d embedding pins not released within %.1fs; unpinned",
                           len(expired), hold_timeout_s)

    # -- state ----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def take_events(self):
        with self._lock:
            return self.cache.take_events()

    def page_counts(self) -> tuple[int, int]:
        """(num_pages, num_free_pages)."""
        with self._lock:
            return self.cache.num_pages, self.cache.num_free_pages

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- the vision thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch_images:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._encode_batch(batch)

    def _encode_batch(self, batch: list[tuple[ImageSegment, Future]]) -> None:
        try:
            with torch.inference_mode():
                outputs = self.vision.encode_batch([seg.pixel_values for seg, _ in batch])
            for (seg, future), emb in zip(batch, outputs, strict=True):
                if emb.shape[0] != seg.num_embeddings:
                    raise EncodeError(f"vision tower gave {emb.shape[0]} rows for "
                                      f"{seg.num_embeddings} image tokens")
                future.set_result((seg, emb))
            self.num_encoded += len(batch)
            self.num_batches += 1
        except Exception as e:  # every waiter gets the error; the thread lives on
            logger.exception("vision tower failed on a batch of %d images", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(EncodeError(f"vision tower failed: {e!r}"))
        finally:
            with self._lock:
                self._num_waiting -= len(batch)


def make_encode_service(engine, config) -> EncodeService | None:
    """The service of a worker whose model has a vision encoder (None for text-only);
    ``config``: the ``WorkerConfig`` (embedding cache size, page size, batch size)."""
    if engine.vision_encoder is None:
        return None
    hidden = engine.model_config.hidden_size
    dtype = engine.config.torch_dtype
    page_bytes = config.embedding_page_tokens * hidden * torch.tensor([], dtype=dtype).element_size()
    num_pages = max(config.embedding_cache_bytes // page_bytes, 1)
    pages = torch.zeros(num_pages, config.embedding_page_tokens, hidden, dtype=dtype)
    logger.info("embedding cache: %d pages of %d rows (%.1f MiB)", num_pages,
                config.embedding_page_tokens, num_pages * page_bytes / 2**20)
    return EncodeService(engine.vision_encoder, engine.mm_processor, EmbeddingCache(pages),
                         config.max_encode_batch_images)


def parse_embedding_notification(msg: bytes) -> EmbeddingNotification | None:
    """The notification if ``msg`` is an ``EmbeddingNotification``, else None."""
    try:
        return EmbeddingNotification.from_bytes(msg)
    except ValueError:
        return None


def encode_rpc(runtime, request, context):
    """The ``Encode`` RPC: one image into this worker's cache, pinned for one reader; the
    response names the pages (``EmbeddingHandle``) and the image's prompt segment."""
    import grpc

    from scission.kv_transfer.capability import transfer_key
    from scission.kv_transfer.embeddings import EmbeddingHandle
    from scission.proto.scission.internal.v1 import worker_pb2 as pb

    service = runtime.encode_service
    if service is None:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"model {runtime.engine.model_config.model_id} takes no images")
    try:
        enc = service.encode(request.image, timeout_s=runtime.config.request_timeout_s)
    except ValueError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {e}")
    except EncodeError as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    entry, cache = enc.entry, service.cache
    handle = EmbeddingHandle(
        pin_id=enc.pin_id, encode_worker_id=runtime.config.worker_id,
        incarnation=runtime.info.incarnation if runtime.info else 0,
        agent_name=runtime.agent.name, image_hash=entry.image_hash,
        page_ids=tuple(entry.page_ids), num_embeddings=entry.num_embeddings,
        hidden_size=cache.hidden_size, page_tokens=cache.page_tokens,
        dtype=str(cache.pages.dtype).removeprefix("torch.")
    ).signed(transfer_key(runtime.config.cluster_token))
    return pb.EncodeResponse(token_ids=entry.segment_token_ids, image_hash=entry.image_hash,
                             num_embeddings=entry.num_embeddings,
                             embedding_handle=handle.to_bytes(), cache_hit=enc.cache_hit)
