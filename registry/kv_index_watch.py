"""Reads the global KV-block index from etcd into an in-memory sink (the router's index).

``KVIndexWatcher.start()`` rebuilds the sink from one consistent snapshot: keys-only range reads
of ``{prefix}/workers/`` and ``{prefix}/kv/`` at one revision R (paged by ``page_size`` keys, all
pages at R). It then follows one watch over both prefixes from R + 1, so a worker's key and its
index keys arrive in revision order (a dead worker's lease deletes them in one revision). After a
broken stream or a compaction it re-reads the snapshot (``etcd_watch.WatchLoop``). Nothing here
runs on the request path.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import etcd3
from etcd3.etcdrpc import kv_pb2
from etcd3.utils import prefix_range_end

from scission.registry.etcd_watch import WatchLoop
from scission.registry.kv_index import KV_DIR, kv_prefix, parse_kv_key
from scission.registry.workers import RegistryConfig

logger = logging.getLogger(__name__)


class ChangeKind(enum.Enum):
    STORED = "stored"  # index key put: the worker holds the block
    REMOVED = "removed"  # index key deleted
    WORKER_ADDED = "worker_added"  # {prefix}/workers/{id} put (registration, new incarnation)
    WORKER_REMOVED = "worker_removed"  # its key deleted: drop everything of the worker


class IndexChange(NamedTuple):
    kind: ChangeKind
    worker_id: str
    block_hash: int = 0  # unused for WORKER_* changes


class KVIndexSink(Protocol):
    """What the watcher feeds (``router.prefix_index.PrefixIndex``); called from its thread."""

    def reset(self, workers: set[str], entries: Mapping[str, set[int]]) -> None: ...

    def apply(self, changes: Sequence[IndexChange]) -> None: ...


class KVIndexWatcher:
    """Feeds ``sink`` from etcd (module docstring). Counters are totals since ``start``."""

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, registry: RegistryConfig,
                 sink: KVIndexSink, page_size: int = 10_000, index_dir: str = KV_DIR) -> None:
        """``index_dir``: ``KV_DIR`` (KV blocks) or ``EMBEDDING_DIR`` (cached images)."""
        assert page_size >= 1, "page_size must be >= 1"
        self._client = client
        self._workers_prefix = registry.workers_prefix
        self._kv_prefix = kv_prefix(registry.prefix, index_dir)
        self._sink = sink
        self._page_size = page_size
        self._loop = WatchLoop(client, (self._workers_prefix, self._kv_prefix), self._resync,
                               self._apply, registry.retry_interval_s, f"{index_dir}-index")
        self._lock = threading.Lock()  # guards the lag probe's state
        self._probe_head = 0  # etcd head revision at the previous probe
        self.lag_revisions = 0  # head at the previous probe - revision applied now (>= 0)
        self.num_events = 0  # watch events received
        self.num_keys_applied = 0  # index keys put or deleted through the watch
        self.num_snapshot_keys = 0  # index keys read by the last snapshot
        self.num_malformed = 0  # keys under kv/ that do not parse (ignored)

    def start(self) -> KVIndexWatcher:
        """Read the snapshot (raises etcd errors) and start following the watch."""
        self._loop.start()
        return self

    def close(self) -> None:
        self._loop.close()

    @property
    def revision(self) -> int:
        """etcd revision the sink reflects (advanced by events and progress notifications)."""
        return self._loop.revision

    @property
    def num_resyncs(self) -> int:
        return self._loop.num_resyncs

    def probe_lag(self) -> int:
        """Update and return ``lag_revisions``: how far the applied revision is behind the etcd
        head read at the previous probe (0 when caught up). Then reads the head again and asks
        for a progress notification, so that an idle index catches up without events. Call it
        periodically (the router's metrics thread does, every second). Raises etcd errors."""
        with self._lock:
            self.lag_revisions = max(self._probe_head - self.revision, 0)
            rsp = self._client.get_response(self._workers_prefix, count_only=True)
            self._probe_head = rsp.header.revision
            self._loop.request_progress()
            return self.lag_revisions

    # -- loop thread -------------------------------------------------------------------
    def _resync(self) -> int:
        """Replace the sink's contents with the snapshot; returns its revision."""
        worker_keys, revision = self._read_keys(self._workers_prefix, None)
        kv_keys, _ = self._read_keys(self._kv_prefix, revision)
        workers = {k[len(self._workers_prefix):] for k in worker_keys}
        entries: dict[str, set[int]] = {}
        for key in kv_keys:
            parsed = parse_kv_key(self._kv_prefix, key)
            if parsed is None:
                self.num_malformed += 1
                continue
            entries.setdefault(parsed[0], set()).add(parsed[1])
        self._sink.reset(workers, entries)
        self.num_snapshot_keys = len(kv_keys)
        logger.info("KV index snapshot: %d workers, %d blocks at revision %d", len(workers),
                    len(kv_keys), revision)
        return revision

    def _read_keys(self, prefix: str, revision: int | None) -> tuple[list[str], int]:
        """All keys under ``prefix`` at ``revision`` (None = now), paged; and that revision."""
        start, end = prefix.encode(), prefix_range_end(prefix.encode())
        keys: list[str] = []
        while True:
            rsp = self._client.get_range_response(start, end, keys_only=True,
                                                  limit=self._page_size, revision=revision)
            revision = revision or rsp.header.revision
            keys.extend(kv.key.decode(errors="replace") for kv in rsp.kvs)
            if not rsp.more or not rsp.kvs:
                return keys, revision
            start = rsp.kvs[-1].key + b"\0"

    def _apply(self, events: Sequence[Any], revision: int) -> None:
        changes: list[IndexChange] = []
        for event in events:
            key = event.kv.key.decode(errors="replace")
            is_put = event.type == kv_pb2.Event.PUT
            if key.startswith(self._workers_prefix):
                kind = ChangeKind.WORKER_ADDED if is_put else ChangeKind.WORKER_REMOVED
                changes.append(IndexChange(kind, key[len(self._workers_prefix):]))
                continue
            parsed = parse_kv_key(self._kv_prefix, key)
            if parsed is None:
                self.num_malformed += 1
                continue
            kind = ChangeKind.STORED if is_put else ChangeKind.REMOVED
            changes.append(IndexChange(kind, parsed[0], parsed[1]))
        self.num_events += len(events)
        self.num_keys_applied += sum(1 for c in changes if c.kind in _KEY_KINDS)
        if changes:
            self._sink.apply(changes)


_KEY_KINDS = (ChangeKind.STORED, ChangeKind.REMOVED)
