"""KV cache events a worker emits for the global KV-block index (DESIGN: KV index)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KVEventKind(enum.IntEnum):
    STORED = 0  # blocks with these hashes are now cached on the worker
    REMOVED = 1  # evicted
    CLEARED = 2  # the whole cache was reset


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One event; ``event_id`` increases monotonically per worker (per incarnation)."""

    event_id: int
    kind: KVEventKind
    block_hashes: tuple[int, ...]
