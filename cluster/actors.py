"""Ray actors: one per worker process and one for the router.

Actors take ``num_cpus=0`` so a small machine can host a whole cluster; CPU use is set
by each worker's torch thread count instead. A worker whose process dies is restarted by
Ray (``max_restarts`` from ``ClusterConfig.max_worker_restarts``) and serves again by itself;
so does the router (``max_router_restarts``), on the same address. Introspection methods (``kv_token_bytes``,
``pulled_blocks``) are for operators and tests over Ray, not part of the network API.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import ray
import torch

from scission.registry.pools import PlannerMode, PoolTargets
from scission.registry.workers import WorkerRole
from scission.router.config import RouterConfig
from scission.worker.runtime import WorkerConfig, WorkerRuntime

if TYPE_CHECKING:
    from scission.cluster.controller import ControllerConfig
    from scission.cluster.planner.adapter import PlannerLoop
    from scission.cluster.planner.core import PlannerConfig
    from scission.cluster.spawner import WorkerTemplate

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("SCISSION_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def pin_process(cpu_ids: tuple[int, ...]) -> None:
    """Restrict every thread of this process to ``cpu_ids`` (threads started later inherit it).

    Called before the engine loads, so torch's intra-op threads start on these cores.
    """
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpu_ids)
        except ProcessLookupError:  # the thread exited meanwhile
            continue
    logger.info("pid %d pinned to cpus %s", os.getpid(), sorted(os.sched_getaffinity(0)))


def _servicer_factory(role: WorkerRole):
    if role == WorkerRole.PREFILL:
        from scission.prefill_worker.servicer import PrefillServicer

        return PrefillServicer
    if role in (WorkerRole.DECODE, WorkerRole.COLOCATED):
        from scission.decode_worker.servicer import DecodeServicer

        return DecodeServicer
    if role == WorkerRole.ENCODE:
        from scission.encode_worker.servicer import EncodeServicer

        return EncodeServicer
    raise ValueError(f"no servicer for role {role}")


# Threaded (max_concurrency): a drain or flip runs for seconds while ping/pid/stats answer.
@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class WorkerActor:
    def __init__(self, config: WorkerConfig, cpu_ids: tuple[int, ...] = ()) -> None:
        """``cpu_ids``: pin the process to these cores (``ClusterConfig.pin_cpus``)."""
        _setup_logging()
        if cpu_ids:
            pin_process(cpu_ids)
        self.config = config
        self.runtime: WorkerRuntime | None = None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this actor after its process died (ClusterConfig.
            # max_worker_restarts): nobody will call start(), so serve again right away as a
            # new incarnation (new lease, new NIXL agent name; the old lease expires).
            logger.warning("worker %s restarted after a crash; starting again", config.worker_id)
            self.start()

    def start(self) -> str:
        """Load the model, serve, register in etcd; returns the internal endpoint."""
        self.runtime = WorkerRuntime(self.config, _servicer_factory).start()
        return self.runtime.endpoint

    def ping(self) -> str:
        """The current role's value once serving, "" while starting (liveness probe)."""
        return self.runtime.role.value if self.runtime is not None else ""

    def drain(self, deadline_s: float) -> dict[str, float | int]:
        """Stop taking requests and wait until idle (``worker.lifecycle.drain``); the caller
        then stops the worker."""
        assert self.runtime is not None, "worker not started"
        return self.runtime.drain(deadline_s).to_dict()

    def flip(self, role: WorkerRole, deadline_s: float) -> dict[str, float | int]:
        """Drain, then serve as ``role`` in this process (``worker.lifecycle.flip``)."""
        assert self.runtime is not None, "worker not started"
        return self.runtime.flip(role, deadline_s).to_dict()

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None

    def kv_token_bytes(self, block_ids: list[int], num_tokens: int) -> bytes:
        """K and V bytes of the first ``num_tokens`` token slots of ``block_ids`` (all layers)."""
        assert self.runtime is not None, "worker not started"
        cache = self.runtime.engine.kv_cache.layer_major()  # [L, 2, N, bs, H, D]
        sel = cache.index_select(2, torch.tensor(block_ids, dtype=torch.int64))
        flat = sel.reshape(sel.shape[0], 2, -1, *sel.shape[4:])[:, :, :num_tokens]
        return flat.contiguous().view(torch.uint8).numpy().tobytes()

    def pulled_blocks(self, request_id: str) -> list[int] | None:
        """Decode role: local block ids a recent request's KV was pulled into."""
        assert self.runtime is not None, "worker not started"
        return getattr(self.runtime.servicer, "pulled", {}).get(request_id)


