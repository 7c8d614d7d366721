"""The global KV-block index in etcd: key schema and the worker-side batched publisher.

Schema (one key per cached block per worker; DESIGN: Block hashing and the global KV index)::

    {prefix}/kv/{worker_id}/{block_hash:016x} -> b""        (under the worker's lease)

- The key carries everything (worker, 64-bit chained block hash as 16 lowercase hex digits), so
  the value is empty: nothing to decode, no ``dict`` on the wire, smallest writes. A future
  format gets a new directory name (``kv2``) rather than a value version.
- Every key is put under the worker's lease: a dead worker's entries vanish with its lease, in
  the same etcd revision as its ``{prefix}/workers/{worker_id}`` key.
- A router rebuilds the whole index from one (paged, fixed-revision) keys-only range read of
  ``{prefix}/workers/`` + ``{prefix}/kv/`` and follows one watch from that revision + 1
  (``kv_index_watch.KVIndexWatcher``).

Write batching (``KVEventPublisher``): the engine loop hands its ``KVEvent``s over without I/O; a
publisher thread keeps the set of hashes the worker holds (``desired``) and the set etcd holds
(``published``) and, at most once per ``flush_interval_s``, writes the net difference of the
hashes touched since the last flush: puts and deletes in etcd txns of at most ``max_txn_ops``
operations (etcd's ``--max-txn-ops`` default is 128), at most ``max_ops_per_flush`` operations
per flush (the rest waits for the next flush). So per worker::

    ops/s  <= max_ops_per_flush / flush_interval_s                       (default 10,240)
    txns/s <= ceil(max_ops_per_flush / max_txn_ops) / flush_interval_s   (default 80)

and a block stored and evicted between two flushes costs nothing. ``CLEARED`` becomes a single
range delete of the worker's keys. On a new lease (``set_lease``, from
``WorkerRegistration.on_new_incarnation``) the old keys are gone with the old lease and every
held hash is put again under the new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import etcd3
from etcd3.utils import prefix_range_end

from scission.engine.kv_events import KVEvent, KVEventKind
from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.registry.workers import RegistryConfig

logger = logging.getLogger(__name__)

KV_DIR = "kv"
# The global embedding index: the same schema under ``{prefix}/emb/``, one key per image an
# encoder's embedding cache holds (``worker.embedding_cache.index_key``: 64 bits of the hash).
EMBEDDING_DIR = "emb"
HASH_HEX_DIGITS = 16


def kv_prefix(prefix: str, index_dir: str = KV_DIR) -> str:
    """``{prefix}/kv/``: every worker's index keys."""
    return f"{prefix}/{index_dir}/"


def worker_kv_prefix(prefix: str, worker_id: str, index_dir: str = KV_DIR) -> str:
    """``{prefix}/kv/{worker_id}/``: one worker's index keys."""
    return f"{kv_prefix(prefix, index_dir)}{worker_id}/"


def kv_key(prefix: str, worker_id: str, block_hash: int, index_dir: str = KV_DIR) -> str:
    """``{prefix}/kv/{worker_id}/{block_hash:016x}``."""
    return f"{worker_kv_prefix(prefix, worker_id, index_dir)}{block_hash:0{HASH_HEX_DIGITS}x}"


