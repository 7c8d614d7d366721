"""Router metrics: exact values in the Prometheus exposition, served over HTTP."""

from __future__ import annotations

import urllib.request

from scission.engine.kv_events import KVEvent, KVEventKind
from scission.registry.kv_index import KVEventPublisher
from scission.registry.kv_index_watch import ChangeKind, IndexChange, KVIndexWatcher
from scission.registry.workers import RegistryConfig
from scission.router.metrics import RouterMetrics
from scission.router.prefix_index import PrefixIndex


def sample(text: str, name: str) -> float:
    """Value of the sample line ``name`` (with labels, if any) in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in exposition")


def make_index() -> PrefixIndex:
    index = PrefixIndex(60.0)
    index.apply([IndexChange(ChangeKind.STORED, "p0", h) for h in (1, 2)]
                + [IndexChange(ChangeKind.STORED, "p1", h) for h in (2, 3, 4)])
    index.insert_speculative("p1", [8, 9])
    return index


def test_exposition_has_exact_values():
    """Request counts by status, token totals, hit rate, decision histogram count and the
    index gauges are what was recorded."""
    metrics = RouterMetrics(make_index())
    metrics.observe_request("ok", prompt_tokens=300, cached_tokens=96)
    metrics.observe_request("ok", prompt_tokens=100, cached_tokens=4)
    metrics.observe_request("unavailable")
    for s in (0.0001, 0.0002, 0.004):
        metrics.decision_s.observe(s)
    text = metrics.render().decode()
    assert sample(text, 'scission_router_requests_total{status="ok"}') == 2
    assert sample(text, 'scission_router_requests_total{status="unavailable"}') == 1
    assert sample(text, "scission_router_prompt_tokens_total") == 400
    assert sample(text, "scission_router_cached_tokens_total") == 100
    assert sample(text, "scission_router_prefix_hit_rate") == 0.25
    assert sample(text, "scission_router_routing_decision_seconds_count") == 3
    assert sample(text, 'scission_router_routing_decision_seconds_bucket{le="0.00025"}') == 2
    assert sample(text, "scission_kv_index_blocks") == 4
    assert sample(text, 'scission_kv_index_worker_blocks{worker_id="p0"}') == 2
    assert sample(text, 'scission_kv_index_worker_blocks{worker_id="p1"}') == 3
    assert sample(text, "scission_kv_index_speculative_entries") == 2
    assert "scission_kv_index_lag_revisions" not in text  # no watcher: no etcd metrics


def test_served_over_http_with_watcher_metrics(etcd_client, etcd_prefix):
    """/metrics on a free port serves the watcher's counters and a lag gauge; close() frees
    the port."""
    registry = RegistryConfig(prefix=etcd_prefix)
    lease = etcd_client.lease(30)
    publisher = KVEventPublisher(etcd_client, registry, "p0")
    publisher.set_lease(lease.id)
    publisher.submit([KVEvent(0, KVEventKind.STORED, (1, 2, 3))])
    publisher.flush()
    index = PrefixIndex()
    watcher = KVIndexWatcher(etcd_client, registry, index).start()
    metrics = RouterMetrics(index, watcher)
    try:
        port = metrics.serve("127.0.0.1", 0, lag_probe_interval_s=0.05)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
        assert sample(text, "scission_kv_index_blocks") == 3
        assert sample(text, "scission_kv_index_resyncs_total") == 1
        assert sample(text, "scission_kv_index_lag_revisions") >= 0
        assert sample(text, "scission_kv_index_revision") == watcher.revision
    finally:
        metrics.close()
        watcher.close()
        etcd_client.revoke_lease(lease.id)