@ray.remote(num_cpus=0, max_restarts=0)
class RouterActor:
    def __init__(self, config: RouterConfig) -> None:
        _setup_logging()
        from scission.router.server import RouterServer

        self.server = RouterServer(config)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Restarted after a crash (ClusterConfig.max_router_restarts): serve again on the
            # same port (LocalCluster fixes it), rebuilding the worker directory and the prefix
            # index from etcd. Streams that were in flight on the old process are lost.
            logger.warning("router restarted after a crash; serving again on %s",
                           self.server.address)
            self.server.start()

    def start(self) -> str:
        return self.server.start().address

    def drain(self) -> int:
        """Stop admitting (``scission down``): new requests on both doors get UNAVAILABLE and
        the health service says NOT_SERVING, while those in flight run on. Returns how many
        are in flight (poll ``in_flight`` until 0, then ``stop``)."""
        from grpc_health.v1 import health_pb2

        self.server.servicer.draining = True
        for service in ("", "scission.v1.Generation"):
            self.server.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("router draining: %d requests in flight", self.in_flight())
        return self.in_flight()

    def in_flight(self) -> int:
        """Requests admitted and not yet ended (both doors)."""
        return self.server.admission.stats().num_requests

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop()


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)
class ControllerActor:
    """Runs the ``Controller`` (and, when configured, the planner loop) in its own process;
    owns the worker actors (they live as long as it does)."""

    def __init__(self, config: ControllerConfig, template: WorkerTemplate,
                 planner: PlannerConfig | None = None,
                 planner_mode: PlannerMode = PlannerMode.OFF,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
        """``planner``: run the planner loop too (its mode is read from etcd every tick;
        ``planner_mode`` is written there at start unless a mode is already set)."""
        _setup_logging()
        from scission.cluster.controller import Controller
        from scission.cluster.spawner import WorkerSpawner
        from scission.registry.directory import WorkerDirectory
        from scission.registry.etcd_retry import retry_etcd
        from scission.registry.pools import PoolStore
        from scission.registry.signing import record_key
        from scission.registry.workers import connect

        self.etcd = connect(template.etcd)
        self.directory = WorkerDirectory(self.etcd, template.registry,
                                         record_key=record_key(template.cluster_token))
        # A Ray restart of this actor during an etcd outage waits for etcd (bounded).
        retry_etcd(self.directory.start, "controller: worker directory", 60.0)
        self.store = PoolStore(self.etcd, template.registry)
        self.controller = Controller(config, WorkerSpawner(template), self.store, self.directory)
        self.planner: PlannerLoop | None = None
        if planner is not None:
            from scission.cluster.planner.adapter import PlannerLoop
            from scission.cluster.planner.core import PlannerCore

            self.planner = PlannerLoop(PlannerCore(planner), self.store, self.directory,
                                       self.etcd, template.registry, planner.interval_s,
                                       self.controller.pending)
        self._planner_mode = planner_mode
        self._metrics = (metrics_host, metrics_port)
        self.metrics_port: int | None = None  # bound, once started with metrics on

    def start(self, initial: PoolTargets, timeout_s: float) -> dict[str, str]:
        endpoints = self.controller.start(initial, timeout_s)
        if self.planner is not None:
            self.planner.start(self._planner_mode)
        host, port = self._metrics
        if port is not None:
            from scission.cluster.control_metrics import serve_control_metrics

            self.metrics_port = serve_control_metrics(self.controller, self.planner, host, port)
        return endpoints

    def bound_metrics_port(self) -> int | None:
        return self.metrics_port

    def handles(self) -> dict[str, ray.actor.ActorHandle]:
        return self.controller.handles()

    def workers(self) -> list[dict[str, str]]:
        return self.controller.workers()

    def kill_worker(self, worker_id: str) -> None:
        self.controller.kill_worker(worker_id)

    def num_replaced(self) -> int:
        return self.controller.num_replaced

    def stop(self) -> None:
        if self.planner is not None:
            self.planner.close()
        self.controller.stop()
        self.directory.close()
