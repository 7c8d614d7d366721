"""The Grafana dashboard (deploy/grafana/scission.json) asks only for what scission exports:
every PromQL expression parses, and every metric and label it selects is one that the
router's, a worker's or the control plane's collectors produce."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import promql_parser
import pytest
from deploy_manifests import DEPLOY
from prometheus_client import CollectorRegistry

from scission.cluster.control_metrics import ControlCollector
from scission.cluster.planner.types import Action, Loop, PoolDecision
from scission.engine.step_metrics import StepRecorder
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.registry.kv_index_watch import KVIndexWatcher
from scission.registry.pools import PoolTargets, TargetWriter
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole, connect
from scission.router.metrics import RouterMetrics
from scission.router.prefix_index import PrefixIndex
from scission.router.slo import RequestRecord, SloTracker
from scission.worker.metrics import WorkerMetrics

DASHBOARD = DEPLOY / "grafana" / "scission.json"
# Grafana's interval variables, replaced by a duration before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every series


@dataclass
class _Controller:
    """The attributes ControlCollector reads, with one worker of each state seen."""

    last_targets: PoolTargets
    num_replaced: int = 1

    def workers(self) -> list[dict[str, str]]:
        return [{"role": "prefill", "state": "serving"}, {"role": "encode", "state": "starting"}]


@dataclass
class _Planner:
    last_decision: PoolDecision
    decision_counts: Counter = field(default_factory=lambda: Counter(
        {("scale_up", "reactive", "true"): 1}))


def _router_registry() -> CollectorRegistry:
    slo = SloTracker(slo_ttft_ms=2000, slo_tpot_ms=150, window_s=60)
    index = PrefixIndex()
    index.reset({"decode-0"}, {"decode-0": {11, 12}})  # a worker holding two blocks
    watcher = KVIndexWatcher(connect(EtcdClientConfig()), RegistryConfig(), index)
    metrics = RouterMetrics(index, watcher, slo)  # the watcher makes no RPC until started
    record = RequestRecord(status="ok", num_prompt_tokens=10, num_output_tokens=4, e2e_ms=90,
                           queue_ms=1, ttft_ms=30, tpot_ms=20, itl_ms=20,
                           prefill_worker="prefill-0", prefill_role=WorkerRole.PREFILL,
                           decode_worker="decode-0", decode_role=WorkerRole.DECODE)
    slo.arrive(time.monotonic(), record.roles, 10)
    slo.finish(record)
    metrics.observe_request("ok", 10, 4)
    metrics.observe_latencies(record)
    metrics.images.labels("hit").inc()
    return metrics.registry


def _control_registry() -> CollectorRegistry:
    targets = PoolTargets(prefill=1, decode=1, colocated=0, encode=1,
                          writer=TargetWriter.INITIAL, reason="test", written_at_s=0.0)
    decision = PoolDecision(Action.NONE, Loop.REACTIVE, {WorkerRole.PREFILL: 1}, "steady")
    registry = CollectorRegistry()
    registry.register(ControlCollector(_Controller(targets), _Planner(decision)))
    return registry


def exported_series() -> dict[str, set[str]]:
    """Sample name (``_total``/``_bucket``/... included) -> its label names, over every
    collector scission serves on a /metrics port."""
    worker = WorkerMetrics("decode-0", StepRecorder(), lambda: pb.WorkerStats(role="decode"))
    series: dict[str, set[str]] = {}
    for registry in (_router_registry(), worker.registry, _control_registry()):
        for family in registry.collect():
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_targets() -> Iterator[tuple[str, dict]]:
    """(panel title, query target) of every panel, collapsed rows' panels included."""
    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every query."""
    for title, target in dashboard_targets():
        yield title, target["expr"]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector of ``expr``."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    found: list[tuple[str, set[str]]] = []

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    return exported_series()


def test_every_dashboard_metric_and_label_is_exported(series):
    """No panel selects a metric scission does not export, or a label that metric lacks."""
    queries = list(dashboard_exprs())
    assert len(queries) >= 30
    for title, expr in queries:
        found = selectors(expr)
        assert found, f"{title}: {expr} selects no metric"
        for name, labels in found:
            assert name in series, f"{title}: {name} is not exported"
            assert labels - SCRAPE_LABELS <= series[name], f"{title}: {name} {labels}"


def test_legends_and_groupings_use_existing_labels(series):
    """`{{label}}` legends and `by (...)` groupings name labels of the selected metrics."""
    for title, target in dashboard_targets():
        labels = set(SCRAPE_LABELS)
        for name, _ in selectors(target["expr"]):
            labels |= series[name]
        used = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
        used |= {w.strip() for group in re.findall(r"by \(([^)]*)\)", target["expr"])
                 for w in group.split(",")}
        assert used <= labels, f"{title}: {used - labels}"


def test_the_dashboard_covers_the_issue_topics():
    """Latency percentiles, goodput and attainment, status, KV and prefix reuse, pools and
    planner, images/encode each have a panel."""
    names = {name for _, expr in dashboard_exprs() for name, _ in selectors(expr)}
    for needed in ("scission_router_ttft_seconds_bucket", "scission_router_tpot_seconds_bucket",
                   "scission_router_itl_seconds_bucket", "scission_router_goodput_rps",
                   "scission_router_slo_attainment", "scission_router_requests_total",
                   "scission_worker_kv_usage", "scission_kv_index_worker_blocks",
                   "scission_router_cached_tokens_total", "scission_pool_workers",
                   "scission_pool_target_workers", "scission_planner_decisions_total",
                   "scission_planner_last_decision_info", "scission_router_images_total"):
        assert needed in names, needed
    quantiles = [expr for _, expr in dashboard_exprs() if "histogram_quantile(0.99" in expr]
    assert len(quantiles) >= 3


def test_a_wrong_metric_name_is_caught(series):
    """The check is not vacuous: a misspelt metric or a label the metric lacks is found."""
    (name, labels), = selectors('rate(scission_router_request_total{status="ok"}[5m])')
    assert name not in series
    (name, labels), = selectors('scission_router_goodput_rps{slo="both"}')
    assert not labels <= series[name]


def test_dashboard_layout_is_well_formed():
    """Unique panel ids, panels within Grafana's 24-column grid and not overlapping, every
    query on the dashboard's Prometheus datasource variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    for title, target in dashboard_targets():
        assert target["datasource"]["uid"] == "${datasource}", title
    assert dashboard["templating"]["list"][0]["query"] == "prometheus"
