"""A request's images as engine inputs: pull the embeddings its handles name.

``resolve_images`` turns the ``ImageRef``s of a Prefill / Generate / Decode call into
``MMInput``s. With embeddings (prefill, colocated, recompute) each handle is served:

- **here** (the handle names this worker and incarnation: local encoding, EP-D): a copy
  out of this worker's cache, then the pin ends;
- **elsewhere** (an encode worker): a one-sided NIXL READ of its pages into staging pages
  of this worker's cache, whose notification (``PULLED``) ends the encoder's pin; on any
  failure an ``ABORTED`` notification ends it instead (best effort: the encoder's hold
  timeout covers a lost one).

Without embeddings (decode: the KV was pulled) only the keys are needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from scission.engine.multimodal import MMInput, make_mm_input
from scission.kv_transfer.agent import KVTransferError
from scission.kv_transfer.capability import transfer_key
from scission.kv_transfer.embeddings import (
    IMAGE_HASH_BYTES,
    EmbeddingHandle,
    EmbeddingLayout,
    EmbeddingNotification,
    EmbeddingNotificationKind,
)
from scission.kv_transfer.handle import KVLayoutDescriptor
from scission.proto.scission.internal.v1 import worker_pb2 as pb

logger = logging.getLogger(__name__)


class ImageInputError(ValueError):
    """A malformed ImageRef (maps to INVALID_ARGUMENT)."""


class EmbeddingPullError(RuntimeError):
    """The embeddings could not be fetched (encoder gone, transfer failed): UNAVAILABLE."""


def resolve_images(runtime, refs: Sequence[pb.ImageRef], prompt: Sequence[int],
                   need_embeddings: bool) -> list[MMInput]:
    """``MMInput``s of a request's images (see the module docstring).

    Raises:
        ImageInputError: a segment outside the prompt, a bad hash or handle, images sent to
            a text-only model, or a handle that does not match its segment.
        EmbeddingPullError: the embeddings could not be fetched.
    """
    if not refs:
        return []
    processor = runtime.engine.mm_processor
    if processor is None:
        raise ImageInputError(f"model {runtime.engine.model_config.model_id} takes no images")
    out = []
    for i, ref in enumerate(refs):
        if len(ref.image_hash) != IMAGE_HASH_BYTES or ref.length == 0 \
                or ref.offset + ref.length > len(prompt):
            raise ImageInputError(f"images[{i}]: bad segment or image_hash")
        mm = make_mm_input(prompt, ref.offset, ref.length, processor.image_token_id,
                           bytes(ref.image_hash))
        if need_embeddings:
            emb = _embeddings(runtime, i, ref, len(mm.embed_positions))
            mm = make_mm_input(prompt, ref.offset, ref.length, processor.image_token_id,
                               mm.image_hash, emb)
        out.append(mm)
    return out


def _embeddings(runtime, i: int, ref: pb.ImageRef, num_positions: int) -> torch.Tensor:
    try:
        handle = EmbeddingHandle.from_bytes(ref.embedding_handle)
    except ValueError as e:
        raise ImageInputError(f"images[{i}].embedding_handle: {e}") from None
    if not handle.verify(transfer_key(runtime.config.cluster_token)):
        raise ImageInputError(f"images[{i}].embedding_handle: not issued by this cluster "
                              "(its MAC does not verify)")
    if handle.image_hash != ref.image_hash or handle.num_embeddings != num_positions:
        raise ImageInputError(f"images[{i}]: handle is for another image or segment "
                              f"({handle.num_embeddings} embeddings, {num_positions} positions)")
    service = runtime.encode_service
    if service is None:
        raise ImageInputError("this worker has no embedding pages (text-only model)")
    if handle.encode_worker_id == runtime.config.worker_id:
        return _local(runtime, handle)
    return _pull(runtime, handle)


def _local(runtime, handle: EmbeddingHandle) -> torch.Tensor:
    service = runtime.encode_service
    if runtime.info is None or handle.incarnation != runtime.info.incarnation:
        raise EmbeddingPullError("embedding handle of another incarnation of this worker")
    emb = service.read(handle.image_hash)
    service.unpin(handle.pin_id)
    if emb is None:
        raise EmbeddingPullError("image no longer in this worker's embedding cache")
    return emb


def _pull(runtime, handle: EmbeddingHandle) -> torch.Tensor:
    service = runtime.encode_service
    note = EmbeddingNotification(kind=EmbeddingNotificationKind.PULLED, pin_id=handle.pin_id,
                                 incarnation=handle.incarnation)
    pages = service.allocate_staging(len(handle.page_ids))
    if pages is None:
        _abort(runtime, handle)
        raise EmbeddingPullError("no free embedding pages to stage the pull")
    try:
        _ensure_peer(runtime, handle)
        runtime.agent.read_pages(handle.agent_name, handle.page_ids, pages, note.to_bytes(),
                                 timeout_s=runtime.config.kv_pull_timeout_s)
        return service.read_pages(pages, handle.num_embeddings)
    except (KVTransferError, LookupError, ValueError) as e:
        _abort(runtime, handle)
        raise EmbeddingPullError(f"embedding pull from {handle.encode_worker_id} failed: "
                                 f"{e}") from e
    finally:
        service.free_staging(pages)


def _ensure_peer(runtime, handle: EmbeddingHandle) -> None:
    if handle.agent_name in runtime.agent.peers():
        return
    info = runtime.directory.get(handle.encode_worker_id)
    if info is None or info.agent_name != handle.agent_name or not info.embedding_layout:
        raise LookupError(f"encode worker {handle.encode_worker_id} ({handle.agent_name}) is "
                          "not registered")
    if info.incarnation != handle.incarnation:
        raise LookupError(f"encode worker {handle.encode_worker_id}: handle of incarnation "
                          f"{handle.incarnation}, registered {info.incarnation}")
    runtime.agent.add_peer(info.agent_name, info.agent_metadata,
                           KVLayoutDescriptor.from_bytes(info.kv_layout),
                           EmbeddingLayout.from_bytes(info.embedding_layout))


def _abort(runtime, handle: EmbeddingHandle) -> None:
    note = EmbeddingNotification(kind=EmbeddingNotificationKind.ABORTED, pin_id=handle.pin_id,
                                 incarnation=handle.incarnation)
    try:
        runtime.agent.send_notification(handle.agent_name, note.to_bytes())
    except KVTransferError as e:
        logger.info("ABORTED notification to %s not sent (%s); its hold timeout unpins",
                    handle.encode_worker_id, e)


def image_inputs(runtime, refs: Sequence[pb.ImageRef], prompt: Sequence[int],
                 need_embeddings: bool, context) -> list[MMInput]:
    """``resolve_images`` for a gRPC handler: a bad ref ends the call INVALID_ARGUMENT, a
    failed pull ABORTED (not this worker's fault: the router encodes again and retries
    without marking it suspect)."""
    import grpc

    try:
        return resolve_images(runtime, refs, prompt, need_embeddings)
    except ImageInputError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except EmbeddingPullError as e:
        context.abort(grpc.StatusCode.ABORTED, str(e))