def parse_kv_key(all_kv_prefix: str, key: str) -> tuple[str, int] | None:
    """``(worker_id, block_hash)`` of a key under ``kv_prefix(prefix)``; None if malformed."""
    if not key.startswith(all_kv_prefix):
        return None
    worker_id, sep, hex_hash = key[len(all_kv_prefix):].partition("/")
    if not worker_id or not sep or len(hex_hash) != HASH_HEX_DIGITS:
        return None
    try:
        return worker_id, int(hex_hash, 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class KVIndexConfig:
    """Write batching of one worker's publisher (bounds in the module docstring)."""

    flush_interval_s: float = 0.1  # at most one flush per interval
    max_txn_ops: int = 128  # etcd --max-txn-ops (default 128)
    max_ops_per_flush: int = 1024  # the rest of a burst waits for the next flush

    def __post_init__(self) -> None:
        if self.flush_interval_s <= 0 or self.max_txn_ops < 1:
            raise ValueError("flush_interval_s > 0 and max_txn_ops >= 1 required")
        if self.max_ops_per_flush < self.max_txn_ops:
            raise ValueError("max_ops_per_flush must be >= max_txn_ops")

    @property
    def max_ops_per_s(self) -> float:
        return self.max_ops_per_flush / self.flush_interval_s

    @property
    def max_txns_per_s(self) -> float:
        return -(-self.max_ops_per_flush // self.max_txn_ops) / self.flush_interval_s


@dataclass(frozen=True, slots=True)
class PublisherCounters:
    """Totals since the publisher started (a snapshot; see ``KVEventPublisher.counters``)."""

    num_events: int  # KVEvents received
    num_flushes: int  # flushes that wrote at least one txn
    num_txns: int  # etcd txns committed
    num_put_ops: int
    num_delete_ops: int  # single-key deletes
    num_range_deletes: int  # CLEARED -> one range delete of the worker's keys
    num_errors: int  # failed txns (retried at the next flush)
    num_out_of_order: int  # events whose id was not above the last one (ignored)

    @property
    def num_ops(self) -> int:
        return self.num_put_ops + self.num_delete_ops + self.num_range_deletes


class KVEventPublisher:
    """Publishes one worker's KV events to etcd in bounded batches (module docstring).

    ``submit`` is cheap and thread-safe (the engine loop calls it between steps); all etcd I/O
    happens on the publisher's thread (``start``) or in an explicit ``flush``.
    """

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, registry: RegistryConfig,
                 worker_id: str, config: KVIndexConfig | None = None,
                 index_dir: str = KV_DIR) -> None:
        """``index_dir``: ``KV_DIR`` (KV blocks) or ``EMBEDDING_DIR`` (cached images)."""
        self._client = client
        self._prefix = registry.prefix
        self._dir = index_dir
        self.worker_id = worker_id
        self.config = config if config is not None else KVIndexConfig()
        self._lock = threading.Lock()  # guards the state below
        self._flush_lock = threading.Lock()  # one flush at a time
        self._desired: set[int] = set()  # hashes the worker holds (from its events)
        self._published: set[int] = set()  # hashes etcd holds under the current lease
        self._dirty: set[int] = set()  # touched since they were last written
        self._clear_pending = False  # a CLEARED not yet written as a range delete
        self._lease: int | None = None
        self._generation = 0  # bumped by set_lease; a txn of an older one is not recorded
        self._last_event_id = -1
        self._counts = dict.fromkeys(PublisherCounters.__slots__, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- engine side ------------------------------------------------------------------
    def submit(self, events: Sequence[KVEvent]) -> None:
        """Apply events to the held set; they are written at the next flush."""
        if not events:
            return
        with self._lock:
            for event in events:
                self._apply_event(event)

    def _apply_event(self, event: KVEvent) -> None:
        self._counts["num_events"] += 1
        if event.event_id <= self._last_event_id:
            self._counts["num_out_of_order"] += 1
            logger.warning("KV event %d after %d ignored", event.event_id, self._last_event_id)
            return
        self._last_event_id = event.event_id
        match event.kind:
            case KVEventKind.STORED:
                self._desired.update(event.block_hashes)
                self._dirty.update(event.block_hashes)
            case KVEventKind.REMOVED:
                self._desired.difference_update(event.block_hashes)
                self._dirty.update(event.block_hashes)
            case KVEventKind.CLEARED:
                self._desired.clear()
                self._dirty.clear()
                self._clear_pending = True
            case _:
                raise ValueError(f"unknown KV event kind {event.kind!r}")

    # -- lease ------------------------------------------------------------------------
    def set_lease(self, lease_id: int) -> None:
        """Publish under ``lease_id`` from now on; everything held is put again under it."""
        with self._lock:
            self._lease = lease_id
            self._generation += 1
            self._published.clear()
            self._clear_pending = False
            self._dirty = set(self._desired)
        logger.info("KV index of %s: publishing %d blocks under lease %x", self.worker_id,
                    len(self._desired), lease_id)

    # -- writing ----------------------------------------------------------------------
    def start(self) -> KVEventPublisher:
        assert self._thread is None, "KVEventPublisher.start called twice"
        self._thread = threading.Thread(target=self._run, name=f"kv-index-{self.worker_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (nothing is flushed: the lease's revocation removes the keys)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.config.flush_interval_s):
            try:
                self.flush()
            except ETCD_ERRORS as exc:
                failures += 1
                log = logger.warning if failures == 1 else logger.debug  # once per outage
                log("KV index flush of %s failed (%d in a row): %s", self.worker_id, failures,
                    describe_etcd_error(exc))
                continue
            if failures:
                logger.info("KV index flush of %s recovered after %d failures", self.worker_id,
                            failures)
            failures = 0

    def flush(self) -> int:
        """Write at most ``max_ops_per_flush`` pending changes now; returns the ops written.

        Raises etcd errors (``ETCD_ERRORS``); what was not written stays pending.
        """
        with self._flush_lock:
            written = 0
            with self._lock:
                lease, generation = self._lease, self._generation
                clear = self._clear_pending
            if lease is None:
                return 0
            if clear:
                written += self._write_range_delete(lease, generation)
            while written < self.config.max_ops_per_flush:
                batch = self._take_batch(self.config.max_ops_per_flush - written)
                if not batch:
                    break
                written += self._write_batch(lease, generation, batch)
            if written:
                with self._lock:
                    self._counts["num_flushes"] += 1
            return written

    def _take_batch(self, budget: int) -> list[tuple[int, bool]]:
        """Up to one txn of ``(hash, put?)`` net changes; unchanged touched hashes are dropped."""
        limit = min(budget, self.config.max_txn_ops)
        batch: list[tuple[int, bool]] = []
        with self._lock:
            while self._dirty and len(batch) < limit:
                h = self._dirty.pop()
                want = h in self._desired
                if want != (h in self._published):
                    batch.append((h, want))
        return batch

    def _write_batch(self, lease: int, generation: int, batch: list[tuple[int, bool]]) -> int:
        key = lambda h: kv_key(self._prefix, self.worker_id, h, self._dir)  # noqa: E731
        ops = [etcd3.transactions.Put(key(h), b"", lease=lease)
               if put else etcd3.transactions.Delete(key(h))
               for h, put in batch]
        try:
            self._client.transaction(compare=[], success=ops, failure=[])
        except ETCD_ERRORS:
            with self._lock:  # retried at the next flush
                self._counts["num_errors"] += 1
                self._dirty.update(h for h, _ in batch)
            raise
        with self._lock:
            self._counts["num_txns"] += 1
            num_puts = sum(1 for _, put in batch if put)
            self._counts["num_put_ops"] += num_puts
            self._counts["num_delete_ops"] += len(batch) - num_puts
            if generation == self._generation:
                for h, put in batch:
                    (self._published.add if put else self._published.discard)(h)
        return len(ops)

    def _write_range_delete(self, lease: int, generation: int) -> int:
        prefix = worker_kv_prefix(self._prefix, self.worker_id, self._dir).encode()
        op = etcd3.transactions.Delete(prefix, range_end=prefix_range_end(prefix))
        try:
            self._client.transaction(compare=[], success=[op], failure=[])
        except ETCD_ERRORS:
            with self._lock:
                self._counts["num_errors"] += 1
            raise
        with self._lock:
            self._counts["num_txns"] += 1
            self._counts["num_range_deletes"] += 1
            if generation == self._generation:
                self._clear_pending = False
                self._published.clear()
                self._dirty.update(self._desired)  # put back whatever was stored since
        return 1

    # -- introspection ----------------------------------------------------------------
    @property
    def counters(self) -> PublisherCounters:
        with self._lock:
            return PublisherCounters(**self._counts)

    def held_hashes(self) -> frozenset[int]:
        """Hashes the worker holds according to its events."""
        with self._lock:
            return frozenset(self._desired)

    def published_hashes(self) -> frozenset[int]:
        """Hashes written to etcd under the current lease."""
        with self._lock:
            return frozenset(self._published)

    @property
    def num_pending(self) -> int:
        """Touched hashes not yet written (an upper bound on the next flush's ops)."""
        with self._lock:
            return len(self._dirty) + int(self._clear_pending)
