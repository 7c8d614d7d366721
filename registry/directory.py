"""Router-side view of the worker registry: one range read, then a watch (DESIGN: etcd).

Lookups read an in-memory dict under a lock and never call etcd.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import etcd3
from etcd3.etcdrpc import kv_pb2

from scission.registry.etcd_watch import WatchLoop
from scission.registry.signing import verify_record
from scission.registry.workers import (
    _R,
    RegistryConfig,
    WorkerInfo,
    WorkerRole,
    WorkerStatsRecord,
    _call_safely,
    _decode,
)

logger = logging.getLogger(__name__)


class WorkerDirectory:
    """Router-side, in-memory view of the registered workers and their stats.

    ``start()`` loads all workers with one range read (stats at the same revision); a thread then
    follows a watch from that revision + 1. After an etcd error or a broken stream it re-lists
    and re-watches, firing callbacks for the difference. Lookups never touch etcd.

    Callbacks run on the watch thread: ``on_added(info)`` for each new or changed WorkerInfo (a
    new incarnation of a worker_id fires it again), ``on_removed(worker_id)`` when a worker's key
    is gone. A malformed value is logged and treated as absent.

    ``record_key`` (``registry/signing.record_key`` of the cluster token): records whose MAC
    does not verify under it are treated as absent too, logged once per key and counted in
    ``num_rejected_records`` (a registration written by hand into etcd gets no request).
    None = read unverified (observers without the token, e.g. ``scission status``).
    """

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, config: RegistryConfig | None = None,
                 on_added: Callable[[WorkerInfo], None] | None = None,
                 on_removed: Callable[[str], None] | None = None,
                 record_key: bytes | None = None) -> None:
        self._client = client
        self._key = record_key
        self._rejected_keys: set[str] = set()  # logged once each
        self.num_rejected_records = 0  # metric: records dropped for a bad MAC
        self._config = config if config is not None else RegistryConfig()
        self._on_added = on_added
        self._on_removed = on_removed
        self._lock = threading.Lock()  # guards the fields below
        self._workers: dict[str, WorkerInfo] = {}  # worker_id -> info
        self._stats: dict[str, WorkerStatsRecord] = {}  # worker_id -> latest stats
        self._revision = 0  # etcd revision the view reflects
        self._loop = WatchLoop(client, (self._config.workers_prefix, self._config.stats_prefix),
                               self._resync, self._apply, self._config.retry_interval_s,
                               "worker-directory")
        self.num_callback_errors = 0  # metric: callbacks that raised

    def start(self) -> WorkerDirectory:
        """Load the current workers (raises etcd errors) and start following the watch."""
        self._loop.start()
        return self

    def workers(self, role: WorkerRole | None = None) -> list[WorkerInfo]:
        """Registered workers (of ``role`` if given), sorted by worker_id."""
        with self._lock:
            infos = sorted(self._workers.values(), key=lambda info: info.worker_id)
        return [info for info in infos if role is None or info.role is role]

    def get(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            return self._workers.get(worker_id)

    def stats(self, worker_id: str) -> WorkerStatsRecord | None:
        """Latest stats of a worker in the view (None if it has none or is not registered:
        the two prefixes are separate watches, so their events may interleave)."""
        with self._lock:
            return self._stats.get(worker_id) if worker_id in self._workers else None

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision

    def close(self) -> None:
        """Stop the watch thread; idempotent. The view keeps its last contents."""
        self._loop.close()

    def __enter__(self) -> WorkerDirectory:
        return self.start() if not self._loop.started else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _resync(self) -> int:
        """Replace the view with a range read and fire callbacks for the difference; returns
        the revision read."""
        cfg = self._config
        workers_rsp = self._client.get_prefix_response(cfg.workers_prefix)
        revision = workers_rsp.header.revision
        stats_rsp = self._client.get_prefix_response(cfg.stats_prefix, revision=revision)
        workers = self._decode_all(workers_rsp.kvs, cfg.workers_prefix, WorkerInfo)
        stats = self._decode_all(stats_rsp.kvs, cfg.stats_prefix, WorkerStatsRecord)
        with self._lock:
            old, self._workers, self._stats = self._workers, workers, stats
            self._revision = revision
        removed = [worker_id for worker_id in old if worker_id not in workers]
        added = [info for worker_id, info in workers.items() if old.get(worker_id) != info]
        logger.info("worker directory %s: %d workers at revision %d",
                    cfg.prefix, len(workers), revision)
        self._notify(added, removed)
        return revision

    def _apply(self, events: Sequence[Any], revision: int) -> None:
        """Apply watch events: a PUT of a valid value sets, a DELETE or a bad value removes."""
        workers_prefix, stats_prefix = self._config.workers_prefix, self._config.stats_prefix
        added: list[WorkerInfo] = []
        removed: list[str] = []
        with self._lock:
            for event in events:
                key = event.kv.key.decode(errors="replace")
                is_put = event.type == kv_pb2.Event.PUT
                if key.startswith(workers_prefix):
                    worker_id = key[len(workers_prefix):]
                    info = self._checked(key, _decode(key, worker_id, event.kv.value, WorkerInfo)
                                         if is_put else None)
                    if info is None and self._workers.pop(worker_id, None) is not None:
                        removed.append(worker_id)
                    elif info is not None and self._workers.get(worker_id) != info:
                        self._workers[worker_id] = info
                        added.append(info)
                elif key.startswith(stats_prefix):
                    worker_id = key[len(stats_prefix):]
                    record = None
                    if is_put:
                        record = self._checked(key, _decode(key, worker_id, event.kv.value,
                                                            WorkerStatsRecord))
                    if record is None:
                        self._stats.pop(worker_id, None)
                    else:
                        self._stats[worker_id] = record
            self._revision = max(self._revision, revision)
        self._notify(added, removed)

    def _decode_all(self, kvs: Any, prefix: str, cls: type[_R]) -> dict[str, _R]:
        """worker_id -> record for a range read, skipping malformed or unsigned values."""
        records = {}
        for kv in kvs:
            key = kv.key.decode(errors="replace")
            worker_id = key[len(prefix):]
            record = self._checked(key, _decode(key, worker_id, kv.value, cls))
            if record is not None:
                records[worker_id] = record
        return records

    def _checked(self, key: str, record: _R | None) -> _R | None:
        """``record``, or None when a key is set and its MAC does not verify."""
        if record is None or self._key is None or verify_record(record, self._key):
            return record
        self.num_rejected_records += 1
        if key not in self._rejected_keys and len(self._rejected_keys) < 1024:
            self._rejected_keys.add(key)
            logger.warning("ignoring %s: not signed with this cluster's token", key)
        return None

    def _notify(self, added: list[WorkerInfo], removed: list[str]) -> None:
        calls: list[tuple[Callable[[Any], None] | None, Any]] = []
        calls += [(self._on_removed, worker_id) for worker_id in removed]
        calls += [(self._on_added, info) for info in added]
        for callback, arg in calls:
            if not _call_safely(callback, arg):
                self.num_callback_errors += 1
