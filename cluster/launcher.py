"""Starts a scission cluster on Ray: embedded etcd (unless endpoints are given), worker
actors per pool, and the router actor. Stops everything it started, in reverse order."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import ray

from scission.cluster.etcd_server import EmbeddedEtcd
from scission.cluster.registry import EtcdClientConfig, RegistryConfig, WorkerRole
from scission.cluster.worker_runtime import WorkerConfig
from scission.engine.config import EngineConfig
from scission.router.config import RouterConfig

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
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_colocated) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.num_colocated == 0 and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError("need at least one prefill and one decode worker, or --colocated K")

    @property
    def pools(self) -> dict[WorkerRole, int]:
        if self.num_colocated:
            return {WorkerRole.COLOCATED: self.num_colocated}
        return {WorkerRole.PREFILL: self.num_prefill, WorkerRole.DECODE: self.num_decode}


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.etcd: EmbeddedEtcd | None = None
        self.workers: dict[str, ray.actor.ActorHandle] = {}
        self.router = None
        self.router_address: str | None = None
        self._ray_started = False
        self._etcd_cfg: EtcdClientConfig | None = None

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
        counters = {role: 0 for role in cfg.pools}
        pending = [self._spawn(role, counters) for role, n in cfg.pools.items() for _ in range(n)]
        ray.get(pending, timeout=cfg.start_timeout_s)
        router_cfg = dataclasses.replace(cfg.router, etcd=self._etcd_cfg,
                                         registry=RegistryConfig(prefix=cfg.registry_prefix))
        from scission.cluster.actors import RouterActor

        self.router = RouterActor.remote(router_cfg)
        self.router_address = ray.get(self.router.start.remote(), timeout=cfg.start_timeout_s)
        return self.router_address

    def add_worker(self, role: WorkerRole) -> str:
        """Start one more worker of ``role``; returns its worker id."""
        counters = {role: sum(1 for w in self.workers if w.startswith(role.value))}
        ray.get(self._spawn(role, counters), timeout=self.config.start_timeout_s)
        return list(self.workers)[-1]

    def kill_worker(self, worker_id: str) -> None:
        """Hard-kill a worker process (no deregistration: its lease expires)."""
        ray.kill(self.workers.pop(worker_id), no_restart=True)

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
        threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // sum(cfg.pools.values()))
        engine = dataclasses.replace(cfg.engine, num_threads=threads)
        wcfg = WorkerConfig(worker_id=worker_id, role=role, engine=engine, etcd=self._etcd_cfg,
                            registry=RegistryConfig(prefix=cfg.registry_prefix),
                            lease_ttl_s=cfg.lease_ttl_s, hold_timeout_s=cfg.hold_timeout_s)
        actor = WorkerActor.options(name=f"scission-{worker_id}-{os.getpid()}").remote(wcfg)
        self.workers[worker_id] = actor
        return actor.start.remote()
