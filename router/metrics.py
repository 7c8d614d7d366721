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
``scission_router_queue_seconds``               histogram  receipt -> placed on a worker
``scission_router_ttft_seconds``                histogram  receipt -> first token sent
``scission_router_tpot_seconds``                histogram  (E2E - TTFT) / (output tokens - 1)
``scission_router_itl_seconds``                 histogram  a request's mean inter-token gap
``scission_router_e2e_seconds``                 histogram  receipt -> finished
``scission_router_slo_target_seconds{metric}``  gauge      ``slo_ttft_ms`` / ``slo_tpot_ms``
                                                           (metric ``ttft`` / ``tpot``)
``scission_router_slo_attainment{scope,slo}``   gauge      fraction of the window's finished
                                                           requests meeting ``slo`` = ``ttft``,
                                                           ``tpot`` or ``both``
``scission_router_goodput_rps{scope}``          gauge      requests meeting both, per second
``scission_router_arrival_rps{scope}``          gauge      requests received, per second
``scission_router_window_requests{scope,kind}`` gauge      ``arrived``, ``finished``, ``failed``
                                                           in the window
``scission_router_window_latency_seconds``      gauge      labels ``scope``, ``metric`` (``ttft``,
                                                           ``tpot``, ``itl``, ``e2e``, ``queue``),
                                                           ``quantile`` (0.5 ttft/tpot, 0.9 all)
=============================================  =========  ======================================

The histograms are cluster-wide (no labels), one observation per finished request that has
the value. The window gauges are ``router/slo.py``'s ``SloWindow`` per scope (``cluster``
or a pool's role), computed at scrape time over the last ``slo_window_s``; the same records
are in etcd (``registry/slo_publisher.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import make_wsgi_app, start_http_server
from prometheus_client.registry import Collector

from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.router.auth import serve_wsgi_guarded

if TYPE_CHECKING:
    import ssl
    from wsgiref.simple_server import WSGIServer

    from scission.registry.kv_index_watch import KVIndexWatcher
    from scission.router.auth import ApiKeys
    from scission.router.prefix_index import PrefixIndex
    from scission.router.slo import RequestRecord, SloTracker

logger = logging.getLogger(__name__)

# 10 us .. 0.5 s: a decision is ~0.1 ms for short prompts, more for long ones and big indexes
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                      5e-2, 0.1, 0.25, 0.5)
QUEUE_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                   1.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 600.0)


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


class _SloCollector(Collector):
    """Reads the SLO tracker's windows at scrape time (one gauge sample per scope)."""

    def __init__(self, slo: SloTracker) -> None:
        self._slo = slo

    def collect(self) -> Iterator[Metric]:
        slo = self._slo
        target = GaugeMetricFamily("scission_router_slo_target_seconds",
                                   "Latency SLO targets", labels=["metric"])
        target.add_metric(["ttft"], slo.slo_ttft_ms / 1e3)
        target.add_metric(["tpot"], slo.slo_tpot_ms / 1e3)
        yield target
        attain = GaugeMetricFamily("scission_router_slo_attainment",
                                   "Fraction of the window's finished requests meeting the SLO",
                                   labels=["scope", "slo"])
        goodput = GaugeMetricFamily("scission_router_goodput_rps",
                                    "Requests meeting both SLOs finished per second of window",
                                    labels=["scope"])
        arrival = GaugeMetricFamily("scission_router_arrival_rps",
                                    "Requests received per second of window", labels=["scope"])
        counts = GaugeMetricFamily("scission_router_window_requests",
                                   "Requests in the window", labels=["scope", "kind"])
        latency = GaugeMetricFamily("scission_router_window_latency_seconds",
                                    "Latency percentiles over the window",
                                    labels=["scope", "metric", "quantile"])
        for w in slo.windows(""):
            for name, value in (("ttft", w.ttft_attainment), ("tpot", w.tpot_attainment),
                                ("both", w.attainment)):
                attain.add_metric([w.scope, name], value)
            goodput.add_metric([w.scope], w.goodput_rps)
            arrival.add_metric([w.scope], w.arrival_rps)
            for kind, n in (("arrived", w.num_arrivals), ("finished", w.num_finished),
                            ("failed", w.num_failed)):
                counts.add_metric([w.scope, kind], n)
            for metric, q, ms in (("ttft", "0.5", w.ttft_p50_ms), ("ttft", "0.9", w.ttft_p90_ms),
                                  ("tpot", "0.5", w.tpot_p50_ms), ("tpot", "0.9", w.tpot_p90_ms),
                                  ("itl", "0.9", w.itl_p90_ms), ("e2e", "0.9", w.e2e_p90_ms),
                                  ("queue", "0.9", w.queue_p90_ms)):
                latency.add_metric([w.scope, metric, q], ms / 1e3)
        yield from (attain, goodput, arrival, counts, latency)


class RouterMetrics:
    """The router's metrics and their HTTP endpoint (off until ``serve``)."""

    def __init__(self, index: PrefixIndex, watcher: KVIndexWatcher | None = None,
                 slo: SloTracker | None = None) -> None:
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
        self.images = Counter("scission_router_images", "Images of served requests, by "
                              "embedding cache outcome (hit: not encoded again)", ["cache"],
                              registry=self.registry)
        self._latency = {
            name: Histogram(f"scission_router_{name}_seconds", help_text, buckets=buckets,
                            registry=self.registry)
            for name, help_text, buckets in (
                ("queue", "Receipt to placed on a worker", QUEUE_BUCKETS_S),
                ("ttft", "Time to first token, receipt to first token sent", TTFT_BUCKETS_S),
                ("tpot", "Time per output token after the first", TPOT_BUCKETS_S),
                ("itl", "Mean inter-token gap of a request", TPOT_BUCKETS_S),
                ("e2e", "Receipt to finished", E2E_BUCKETS_S))}
        self.registry.register(_IndexCollector(index, watcher))
        self.registry.register(_HitRateCollector(self))
        if slo is not None:
            self.registry.register(_SloCollector(slo))
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

    def observe_latencies(self, record: RequestRecord) -> None:
        """One finished request's queue / TTFT / TPOT / ITL / E2E (those it has)."""
        for name, ms in (("queue", record.queue_ms), ("ttft", record.ttft_ms),
                         ("tpot", record.tpot_ms), ("itl", record.itl_ms),
                         ("e2e", record.e2e_ms)):
            if ms is not None:
                self._latency[name].observe(ms / 1e3)

    @property
    def prefix_hit_rate(self) -> float:
        with self._lock:
            return self._num_cached_tokens / self._num_prompt_tokens \
                if self._num_prompt_tokens else 0.0

    def render(self) -> bytes:
        """The text exposition (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int, lag_probe_interval_s: float = 1.0,
              keys: ApiKeys | None = None, ssl_context: ssl.SSLContext | None = None) -> int:
        """Start ``/metrics`` on ``host:port`` (0 = any free port) and the lag probe; returns
        the bound port. With ``keys`` a scrape needs ``Authorization: Bearer <key>``; with
        ``ssl_context`` it is served over TLS. Raises OSError if the port is taken."""
        assert self._server is None, "RouterMetrics.serve called twice"
        if keys is None and ssl_context is None:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        else:
            self._server = serve_wsgi_guarded(make_wsgi_app(self.registry), host, port, keys,
                                              ssl_context)
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
