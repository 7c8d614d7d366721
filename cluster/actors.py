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

import ray
import torch

from scission.registry.workers import WorkerRole
from scission.router.config import RouterConfig
from scission.worker.runtime import WorkerConfig, WorkerRuntime

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
    raise ValueError(f"no servicer for role {role}")


@ray.remote(num_cpus=0, max_restarts=0)
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
        self.runtime = WorkerRuntime(self.config, _servicer_factory(self.config.role)).start()
        return self.runtime.endpoint

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None

    def kv_token_bytes(self, block_ids: list[int], num_tokens: int) -> bytes:
        """K and V bytes of the first ``num_tokens`` token slots of ``block_ids`` (all layers)."""
        assert self.runtime is not None, "worker not started"
        cache = self.runtime.engine.kv_cache.tensor  # [L, 2, N, bs, H, D]
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

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.server.stop()
