"""The control plane's Prometheus metrics (controller + planner), read at scrape time.

=================================================  =========  =================================
``scission_pool_target_workers{role}``             gauge      the targets in etcd
``scission_pool_workers{role,state}``              gauge      managed workers by role and state
                                                              (starting, serving, draining,
                                                              flipping)
``scission_controller_replaced_workers_total``     counter    workers started because one died
                                                              for good
``scission_planner_decisions_total{action,loop,    counter    decisions other than NONE since
applied}``                                                    start (applied = in auto mode)
``scission_planner_last_decision_info{action,      gauge      1, labelled with the last
loop,reason}``                                                decision (NONE included) and its
                                                              reason
=================================================  =========  =================================
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from scission.registry.workers import WorkerRole

if TYPE_CHECKING:
    from scission.cluster.controller import Controller
    from scission.cluster.planner.adapter import PlannerLoop

logger = logging.getLogger(__name__)


class ControlCollector(Collector):
    def __init__(self, controller: Controller, planner: PlannerLoop | None) -> None:
        self._controller = controller
        self._planner = planner

    def collect(self) -> Iterator[Metric]:
        targets = self._controller.last_targets
        target = GaugeMetricFamily("scission_pool_target_workers", "Pool targets in etcd",
                                   labels=["role"])
        for role in WorkerRole:
            target.add_metric([role.value], targets.get(role) if targets else 0)
        yield target
        workers = GaugeMetricFamily("scission_pool_workers", "Managed workers",
                                    labels=["role", "state"])
        for (role, state), n in sorted(Counter(
                (w["role"], w["state"]) for w in self._controller.workers()).items()):
            workers.add_metric([role, state], n)
        yield workers
        yield CounterMetricFamily("scission_controller_replaced_workers",
                                  "Workers started because one died for good",
                                  value=self._controller.num_replaced)
        if self._planner is None:
            return
        decisions = CounterMetricFamily("scission_planner_decisions",
                                        "Planner decisions other than NONE",
                                        labels=["action", "loop", "applied"])
        for (action, loop, applied), n in sorted(self._planner.decision_counts.items()):
            decisions.add_metric([action, loop, applied], n)
        yield decisions
        last = self._planner.last_decision
        if last is not None:
            info = GaugeMetricFamily("scission_planner_last_decision_info",
                                     "The planner's last decision and its reason",
                                     labels=["action", "loop", "reason"])
            info.add_metric([last.action.value, last.loop.value, last.reason[:200]], 1)
            yield info


def serve_control_metrics(controller: Controller, planner: PlannerLoop | None, host: str,
                          port: int) -> int:
    """Serve ``/metrics`` on ``host:port`` (0 = any free port); returns the bound port.
    Raises OSError if the port is taken."""
    registry = CollectorRegistry()
    registry.register(ControlCollector(controller, planner))
    server, _ = start_http_server(port, addr=host, registry=registry)
    logger.info("control-plane metrics on http://%s:%d/metrics", host, server.server_port)
    return server.server_port
