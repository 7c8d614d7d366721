"""A worker's forward-pass metrics: its Prometheus endpoint and the stats record it publishes.

``WorkerMetrics`` has its own ``CollectorRegistry``, served over HTTP on
``WorkerConfig.metrics_port`` (``/metrics``). Everything is read at scrape time: the gauges
from ``WorkerRuntime.stats()``, the counters from the engine's ``StepRecorder`` totals, and
the histograms are fed with the steps recorded since the last scrape (the engine thread only
appends a sample per step). Steps that fell out of the recorder's ring between two scrapes
(4096 steps) are in the counters but not in the histograms.

=============================================  =========  ======================================
``scission_worker_info{worker_id,role}``        gauge      1; ``role`` changes on a role flip
``scission_worker_steps_total``                 counter    engine steps (non-empty)
``scission_worker_step_busy_seconds_total``     counter    their summed wall time
``scission_worker_prefill_tokens_total``        counter    prefill tokens scheduled
``scission_worker_decode_tokens_total``         counter    decode rows scheduled
``scission_worker_step_seconds``                histogram  one engine step (schedule + forward
                                                           + update)
``scission_worker_step_decode_requests``        histogram  decode rows per step (batch size)
``scission_worker_step_prefill_tokens``         histogram  prefill tokens per step
``scission_worker_running_requests``            gauge      in the running batch
``scission_worker_waiting_requests``            gauge      queued (queue depth)
``scission_worker_held_requests``               gauge      prefill: KV pinned awaiting a pull
``scission_worker_queued_prefill_tokens``       gauge      prompt tokens not yet computed
``scission_worker_free_blocks``                 gauge      allocatable KV blocks
``scission_worker_kv_usage``                    gauge      used / total KV blocks (0..1)
=============================================  =========  ======================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from scission.engine.step_metrics import StepRecorder, StepSample
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.registry.workers import WorkerStatsRecord

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

logger = logging.getLogger(__name__)

MAX_PUBLISHED_STEPS = 64  # WorkerStatsRecord.steps keeps the newest this many
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_BUCKETS = (0, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


def stats_record(stats: pb.WorkerStats, steps: list[StepSample],
                 now_s: float | None = None,
                 recent: list[StepSample] | None = None) -> WorkerStatsRecord:
    """The published record: ``stats`` + ``step_ms_mean`` over ``steps`` (those since the
    last publish), and as ``steps`` rows the newest ``MAX_PUBLISHED_STEPS`` of ``recent``
    (default ``steps``): the newest engine steps whether published before or not, so a reader
    polling less often than the publisher still sees the latest ones (it dedupes by end
    time)."""
    return WorkerStatsRecord(
        num_free_blocks=stats.num_free_blocks, num_running=stats.num_running,
        num_waiting=stats.num_waiting, queued_prefill_tokens=stats.queued_prefill_tokens,
        updated_at_s=time.time() if now_s is None else now_s, kv_usage=stats.kv_usage,
        num_steps_total=stats.num_steps_total,
        step_ms_mean=sum(s.step_ms for s in steps) / len(steps) if steps else 0.0,
        steps=[s.as_row() for s in (steps if recent is None else recent)[-MAX_PUBLISHED_STEPS:]],
        num_encode_waiting=stats.num_encode_waiting)


class _WorkerCollector(Collector):
    def __init__(self, worker_id: str, recorder: StepRecorder,
                 stats: Callable[[], pb.WorkerStats]) -> None:
        self._worker_id = worker_id
        self._recorder = recorder
        self._stats = stats
        self._lock = threading.Lock()  # concurrent scrapes drain the cursor once
        self._cursor = 0
        self._step_s = Histogram("scission_worker_step_seconds", "Engine step wall time",
                                 buckets=STEP_BUCKETS_S, registry=None)
        self._batch = Histogram("scission_worker_step_decode_requests",
                                "Decode rows per engine step (batch size)",
                                buckets=BATCH_BUCKETS, registry=None)
        self._prefill = Histogram("scission_worker_step_prefill_tokens",
                                  "Prefill tokens per engine step", buckets=PREFILL_BUCKETS,
                                  registry=None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            new, self._cursor = self._recorder.since(self._cursor)
            for s in new:
                self._step_s.observe(s.step_ms / 1e3)
                self._batch.observe(s.num_decode_requests)
                self._prefill.observe(s.num_prefill_tokens)
        yield from self._step_s.collect()
        yield from self._batch.collect()
        yield from self._prefill.collect()
        totals = self._recorder.totals
        for name, doc, value in (
                ("steps", "Engine steps", totals.num_steps),
                ("step_busy_seconds", "Summed engine step wall time", totals.step_ms / 1e3),
                ("prefill_tokens", "Prefill tokens scheduled", totals.num_prefill_tokens),
                ("decode_tokens", "Decode rows scheduled", totals.num_decode_tokens)):
            yield CounterMetricFamily(f"scission_worker_{name}", doc, value=value)
        yield from self._gauges(self._stats())

    def _gauges(self, s: pb.WorkerStats) -> Iterator[Metric]:
        info = GaugeMetricFamily("scission_worker_info", "This worker", labels=["worker_id",
                                                                                 "role"])
        info.add_metric([self._worker_id, s.role], 1)
        yield info
        for name, doc, value in (
                ("running_requests", "Requests in the running batch", s.num_running),
                ("waiting_requests", "Requests queued (queue depth)", s.num_waiting),
                ("held_requests", "Prefill: requests with KV pinned for a pull", s.num_held),
                ("queued_prefill_tokens", "Prompt tokens not yet computed",
                 s.queued_prefill_tokens),
                ("free_blocks", "Allocatable KV blocks", s.num_free_blocks),
                ("kv_usage", "Used / total KV blocks", s.kv_usage)):
            yield GaugeMetricFamily(f"scission_worker_{name}", doc, value=value)


class WorkerMetrics:
    """One worker's Prometheus registry and its HTTP endpoint (off until ``serve``).

    ``stats`` is called at scrape time (``WorkerRuntime.stats``; tests pass a lambda)."""

    def __init__(self, worker_id: str, recorder: StepRecorder,
                 stats: Callable[[], pb.WorkerStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_WorkerCollector(worker_id, recorder, stats))
        self._server: WSGIServer | None = None

    def render(self) -> bytes:
        """The text exposition (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start ``/metrics`` on ``host:port`` (0 = any free port); returns the bound port.
        Raises OSError if the port is taken."""
        assert self._server is None, "WorkerMetrics.serve called twice"
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_port
        logger.info("worker metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
