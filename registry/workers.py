"""Worker registry in etcd: workers register under a lease, the router watches the directory.

Keys (all of a worker's keys are under its lease, so a dead worker vanishes within its TTL):
    {prefix}/workers/{worker_id} -> WorkerInfo.to_bytes()         (msgpack, typed, versioned)
    {prefix}/stats/{worker_id}   -> WorkerStatsRecord.to_bytes()  (periodic load stats)

The etcd client itself (``EtcdClientConfig``, ``connect``: TLS, user/password, endpoint
failover) lives in ``registry/etcd_client.py`` and is re-exported here.

python3-etcd3 0.13 quirk handled here:
- ``etcd3.watch.Watcher`` dies with ``NameError: six`` when its stream fails, leaving its
  iterators blocked forever: ``WorkerDirectory`` follows the raw ``etcdrpc.WatchStub`` stream
  through ``etcd_watch.WatchLoop`` (shared with the KV-block index).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import etcd3

from scission.registry.etcd_client import (  # noqa: F401 (re-exported)
    EtcdClientConfig,
    connect,
    etcd_config_from_files,
)
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.etcd_watch import describe_etcd_error as _describe
from scission.registry.records import _R, Record
from scission.registry.signing import sign_record

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "/scission"


class WorkerRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"
    ENCODE = "encode"


@dataclass(frozen=True)
class WorkerInfo(Record):
    """What peers need to reach a worker. Value of ``{prefix}/workers/{worker_id}``."""

    KIND: typing.ClassVar[str] = "worker_info"
    worker_id: str
    role: WorkerRole
    endpoint: str  # host:port of the worker's internal gRPC server
    agent_name: str  # NIXL agent name
    agent_metadata: bytes  # NIXL agent metadata (peers load it to READ our KV blocks)
    kv_layout: bytes  # opaque msgpack from kv_transfer
    num_blocks: int
    block_size: int
    model_id: str
    started_at_s: float  # wall clock (time.time()) when the worker process started
    incarnation: int = 0  # lease id, set by WorkerRegistration.register; 0 = not registered
    # Draining: the router places no new request here; running ones finish (or migrate).
    draining: bool = False
    # Wall clock when it began serving ``role``: its start, or its last role flip. 0 = not
    # recorded (a record from before this field): read it as ``started_at_s``.
    role_since_s: float = 0.0
    # Image embedding pages (msgpack ``kv_transfer.embeddings.EmbeddingLayout``) on workers
    # of a vision-language model; b"" for text-only models.
    embedding_layout: bytes = b""
    accepts_images: bool = False  # the worker's model has a vision encoder
    mac: bytes = b""  # registry/signing.py: written by a holder of the cluster token

    def __post_init__(self) -> None:
        if not self.worker_id or "/" in self.worker_id:
            raise ValueError(f"worker_id must be non-empty without '/': {self.worker_id!r}")
        if not isinstance(self.role, WorkerRole) or not self.endpoint:
            raise ValueError(f"bad role {self.role!r} or empty endpoint {self.endpoint!r}")
        if self.num_blocks < 0 or self.block_size <= 0 or self.incarnation < 0:
            raise ValueError("num_blocks >= 0, block_size > 0 and incarnation >= 0 required")


@dataclass(frozen=True)
class WorkerStatsRecord(Record):
    """Periodic load stats of one worker. Value of ``{prefix}/stats/{worker_id}``."""

    KIND: typing.ClassVar[str] = "worker_stats"
    num_free_blocks: int
    num_running: int
    num_waiting: int
    queued_prefill_tokens: int
    updated_at_s: float  # wall clock (time.time())
    # Forward-pass metrics (engine/step_metrics.py, worker/metrics.py: stats_record).
    kv_usage: float = 0.0  # used / total KV blocks, 0..1
    num_steps_total: int = 0  # engine steps, all time
    step_ms_mean: float = 0.0  # over the steps since the last publish (0 = none)
    # The newest 64 engine steps (also ones published before), each [end_wall_s,
    # num_prefill_tokens, num_decode_requests, num_context_tokens, step_ms]
    # (num_context_tokens = sum of the decode rows' context lengths).
    steps: list[list[float]] = dataclasses.field(default_factory=list)
    num_encode_waiting: int = 0  # images queued or being encoded (encode load)
    mac: bytes = b""  # registry/signing.py: written by a holder of the cluster token

    def __post_init__(self) -> None:
        counts = (self.num_free_blocks, self.num_running, self.num_waiting)
        if min(*counts, self.queued_prefill_tokens, self.num_steps_total) < 0:
            raise ValueError(f"stats counts must be >= 0: {self}")
        if not 0.0 <= self.kv_usage <= 1.0 or self.step_ms_mean < 0:
            raise ValueError(f"kv_usage in [0, 1] and step_ms_mean >= 0 required: {self}")


@dataclass(frozen=True)
class RegistryConfig:
    prefix: str = DEFAULT_PREFIX  # trailing "/" is stripped
    retry_interval_s: float = 0.5  # wait before retrying after an etcd error

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.rstrip("/"))
        if not self.prefix.startswith("/") or self.retry_interval_s <= 0:
            raise ValueError(f"prefix must start with '/' ({self.prefix!r}), retry_interval_s > 0")

    @property
    def workers_prefix(self) -> str:
        return f"{self.prefix}/workers/"

    @property
    def stats_prefix(self) -> str:
        return f"{self.prefix}/stats/"


class WorkerRegistration:
    """One worker's entry in etcd, kept alive by a background thread.

    ``register`` grants a lease of ``ttl_s`` seconds, writes the WorkerInfo with ``incarnation =
    lease id`` and refreshes the lease every ``ttl_s / 3`` (etcd errors are logged and retried
    every ``retry_interval_s``). If the lease is lost anyway (expired during an etcd outage or a
    stall of this process, or revoked by an operator) the thread grants a new lease and writes
    the info and the last stats again: the worker comes back as a NEW incarnation. Peers see a
    delete then a put and must drop what they cached for the old incarnation (NIXL metadata,
    transfer handles). ``on_new_incarnation(info)`` is then called from the keepalive thread.
    """

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, config: RegistryConfig | None = None,
                 on_new_incarnation: Callable[[WorkerInfo], None] | None = None,
                 record_key: bytes = b"") -> None:
        self._client = client
        self._config = config if config is not None else RegistryConfig()
        self._key = record_key  # signs every record written (registry/signing.py)
        self._on_new_incarnation = on_new_incarnation
        self._lock = threading.Lock()  # guards the fields below; serializes lease/info writes
        self._info: WorkerInfo | None = None  # as registered (incarnation = current lease)
        self._stats: WorkerStatsRecord | None = None  # last stats, re-put on re-register
        self._ttl_s = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_callback_errors = 0  # metric: on_new_incarnation calls that raised

    @property
    def info(self) -> WorkerInfo | None:
        """The registered info; ``info.incarnation`` is the current lease id. None if not."""
        return self._info

    def register(self, info: WorkerInfo, ttl_s: int) -> WorkerInfo:
        """Write ``info`` under a new lease and start the keepalive thread; returns what it wrote.

        ``info.incarnation`` is replaced by the lease id. Raises etcd errors (at most a lease is
        left behind, and it expires within ``ttl_s``). etcd may raise a tiny TTL to its minimum.
        """
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"{info.worker_id} is already registered")
            self._ttl_s, self._stats = ttl_s, None
            registered = self._grant_and_put(info)
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._keepalive_loop, name=f"lease-{info.worker_id}", daemon=True
            )
            self._thread.start()
        return registered

    def _grant_and_put(self, info: WorkerInfo) -> WorkerInfo:
        """Grant a lease and atomically put the info (and last stats) under it. Lock held."""
        lease = self._client.lease(self._ttl_s)
        info = sign_record(dataclasses.replace(info, incarnation=lease.id), self._key)
        worker_key = self._config.workers_prefix + info.worker_id
        ops = [etcd3.transactions.Put(worker_key, info.to_bytes(), lease=lease.id)]
        if self._stats is not None:
            stats_key = self._config.stats_prefix + info.worker_id
            ops.append(etcd3.transactions.Put(stats_key, self._stats.to_bytes(), lease=lease.id))
        self._client.transaction(compare=[], success=ops, failure=[])
        self._info = info
        logger.info("registered %s role=%s incarnation=%x ttl=%ds",
                    info.worker_id, info.role.value, lease.id, lease.ttl)
        return info

    def _keepalive_loop(self) -> None:
        interval_s = max(self._ttl_s / 3.0, 0.1)
        wait_s, failures = interval_s, 0
        while not self._stop.wait(wait_s):
            try:
                new_info = self._refresh_once()
            except ETCD_ERRORS as exc:
                failures += 1
                log = logger.warning if failures == 1 else logger.debug  # once per outage
                log("lease keepalive failed (%d in a row): %s", failures, _describe(exc))
                wait_s = min(interval_s, self._config.retry_interval_s)
                continue
            if failures:
                logger.info("lease keepalive recovered after %d failures", failures)
            wait_s, failures = interval_s, 0
            if new_info is not None and not _call_safely(self._on_new_incarnation, new_info):
                self.num_callback_errors += 1

    def _refresh_once(self) -> WorkerInfo | None:
        """Refresh the lease; if it is gone, re-register and return the new info."""
        with self._lock:
            info = self._info
            if self._stop.is_set() or info is None:
                return None
            responses = list(self._client.refresh_lease(info.incarnation))
            if responses and responses[-1].TTL > 0:
                return None
            logger.warning("lease %x of %s was lost; re-registering as a new incarnation",
                           info.incarnation, info.worker_id)
            return self._grant_and_put(info)

    def update_stats(self, record: WorkerStatsRecord) -> None:
        """Put ``record`` under the lease. Raises etcd errors; the record is kept either way and
        re-written if the worker re-registers."""
        with self._lock:
            if self._info is None:
                raise RuntimeError("update_stats before register")
            self._stats = record = sign_record(record, self._key)
            key, lease = self._config.stats_prefix + self._info.worker_id, self._info.incarnation
        # Not under the lock: a put sent while etcd elects a leader waits out its whole timeout
        # (5 s), and the keepalive, stuck behind it, let a 3 s lease lapse
        # (tests/faults/test_etcd_leader_loss.py). A put racing a re-registration fails or
        # lands under the old lease; the next one (stats_interval_s) uses the new lease.
        self._client.put(key, record.to_bytes(), lease=lease)

    def set_draining(self, draining: bool) -> WorkerInfo:
        """Re-put the info with ``draining`` under the same lease (same incarnation); returns it.

        Raises RuntimeError before ``register``, and etcd errors (nothing changed then).
        """
        with self._lock:
            if self._info is None:
                raise RuntimeError("set_draining before register")
            info = sign_record(dataclasses.replace(self._info, draining=draining), self._key)
            key = self._config.workers_prefix + info.worker_id
            self._client.put(key, info.to_bytes(), lease=info.incarnation)
            self._info = info
        logger.info("%s draining=%s", info.worker_id, draining)
        return info

    def deregister(self) -> None:
        """Stop the keepalive thread and revoke the lease (both keys vanish). Idempotent.

        If etcd is unreachable the keys still vanish when the lease expires (within ttl_s).
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        with self._lock:
            info, self._info = self._info, None
        if info is None:
            return
        try:
            self._client.revoke_lease(info.incarnation)
            logger.info("deregistered %s incarnation=%x", info.worker_id, info.incarnation)
        except ETCD_ERRORS as exc:
            logger.warning("revoking %s failed (%s); its keys expire within %ds",
                           info.worker_id, _describe(exc), self._ttl_s)

    def __enter__(self) -> WorkerRegistration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.deregister()


def _decode(key: str, worker_id: str, value: bytes, cls: type[_R]) -> _R | None:
    """Decode the value at ``key`` (of ``worker_id``); None and a warning if it is malformed."""
    try:
        record = cls.from_bytes(value)
    except ValueError as exc:
        logger.warning("skipping malformed value at %r: %s", key, exc)
        return None
    if isinstance(record, WorkerInfo) and record.worker_id != worker_id:
        logger.warning("skipping %r: it holds worker_id %r", key, record.worker_id)
        return None
    return record


def _call_safely(callback: Callable[[Any], None] | None, arg: Any) -> bool:
    """Run a subscriber's callback; False if it raised (logged: it must not kill our thread)."""
    if callback is None:
        return True
    try:
        callback(arg)
    except Exception:  # callers count these in num_callback_errors
        logger.exception("registry callback %r failed", callback)
        return False
    return True
