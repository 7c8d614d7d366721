"""The router's Prometheus metrics (prometheus-client, one ``CollectorRegistry`` per router).

Served over HTTP on ``RouterConfig.metrics_port`` (``/metrics``). Names and meaning:

=============================================  =========  ======================================
``scission_router_requests_total{status}``      counter    finished requests; status ``ok`` or a
                                                           gRPC code name (``unavailable``, ...)
``scission_router_routing_decision_seconds``    histogram  prompt hashing + index match + place
``scission_router_prompt_tokens_total``         counter    prompt tokens of finished requests
``scission_router_cached_tokens_total``         counter    of which served from a prefix cache
``scission_router_prefix_hit_rate``             gauge      cached / prompt tokens since start
``scission_kv_index_blocks``                    gauge      distinct block hashes in the index
``scission_kv_index_worker_blocks{worker_id}``  gauge      blocks per worker
``scission_kv_index_speculative_entries``       gauge      live speculative (block, worker) pairs
``scission_kv_index_events_total``              counter    etcd watch events received
``scission_kv_index_keys_applied_total``        counter    index keys put/deleted via the watch
``scission_kv_index_resyncs_total``             counter    snapshot rebuilds (first included)
``scission_kv_index_revision``                  gauge      etcd revision the index reflects
``scission_kv_index_lag_revisions``             gauge      revisions behind the etcd head (probed
                                                           every ``kv_lag_probe_interval_s``)
=============================================  =========  ======================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from scission.registry.kv_index_watch import KVIndexWatcher
    from scission.router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

# 10 us .. 0.5 s: a decision is ~0.1 ms for short prompts, more for long ones and big indexes
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                      5e-2, 0.1, 0.25, 0.5)


class _IndexCollector(Collector):
    """Reads the prefix index and its watcher at scrape time."""

    def __init__(self, index: PrefixIndex, watcher: KVIndexWatcher | None) -> None:
        self._index = index
        self._watcher = watcher

    def collect(self) -> Iterator[Metric]:
        index, watcher = self._index, self._watcher
        yield GaugeMetricFamily("scission_kv_index_blocks", "Distinct block hashes indexed",
                                value=index.num_blocks)
        per_worker = GaugeMetricFamily("scission_kv_index_worker_blocks",
                                       "Blocks indexed per worker", labels=["worker_id"])
        for worker_id, n in sorted(index.worker_block_counts().items()):
            per_worker.add_metric([worker_id], n)
        yield per_worker
        yield GaugeMetricFamily("scission_kv_index_speculative_entries",
                                "Live speculative (block, worker) entries",
                                value=index.num_speculative)
        if watcher is None:
            return
        yield CounterMetricFamily("scission_kv_index_events", "etcd watch events received",
                                  value=watcher.num_events)
        yield CounterMetricFamily("scission_kv_index_keys_applied",
                                  "Index keys put or deleted through the watch",
                                  value=watcher.num_keys_applied)
        yield CounterMetricFamily("scission_kv_index_resyncs", "Index snapshot rebuilds",
                                  value=watcher.num_resyncs)
        yield GaugeMetricFamily("scission_kv_index_revision", "etcd revision the index reflects",
                                value=watcher.revision)
        yield GaugeMetricFamily("scission_kv_index_lag_revisions",
                                "etcd revisions the index is behind the head",
                                value=watcher.lag_revisions)


class _HitRateCollector(Collector):
    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("scission_router_prefix_hit_rate",
                                "Cached / prompt tokens of finished requests since start",
                                value=self._metrics.prefix_hit_rate)


class RouterMetrics:
    """The router's metrics and their HTTP endpoint (off until ``serve``)."""

    def __init__(self, index: PrefixIndex, watcher: KVIndexWatcher | None = None) -> None:
        self.registry = CollectorRegistry()
        self._watcher = watcher
        self.requests = Counter("scission_router_requests", "Finished requests by status",
                                ["status"], registry=self.registry)
        self.decision_s = Histogram("scission_router_routing_decision_seconds",
                                    "Routing decision time: hashing + index match + placement",
                                    buckets=DECISION_BUCKETS_S, registry=self.registry)
        self.prompt_tokens = Counter("scission_router_prompt_tokens",
                                     "Prompt tokens of finished requests", registry=self.registry)
        self.cached_tokens = Counter("scission_router_cached_tokens",
                                     "Prompt tokens served from a prefix cache",
                                     registry=self.registry)
        self.registry.register(_IndexCollector(index, watcher))
        self.registry.register(_HitRateCollector(self))
        self._lock = threading.Lock()
        self._num_prompt_tokens = 0
        self._num_cached_tokens = 0
        self._server: WSGIServer | None = None
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None

    def observe_request(self, status: str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """One finished request: ``status`` is ``ok`` or a lower-case gRPC code name."""
        self.requests.labels(status=status).inc()
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
            self.cached_tokens.inc(cached_tokens)
            with self._lock:
                self._num_prompt_tokens += prompt_tokens
                self._num_cached_tokens += cached_tokens

    @property
    def prefix_hit_rate(self) -> float:
        with self._lock:
            return self._num_cached_tokens / self._num_prompt_tokens \
                if self._num_prompt_tokens else 0.0

    def render(self) -> bytes:
        """The text exposition (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int, lag_probe_interval_s: float = 1.0) -> int:
        """Start ``/metrics`` on ``host:port`` (0 = any free port) and the lag probe; returns
        the bound port. Raises OSError if the port is taken."""
        assert self._server is None, "RouterMetrics.serve called twice"
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        if self._watcher is not None:
            self._probe = threading.Thread(target=self._probe_lag, args=(lag_probe_interval_s,),
                                           name="kv-index-lag", daemon=True)
            self._probe.start()
        bound = self._server.server_port
        logger.info("router metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.join()

    def _probe_lag(self, interval_s: float) -> None:
        assert self._watcher is not None, "lag probe without a watcher"
        failures = 0
        while not self._stop.wait(interval_s):
            try:
                self._watcher.probe_lag()
                failures = 0
            except ETCD_ERRORS as exc:  # counted by the watch loop too; etcd may be down
                failures += 1
                if failures == 1:
                    logger.warning("KV index lag probe failed: %s", describe_etcd_error(exc))
