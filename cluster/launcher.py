"""Starts a scission cluster on Ray: embedded etcd (unless endpoints are given), worker
actors per pool, and the router actor. Stops everything it started, in reverse order."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray

from scission.cluster.etcd_server import EmbeddedEtcd
from scission.engine.config import EngineConfig
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole
from scission.router.config import RouterConfig
from scission.worker.ports import find_free_port
from scission.worker.runtime import WorkerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0  # > 0: colocated workers instead of prefill/decode pools
    engine: EngineConfig = field(default_factory=EngineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    etcd_endpoints: tuple[str, ...] = ()  # empty = start an embedded etcd
    ray_address: str | None = None  # None = start a local Ray
    registry_prefix: str = "/scission"
    lease_ttl_s: int = 5
    hold_timeout_s: float = 30.0
    threads_per_worker: int | None = None  # None = cores / workers
    # Pin each worker process to its own disjoint set of cores (``assign_cpus``; one core
    # each with 2 cores and 2 workers), applied before torch starts its threads.
    pin_cpus: bool = False
    start_timeout_s: float = 600.0
    # Ray restarts a worker whose process died this many times (-1 = forever); the restarted
    # worker registers again as a new incarnation. ``kill_worker`` never restarts.
    max_worker_restarts: int = 3
    # Likewise for the router; its port is fixed at start (a free one if router.port is 0),
    # so a restarted router serves on the same address. Streams in flight are lost.
    max_router_restarts: int = 3
    # Where workers bind their gRPC server: "auto" = 127.0.0.1 on a Ray cluster started here,
    # 0.0.0.0 (advertising the node's IP) when joining one (``ray_address``, possibly
    # multi-node); or an explicit address.
    worker_host: str = "auto"

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_colocated) < 0:
            raise ValueError("worker counts must be >= 0")
        if min(self.max_worker_restarts, self.max_router_restarts) < -1:
            raise ValueError("max_worker_restarts and max_router_restarts must be >= -1")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.num_colocated == 0 and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError("need at least one prefill and one decode worker, or --colocated K")

    @property
    def pools(self) -> dict[WorkerRole, int]:
        if self.num_colocated:
            return {WorkerRole.COLOCATED: self.num_colocated}
        return {WorkerRole.PREFILL: self.num_prefill, WorkerRole.DECODE: self.num_decode}


def assign_cpus(cpus: Sequence[int], num_workers: int,
                cores_per_worker: int | None = None) -> list[tuple[int, ...]]:
    """One core set per worker, cut in order from ``cpus``: ``cores_per_worker`` cores each
    (None = ``len(cpus) // num_workers``, at least 1). Disjoint while the cores last; past
    that the sets wrap around and share cores (a warning is logged).

    Example: cpus (0, 1), 2 workers -> [(0,), (1,)]; cpus 0..7, 3 workers, 2 each ->
    [(0, 1), (2, 3), (4, 5)].
    """
    assert cpus and num_workers >= 1, "need cores and at least one worker"
    ordered = sorted(cpus)
    per = min(cores_per_worker or max(1, len(ordered) // num_workers), len(ordered))
    if per * num_workers > len(ordered):
        logger.warning("pinning %d workers x %d cores onto %d cores: sets overlap",
                       num_workers, per, len(ordered))
    return [tuple(ordered[(i * per + j) % len(ordered)] for j in range(per))
            for i in range(num_workers)]


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.etcd: EmbeddedEtcd | None = None
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self.router = None
        self.router_address: str | None = None
        self._ray_started = False
        self._etcd_cfg: EtcdClientConfig | None = None
        self._cpu_sets: list[tuple[int, ...]] = []  # pin_cpus: one per worker, in spawn order
        self._num_spawned = 0

    def start(self) -> str:
        """Returns the router's address once every worker is registered."""
        cfg = self.config
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self._ray_started = True
        endpoints = cfg.etcd_endpoints
        if not endpoints:
            self.etcd = EmbeddedEtcd().start()
            endpoints = (self.etcd.endpoint,)
        self._etcd_cfg = EtcdClientConfig(endpoints=endpoints)
        if cfg.pin_cpus:
            self._cpu_sets = assign_cpus(sorted(os.sched_getaffinity(0)),
                                         sum(cfg.pools.values()), cfg.threads_per_worker)
        counters = {role: 0 for role in cfg.pools}
        pending = [self._spawn(role, counters) for role, n in cfg.pools.items() for _ in range(n)]
        ray.get(pending, timeout=cfg.start_timeout_s)
        router_port = cfg.router.port or find_free_port(cfg.router.host)
        router_cfg = dataclasses.replace(cfg.router, etcd=self._etcd_cfg, port=router_port,
                                         registry=RegistryConfig(prefix=cfg.registry_prefix))
        from scission.cluster.actors import RouterActor

        self.router = RouterActor.options(max_restarts=cfg.max_router_restarts).remote(
            router_cfg)
        self.router_address = ray.get(self.router.start.remote(), timeout=cfg.start_timeout_s)
        return self.router_address

    def add_worker(self, role: WorkerRole) -> str:
        """Start one more worker of ``role``; returns its worker id."""
        counters = {role: sum(1 for w in self.workers if w.startswith(role.value))}
        ray.get(self._spawn(role, counters), timeout=self.config.start_timeout_s)
        return list(self.workers)[-1]

    def kill_worker(self, worker_id: str) -> None:
        """Hard-kill a worker for good (no deregistration: its lease expires; no restart)."""
        ray.kill(self.workers.pop(worker_id), no_restart=True)

    def crash_worker(self, worker_id: str) -> int:
        """SIGKILL a worker's process as a crash would; Ray restarts it while
        ``max_worker_restarts`` allows. Returns the killed pid."""
        pid = ray.get(self.workers[worker_id].pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        return pid

    def crash_router(self) -> int:
        """SIGKILL the router process as a crash would; Ray restarts it on the same address
        while ``max_router_restarts`` allows. Returns the killed pid."""
        pid = ray.get(self.router.pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        handles = list(self.workers.values()) + ([self.router] if self.router else [])
        try:
            ray.get([h.stop.remote() for h in handles], timeout=20)
        except Exception as e:  # a dead actor cannot stop; it is killed below anyway
            logger.warning("graceful stop incomplete: %s", e)
        for h in handles:
            ray.kill(h, no_restart=True)
        self.workers.clear()
        self.router = None
        if self._ray_started:
            ray.shutdown()
        if self.etcd is not None:
            self.etcd.stop()

    def _spawn(self, role: WorkerRole, counters: dict[WorkerRole, int]):
        from scission.cluster.actors import WorkerActor

        cfg = self.config
        worker_id = f"{role.value}-{counters[role]}"
        counters[role] += 1
        cpu_ids: tuple[int, ...] = ()
        if self._cpu_sets:  # a worker added later reuses the sets in turn
            cpu_ids = self._cpu_sets[self._num_spawned % len(self._cpu_sets)]
        self._num_spawned += 1
        threads = cfg.threads_per_worker or len(cpu_ids) or max(
            1, (os.cpu_count() or 1) // sum(cfg.pools.values()))
        engine = dataclasses.replace(cfg.engine, num_threads=threads)
        host = cfg.worker_host
        if host == "auto":
            host = "127.0.0.1" if cfg.ray_address is None else "0.0.0.0"
        wcfg = WorkerConfig(worker_id=worker_id, role=role, engine=engine, etcd=self._etcd_cfg,
                            host=host,
                            registry=RegistryConfig(prefix=cfg.registry_prefix),
                            lease_ttl_s=cfg.lease_ttl_s, hold_timeout_s=cfg.hold_timeout_s)
        actor = WorkerActor.options(name=f"scission-{worker_id}-{os.getpid()}",
                                    max_restarts=cfg.max_worker_restarts).remote(wcfg, cpu_ids)
        self.workers[worker_id] = actor
        return actor.start.remote()
