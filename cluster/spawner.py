"""Starts worker actors with cluster-unique ids (``{role}-{n}``, n never reused)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

import ray

from scission.engine.config import EngineConfig
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole
from scission.worker.runtime import WorkerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerTemplate:
    """What every worker of the cluster shares; ``threads`` already resolved per worker."""

    engine: EngineConfig
    etcd: EtcdClientConfig
    registry: RegistryConfig
    host: str  # bind address (127.0.0.1, or "node" = the node's IP on a multi-node Ray)
    lease_ttl_s: int
    hold_timeout_s: float
    max_restarts: int  # Ray restarts of a crashed worker (-1 = forever)
    threads: int  # torch threads per worker
    cpu_sets: tuple[tuple[int, ...], ...] = ()  # pin_cpus: used in turn by spawn order
    name_suffix: str = ""  # Ray actor names: scission-{worker_id}-{suffix}
    cluster_token: str = field(default="", repr=False)  # worker/cluster_auth.py
    kv_checksums: bool = False  # WorkerConfig.kv_checksums
    # role -> Ray custom resources each of its workers asks for (ClusterConfig.worker_resources)
    resources: dict[WorkerRole, dict[str, float]] = field(default_factory=dict)


class WorkerSpawner:
    """Creates ``WorkerActor``s; ids count up per role for the cluster's life, so a new
    worker never takes the id of one still draining or of a dead one."""

    def __init__(self, template: WorkerTemplate) -> None:
        self.template = template
        self._counters = {role: itertools.count() for role in WorkerRole}
        self._num_spawned = 0

    def spawn(self, role: WorkerRole) -> tuple[str, ray.actor.ActorHandle, ray.ObjectRef]:
        """Start one worker of ``role``; returns (worker_id, actor, ref of its start()).

        ``ray.get(ref)`` returns the endpoint once it serves and is registered in etcd, and
        raises if the model failed to load.
        """
        from scission.cluster.actors import WorkerActor

        t = self.template
        worker_id = f"{role.value}-{next(self._counters[role])}"
        cpu_ids: tuple[int, ...] = ()
        if t.cpu_sets:
            cpu_ids = t.cpu_sets[self._num_spawned % len(t.cpu_sets)]
        self._num_spawned += 1
        engine = dataclasses.replace(t.engine, num_threads=t.threads)
        config = WorkerConfig(worker_id=worker_id, role=role, engine=engine, etcd=t.etcd,
                              host=t.host, registry=t.registry, lease_ttl_s=t.lease_ttl_s,
                              hold_timeout_s=t.hold_timeout_s, cluster_token=t.cluster_token,
                              kv_checksums=t.kv_checksums)
        placement = {"resources": t.resources[role]} if t.resources.get(role) else {}
        actor = WorkerActor.options(name=f"scission-{worker_id}-{t.name_suffix}",
                                    max_restarts=t.max_restarts, **placement).remote(config,
                                                                                     cpu_ids)
        logger.info("starting worker %s", worker_id)
        return worker_id, actor, actor.start.remote()
