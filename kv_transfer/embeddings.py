"""Typed, versioned messages for moving image embeddings between workers over NIXL.

An encode worker keeps embeddings in a paged buffer ``[num_pages, page_tokens, hidden_size]``
(contiguous, registered with its NIXL agent next to the KV cache). A prefill worker pulls an
image's pages with one-sided READs, then sends an ``EmbeddingNotification`` so the encoder
unpins them (they stay in its cache, evictable)::

    encode                                    prefill
    Encode(image) -> pages p0 p1 pinned
                  -- EmbeddingHandle -->       READ p0 p1 into local staging pages
                  <-- notification (PULLED) -- copy out, free staging

- ``EmbeddingLayout``: published with the worker's registration (``WorkerInfo``).
- ``EmbeddingHandle``: what ``Encode`` returns; names the pages, the pin and the incarnation.
- ``EmbeddingNotification``: the reader's "done" (or "aborted"), checked against the pin's
  incarnation by the encoder.

All encode to msgpack maps and decode strictly (``ValueError`` on anything malformed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np
import torch

from scission.kv_transfer.capability import Signed
from scission.kv_transfer.codec import BYTES, INT, INT_TUPLE, STR, pack_message, unpack_message
from scission.kv_transfer.descriptors import dtype_name, merge_block_runs

# Bump on any change of these messages' fields or meaning.
EMBEDDING_TRANSFER_VERSION = 2  # 2: EmbeddingHandle.mac
IMAGE_HASH_BYTES = 32


def _require(cond: bool, kind: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{kind}: {msg}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingLayout:
    """A worker's registered embedding pages: page ``p`` starts at
    ``base_addr + p * bytes_per_page`` and holds ``page_tokens`` rows of ``hidden_size``."""

    version: int = EMBEDDING_TRANSFER_VERSION
    agent_name: str
    base_addr: int
    num_pages: int
    page_tokens: int
    hidden_size: int
    dtype: str  # torch dtype name without "torch."
    bytes_per_page: int

    _KIND = "EmbeddingLayout"
    _SCHEMA = {"version": INT, "agent_name": STR, "base_addr": INT, "num_pages": INT,
               "page_tokens": INT, "hidden_size": INT, "dtype": STR, "bytes_per_page": INT}

    def __post_init__(self) -> None:
        k = self._KIND
        _require(self.version == EMBEDDING_TRANSFER_VERSION, k,
                 f"unsupported version {self.version}")
        _require(bool(self.agent_name), k, "empty agent_name")
        _require(self.base_addr > 0, k, "null base_addr")
        for name in ("num_pages", "page_tokens", "hidden_size", "bytes_per_page"):
            _require(getattr(self, name) > 0, k, f"{name} must be > 0")

    def check_compatible(self, other: EmbeddingLayout) -> None:
        """Raise ``ValueError`` unless pages of ``other`` copy byte-wise into ours."""
        fields = ("page_tokens", "hidden_size", "dtype", "bytes_per_page")
        diffs = [f"{n}: {getattr(self, n)!r} != {getattr(other, n)!r}" for n in fields
                 if getattr(self, n) != getattr(other, n)]
        if diffs:
            raise ValueError(f"embedding layout of {other.agent_name!r} is incompatible with "
                             f"{self.agent_name!r}: " + "; ".join(diffs))

    def to_bytes(self) -> bytes:
        return pack_message(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> EmbeddingLayout:
        return cls(**unpack_message(data, cls._SCHEMA, cls._KIND, EMBEDDING_TRANSFER_VERSION))


def describe_embedding_pages(agent_name: str, pages: torch.Tensor) -> EmbeddingLayout:
    """Layout of ``pages`` ``[num_pages, page_tokens, hidden_size]`` (CPU, contiguous).

    Raises:
        ValueError: another shape, device or a non-contiguous tensor.
    """
    if pages.dim() != 3 or pages.device.type != "cpu" or not pages.is_contiguous():
        raise ValueError(f"embedding pages must be a contiguous CPU tensor "
                         f"[num_pages, page_tokens, hidden_size], got {tuple(pages.shape)}")
    num_pages, page_tokens, hidden = pages.shape
    return EmbeddingLayout(agent_name=agent_name, base_addr=pages.data_ptr(),
                           num_pages=num_pages, page_tokens=page_tokens, hidden_size=hidden,
                           dtype=dtype_name(pages.dtype),
                           bytes_per_page=page_tokens * hidden * pages.element_size())


def page_descriptors(layout: EmbeddingLayout, starts: Sequence[int],
                     counts: Sequence[int]) -> np.ndarray:
    """NIXL rows ``(addr, num_bytes, 0)`` for page runs; shape ``[len(starts), 3]`` uint64."""
    bpp = np.uint64(layout.bytes_per_page)
    descs = np.zeros((len(starts), 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(layout.base_addr) + np.asarray(starts, dtype=np.uint64) * bpp
    descs[:, 1] = np.asarray(counts, dtype=np.uint64) * bpp
    return descs


def plan_page_read(local: EmbeddingLayout, remote: EmbeddingLayout,
                   remote_pages: Sequence[int], local_pages: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Matching ``(local, remote)`` descriptor arrays; runs consecutive on both sides merge.

    Raises:
        ValueError: incompatible layouts, page ids out of range, lengths differ, duplicates.
    """
    local.check_compatible(remote)
    for pages, layout, side in ((remote_pages, remote, "remote"), (local_pages, local, "local")):
        if any(not 0 <= p < layout.num_pages for p in pages):
            raise ValueError(f"{side} page id out of range [0, {layout.num_pages})")
    if len(set(local_pages)) != len(local_pages):
        raise ValueError("duplicate local page ids")
    runs = merge_block_runs(remote_pages, local_pages)
    counts = [r.num_blocks for r in runs]
    return (page_descriptors(local, [r.local_start for r in runs], counts),
            page_descriptors(remote, [r.remote_start for r in runs], counts))


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingHandle(Signed):
    """An image's embeddings pinned on an encode worker, for a NIXL READ.

    Rows ``[i * page_tokens, (i + 1) * page_tokens)`` of the embeddings live in
    ``page_ids[i]``; the last page is partial. ``pin_id`` names the pin the reader releases.
    """

    version: int = EMBEDDING_TRANSFER_VERSION
    pin_id: str
    encode_worker_id: str
    incarnation: int  # etcd lease id of the encoder's registration
    agent_name: str
    image_hash: bytes
    page_ids: tuple[int, ...]
    num_embeddings: int
    hidden_size: int
    page_tokens: int
    dtype: str
    mac: bytes = b""  # HMAC with the cluster's key (``kv_transfer.capability``); b"" unsigned

    _KIND = "EmbeddingHandle"
    _SCHEMA = {"version": INT, "pin_id": STR, "encode_worker_id": STR, "incarnation": INT,
               "agent_name": STR, "image_hash": BYTES, "page_ids": INT_TUPLE,
               "num_embeddings": INT, "hidden_size": INT, "page_tokens": INT, "dtype": STR,
               "mac": BYTES}

    def __post_init__(self) -> None:
        if isinstance(self.page_ids, list):
            object.__setattr__(self, "page_ids", tuple(self.page_ids))
        k = self._KIND
        _require(self.version == EMBEDDING_TRANSFER_VERSION, k,
                 f"unsupported version {self.version}")
        for name in ("pin_id", "encode_worker_id", "agent_name", "dtype"):
            _require(bool(getattr(self, name)), k, f"empty {name}")
        _require(self.incarnation >= 0, k, "negative incarnation")
        _require(len(self.image_hash) == IMAGE_HASH_BYTES, k,
                 f"image_hash must be {IMAGE_HASH_BYTES} bytes")
        _require(self.num_embeddings > 0 and self.hidden_size > 0 and self.page_tokens > 0, k,
                 "num_embeddings, hidden_size and page_tokens must be > 0")
        expected = -(-self.num_embeddings // self.page_tokens)
        _require(len(self.page_ids) == expected, k, f"{len(self.page_ids)} pages for "
                 f"{self.num_embeddings} embeddings of {self.page_tokens} (expected {expected})")
        _require(len(set(self.page_ids)) == len(self.page_ids) and min(self.page_ids) >= 0, k,
                 "page ids must be distinct and >= 0")

    def to_bytes(self) -> bytes:
        return pack_message(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> EmbeddingHandle:
        return cls(**unpack_message(data, cls._SCHEMA, cls._KIND, EMBEDDING_TRANSFER_VERSION))


class EmbeddingNotificationKind(IntEnum):
    PULLED = 1  # the reader has the embeddings: unpin
    ABORTED = 2  # the reader gave up: unpin


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingNotification:
    """Reader -> encoder. An encoder ignores one whose ``incarnation`` is not its own."""

    version: int = EMBEDDING_TRANSFER_VERSION
    kind: EmbeddingNotificationKind
    pin_id: str
    incarnation: int

    _KIND = "EmbeddingNotification"
    _SCHEMA = {"version": INT, "kind": INT, "pin_id": STR, "incarnation": INT}

    def __post_init__(self) -> None:
        k = self._KIND
        _require(self.version == EMBEDDING_TRANSFER_VERSION, k,
                 f"unsupported version {self.version}")
        try:
            object.__setattr__(self, "kind", EmbeddingNotificationKind(self.kind))
        except ValueError as e:
            raise ValueError(f"{k}: unknown kind {self.kind!r}") from e
        _require(bool(self.pin_id), k, "empty pin_id")
        _require(self.incarnation >= 0, k, "negative incarnation")

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        fields["kind"] = int(self.kind)
        return pack_message(fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> EmbeddingNotification:
        return cls(**unpack_message(data, cls._SCHEMA, cls._KIND, EMBEDDING_TRANSFER_VERSION))
