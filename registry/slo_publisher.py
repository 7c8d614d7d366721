"""Puts one router's live SLO windows in etcd under the router's own lease.

Keys: ``registry.metrics.slo_key(prefix, router_id, scope)`` -> ``SloWindow`` (msgpack), one
per scope, all written in one transaction every ``interval_s`` and all under one lease of
``ttl_s`` seconds refreshed every ``ttl_s / 3``: when the router dies its metrics vanish
within the TTL; ``close()`` revokes the lease at once. etcd errors are logged (once per
outage) and retried every ``RegistryConfig.retry_interval_s``; they never reach the caller.
A lease lost anyway (etcd outage longer than the TTL) is replaced by a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import etcd3

from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.registry.metrics import SloWindow, slo_key
from scission.registry.workers import RegistryConfig

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 5


class SloPublisher:
    """A thread that grants a lease, keeps it alive and puts ``source()`` under it."""

    def __init__(self, client: etcd3.MultiEndpointEtcd3Client, config: RegistryConfig,
                 router_id: str, source: Callable[[], list[SloWindow]], interval_s: float,
                 ttl_s: int = DEFAULT_TTL_S) -> None:
        if interval_s <= 0 or ttl_s < 1:
            raise ValueError(f"interval_s > 0 and ttl_s >= 1 required: {interval_s}, {ttl_s}")
        self.router_id = router_id
        self._client = client
        self._config = config
        self._source = source
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._lock = threading.Lock()  # serializes etcd writes with close()
        self._lease_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_published = 0  # successful puts of the whole set (metric)
        self.num_errors = 0  # failed rounds: etcd errors and a failing source (metric)

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    def start(self) -> SloPublisher:
        assert self._thread is None, "SloPublisher.start called twice"
        self._thread = threading.Thread(target=self._run, name=f"slo-{self.router_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def publish_once(self) -> int:
        """Put every window now (granting a lease first if needed); returns how many.
        Raises etcd errors."""
        windows = self._source()
        with self._lock:
            if self._stop.is_set():
                return 0
            lease_id = self._ensure_lease()
            prefix = self._config.prefix
            ops = [etcd3.transactions.Put(slo_key(prefix, self.router_id, w.scope), w.to_bytes(),
                                          lease=lease_id) for w in windows]
            if ops:
                self._client.transaction(compare=[], success=ops, failure=[])
        self.num_published += 1
        return len(ops)

    def close(self) -> None:
        """Stop publishing and revoke the lease (the keys vanish). Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        with self._lock:
            lease_id, self._lease_id = self._lease_id, None
        if lease_id is None:
            return
        try:
            self._client.revoke_lease(lease_id)
        except ETCD_ERRORS as exc:
            logger.warning("revoking SLO lease of %s failed (%s); its keys expire within %ds",
                           self.router_id, describe_etcd_error(exc), self._ttl_s)

    # -- thread ---------------------------------------------------------------------
    def _ensure_lease(self) -> int:
        """The current lease id, granting one if there is none. Lock held."""
        if self._lease_id is None:
            self._lease_id = self._client.lease(self._ttl_s).id
            logger.info("SLO metrics of %s under lease %x (ttl %ds)", self.router_id,
                        self._lease_id, self._ttl_s)
        return self._lease_id

    def _refresh(self) -> None:
        """Keep the lease alive; forget it if etcd lost it (the next put grants a new one)."""
        with self._lock:
            if self._lease_id is None or self._stop.is_set():
                return
            responses = list(self._client.refresh_lease(self._lease_id))
            if not responses or responses[-1].TTL <= 0:
                logger.warning("SLO lease %x of %s was lost; granting a new one",
                               self._lease_id, self.router_id)
                self._lease_id = None

    def _run(self) -> None:
        refresh_every_s = max(self._ttl_s / 3.0, 0.1)
        next_refresh_s = next_publish_s = time.monotonic()
        failures = 0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_refresh_s:
                    self._refresh()
                    next_refresh_s = now + refresh_every_s
                if now >= next_publish_s:
                    self.publish_once()
                    next_publish_s = now + self._interval_s
            except Exception as exc:  # etcd or the source: counted, logged, retried
                self.num_errors += 1
                failures += 1
                (logger.warning if failures == 1 else logger.debug)(
                    "SLO publish of %s failed (%d in a row): %s", self.router_id, failures,
                    describe_etcd_error(exc))
                self._stop.wait(self._config.retry_interval_s)
                continue
            if failures:
                logger.info("SLO publish of %s recovered after %d failures", self.router_id,
                            failures)
                failures = 0
            self._stop.wait(max(min(next_refresh_s, next_publish_s) - time.monotonic(), 0.0))
