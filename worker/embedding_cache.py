"""Paged image-embedding cache: LRU over whole images, pins for outstanding NIXL reads.

The pages ``[num_pages, page_tokens, hidden_size]`` are one contiguous tensor registered with
the worker's NIXL agent. An image's embeddings take ``ceil(num_embeddings / page_tokens)``
pages. An entry is *pinned* while a reader holds a handle to it (``pin`` -> ``pin_id``), and
evictable (least recently used first) otherwise; pins end with the reader's notification,
the router's cancellation, or ``expire`` (the hold timeout). Following ``BlockManager``,
every change of the cached set is an event for the global embedding index.

Keys: the 32-byte ``image_hash``; the index in etcd uses its first 8 bytes
(``index_key``), which is only a routing hint: lookups here compare the full hash.

Not thread-safe: the owner serializes calls (``worker.encode_service`` holds a lock).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from scission.engine.kv_events import KVEvent, KVEventKind


def index_key(image_hash: bytes) -> int:
    """The 64-bit key of an image in the global embedding index."""
    return int.from_bytes(image_hash[:8], "little")


@dataclass(slots=True)
class CacheEntry:
    image_hash: bytes
    page_ids: list[int]
    num_embeddings: int
    segment_token_ids: tuple[int, ...]  # the image's prompt segment
    pins: dict[str, float] = field(default_factory=dict)  # pin_id -> monotonic pin time


class EmbeddingCache:
    """Args:
        pages: ``[num_pages, page_tokens, hidden_size]``, model dtype, CPU, contiguous.
    """

    def __init__(self, pages: torch.Tensor) -> None:
        self.pages = pages
        self.num_pages, self.page_tokens, self.hidden_size = pages.shape
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # stack
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()  # LRU first
        self._pins: dict[str, bytes] = {}  # pin_id -> image_hash
        self._events: list[KVEvent] = []
        self._event_ids = itertools.count()
        self.num_hits = 0
        self.num_inserted = 0

    # -- queries ------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages allocatable now: free, or held by unpinned (evictable) entries."""
        return len(self._free) + sum(len(e.page_ids) for e in self._entries.values()
                                     if not e.pins)

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    def get(self, image_hash: bytes, count_hit: bool = True) -> CacheEntry | None:
        """The entry, touched as most recently used (a hit is counted if ``count_hit``)."""
        entry = self._entries.get(image_hash)
        if entry is not None:
            self._entries.move_to_end(image_hash)
            self.num_hits += count_hit
        return entry

    def read(self, entry: CacheEntry) -> torch.Tensor:
        """A copy of the entry's embeddings ``[num_embeddings, hidden_size]``."""
        rows = self.pages[entry.page_ids].reshape(-1, self.hidden_size)
        return rows[: entry.num_embeddings].clone()

    # -- changes ------------------------------------------------------------------
    def insert(self, image_hash: bytes, embeddings: torch.Tensor,
               segment_token_ids: tuple[int, ...]) -> CacheEntry | None:
        """Store ``embeddings`` ``[n, hidden_size]``; an existing entry is returned as is.
        None when the pages cannot be found even after evicting every unpinned entry."""
        entry = self._entries.get(image_hash)
        if entry is not None:
            return entry
        n = embeddings.shape[0]
        page_ids = self.allocate_pages(-(-n // self.page_tokens))
        if page_ids is None:
            return None
        pt = self.page_tokens
        for i, page in enumerate(page_ids):  # the last page is partial
            rows = embeddings[i * pt : (i + 1) * pt]
            self.pages[page, : rows.shape[0]] = rows.to(self.pages.dtype)
        entry = CacheEntry(image_hash, page_ids, n, tuple(segment_token_ids))
        self._entries[image_hash] = entry
        self.num_inserted += 1
        self._emit(KVEventKind.STORED, image_hash)
        return entry

    def allocate_pages(self, num_pages: int) -> list[int] | None:
        """Take ``num_pages`` pages (evicting LRU unpinned entries); None if impossible.
        Pages taken here and not given to an entry go back with ``free_pages``."""
        if num_pages > self.num_free_pages:
            return None
        while len(self._free) < num_pages:
            victim = next(e for e in self._entries.values() if not e.pins)
            self._evict(victim)
        return [self._free.pop() for _ in range(num_pages)]

    def free_pages(self, page_ids: list[int]) -> None:
        self._free.extend(reversed(page_ids))

    def pin(self, entry: CacheEntry) -> str:
        """Pin an entry for one reader; returns the pin id its handle carries."""
        pin_id = f"pin-{uuid.uuid4().hex}"
        entry.pins[pin_id] = time.monotonic()
        self._pins[pin_id] = entry.image_hash
        return pin_id

    def unpin(self, pin_id: str) -> bool:
        """End a pin (reader done, aborted or timed out); False if unknown."""
        image_hash = self._pins.pop(pin_id, None)
        if image_hash is None:
            return False
        entry = self._entries.get(image_hash)
        if entry is not None:
            entry.pins.pop(pin_id, None)
        return True

    def expire(self, hold_timeout_s: float) -> list[str]:
        """Unpin every pin older than ``hold_timeout_s``; returns their ids."""
        now = time.monotonic()
        old = [pin_id for e in self._entries.values() for pin_id, at in e.pins.items()
               if now - at > hold_timeout_s]
        for pin_id in old:
            self.unpin(pin_id)
        return old

    def take_events(self) -> list[KVEvent]:
        """Index events since the last call (hash = ``index_key``)."""
        events, self._events = self._events, []
        return events

    # -- internals ----------------------------------------------------------------
    def _evict(self, entry: CacheEntry) -> None:
        del self._entries[entry.image_hash]
        self.free_pages(entry.page_ids)
        self._emit(KVEventKind.REMOVED, entry.image_hash)

    def _emit(self, kind: KVEventKind, image_hash: bytes) -> None:
        self._events.append(KVEvent(next(self._event_ids), kind, (index_key(image_hash),)))
