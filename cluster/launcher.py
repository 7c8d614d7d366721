"""Starts a scission cluster on Ray: embedded etcd (unless endpoints are given), worker
actors per pool, and the router actor. Stops everything it started, in reverse order."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scission.cluster.controller import ControllerConfig
from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
from scission.cluster.planner.core import PlannerConfig
from scission.cluster.spawner import WorkerTemplate
from scission.engine.config import EngineConfig
from scission.registry.directory import WorkerDirectory
from scission.registry.pools import PlannerMode, PoolStore, PoolTargets, TargetWriter
from scission.registry.workers import EtcdClientConfig, RegistryConfig, WorkerRole, connect
from scission.router.config import RouterConfig
from scission.worker.cluster_auth import new_cluster_token
from scission.worker.ports import NODE_HOST, find_free_port

logger = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.2


@dataclass(frozen=True)
class ClusterConfig:
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0  # > 0: colocated workers instead of prefill/decode pools
    # Encode workers (vision-language models): images are encoded there and the embeddings
    # pulled by prefill over NIXL (E-P-D); 0 = prefill/colocated workers encode (EP-D).
    num_encode: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    etcd_endpoints: tuple[str, ...] = ()  # empty = start an embedded etcd
    # TLS and/or user/password to that external etcd (``state.etcd_client_config``);
    # None = plaintext, no user
    etcd_tls: EtcdClientConfig | None = field(default=None, repr=False)
    # The embedded etcd serves only TLS with client certificates (certificates made at start;
    # every component gets the client one): ``EmbeddedEtcdConfig.tls``
    embedded_etcd_tls: bool = False
    ray_address: str | None = None  # None = start a local Ray
    registry_prefix: str = "/scission"
    lease_ttl_s: int = 5
    hold_timeout_s: float = 30.0
    kv_checksums: bool = False  # WorkerConfig.kv_checksums: verify every KV transfer
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
    # the node's IP ("node", ``worker/ports.NODE_HOST``) when joining one (``ray_address``,
    # possibly multi-node): only the address peers must reach; or an explicit address
    # (0.0.0.0 = every interface, registered under the node's IP).
    worker_host: str = "auto"
    # Ray custom resources every worker of a role asks for (``--worker-resource``): a node
    # started with ``ray start --resources '{"NAME": N}'`` hosts at most N such workers, a
    # node without NAME none (e.g. decode only on the large-memory nodes; KubeRay: a worker
    # group's ``rayStartParams.resources``). Applied at spawn; a role flip keeps the process
    # where it runs. Empty = Ray places workers anywhere.
    worker_resources: dict[WorkerRole, dict[str, float]] = field(default_factory=dict)
    # Elastic pools (cluster/controller.py, cluster/planner/): the planner's mode, its SLOs
    # (also the router's), the worker budget (None = Ray's CPUs / threads per worker), and how
    # long a drain waits before migrating what still runs. (An operator hold's length is the
    # CLI's --hold.)
    planner_mode: PlannerMode = PlannerMode.OFF
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 150.0
    max_workers: int | None = None
    planner_interval_s: float = 5.0
    drain_deadline_s: float = 60.0
    # The planner's tuning (cooldown, hysteresis, lifetimes...); None = its defaults with the
    # SLOs, budget and interval above.
    planner: PlannerConfig | None = None
    # Prometheus /metrics of the controller and planner (0 = any free port; None = off).
    control_metrics_port: int | None = None

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_colocated, self.num_encode) < 0:
            raise ValueError("worker counts must be >= 0")
        if min(self.max_worker_restarts, self.max_router_restarts) < -1:
            raise ValueError("max_worker_restarts and max_router_restarts must be >= -1")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.num_colocated == 0 and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError("need at least one prefill and one decode worker, or --colocated K")
        if not (self.slo_ttft_ms > 0 and self.slo_tpot_ms > 0 and self.planner_interval_s > 0):
            raise ValueError("--slo-ttft-ms, --slo-tpot-ms and --planner-interval-s must be > 0")
        if any(a <= 0 for r in self.worker_resources.values() for a in r.values()):
            raise ValueError(f"worker resource amounts must be > 0: {self.worker_resources}")
        if self.drain_deadline_s < 0:
            raise ValueError(f"--drain-deadline-s must be >= 0, got {self.drain_deadline_s}")
        if self.max_workers is not None and self.max_workers < sum(self.pools.values()):
            raise ValueError(f"--max-workers {self.max_workers} is below the initial pools "
                             f"({sum(self.pools.values())} workers)")

    @property
    def pools(self) -> dict[WorkerRole, int]:
        pools = {WorkerRole.COLOCATED: self.num_colocated} if self.num_colocated else \
            {WorkerRole.PREFILL: self.num_prefill, WorkerRole.DECODE: self.num_decode}
        if self.num_encode:
            pools[WorkerRole.ENCODE] = self.num_encode
        return pools


# Ray's head node waits a fixed 30 s for its raylet to register with the GCS and raises this
# when it does not (ray/_private/node.py); on a loaded 2-core machine a raylet has taken longer.
_RAY_STARTUP_TIMEOUT = "timed out during startup"
RAY_START_ATTEMPTS = 3


def start_ray(init: Callable[[], object], attempts: int = RAY_START_ATTEMPTS) -> None:
    """Calls ``init`` (a ``ray.init``), retried up to ``attempts`` times in all when Ray's
    head node times out during startup. Before each retry the processes that attempt spawned
    (its GCS, raylet, agents: new children of this process) are killed and ``ray.shutdown``
    is called, so a slow raylet of a failed attempt is not left running beside the next one.

    Raises:
        Exception: whatever ``init`` raised on the last attempt, or at once for any other
            error than the startup timeout.
        ValueError: ``attempts`` < 1.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            init()
            return
        except Exception as e:
            if _RAY_STARTUP_TIMEOUT not in str(e) or attempt == attempts:
                raise
            spawned = [p for p in me.children(recursive=True) if p.pid not in before]
            for p in spawned:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(spawned, timeout=10)
            ray.shutdown()
            logger.warning("Ray's head node did not start (%s); killed the %d processes it "
                           "spawned, attempt %d of %d next", e, len(spawned), attempt + 1,
                           attempts)


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Keep this process's own SIGTERM/SIGINT handlers across ``ray.init``: a head node
    installs a SIGTERM handler that kills Ray's processes and exits (and its C++ core a
    failure handler that ends in SIGABRT), which would cut ``scission up``'s drain short. A
    default (non-Python) handler is left to Ray."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    own = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in own.items():
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, handler)


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
    """The cluster ``scission up`` runs: Ray, an embedded etcd (unless endpoints are given),
    the controller actor (which starts and reconciles the worker pools) and the router."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.etcd: EmbeddedEtcd | None = None
        self.controller = None
        self.router = None
        self.router_address: str | None = None
        self.router_http_address: str | None = None  # host:port of the OpenAI HTTP door
        self._ray_started = False
        # The internal door's credential (worker/cluster_auth.py): workers and the router get
        # it in memory through Ray; tests reach workers with ``worker_stub``.
        self.cluster_token = new_cluster_token()
        self._etcd_cfg: EtcdClientConfig | None = None

    def start(self) -> str:
        """Returns the router's address once every worker is registered."""
        cfg = self.config
        if not ray.is_initialized():
            with _keep_signal_handlers():
                start_ray(lambda: ray.init(address=cfg.ray_address, include_dashboard=False,
                                           log_to_driver=False, configure_logging=False))
            self._ray_started = True
        endpoints = cfg.etcd_endpoints
        if not endpoints:
            # Supervised: restarted on the same port and data dir if it dies (workers and the
            # router reconnect; their leases and registrations survive in the data dir).
            etcd_cfg = EmbeddedEtcdConfig(tls=cfg.embedded_etcd_tls)
            self.etcd = EmbeddedEtcd(etcd_cfg).start().supervise()
            self._etcd_cfg = self.etcd.client_config()
        elif cfg.etcd_tls is not None:
            self._etcd_cfg = dataclasses.replace(cfg.etcd_tls, endpoints=endpoints)
        else:
            self._etcd_cfg = EtcdClientConfig(endpoints=endpoints)
        from scission.cluster.actors import ControllerActor, RouterActor

        # The router binds cfg.router.host, an address of this machine: it and the
        # controller run on this (the driver's) node, also when joining a multi-node Ray.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=False)
        self.controller = ControllerActor.options(scheduling_strategy=here).remote(
            self._controller_config(), self._template(), self._planner_config(),
            cfg.planner_mode, cfg.control_metrics_port, cfg.router.host)
        initial = PoolTargets(prefill=cfg.pools.get(WorkerRole.PREFILL, 0),
                              decode=cfg.pools.get(WorkerRole.DECODE, 0),
                              colocated=cfg.pools.get(WorkerRole.COLOCATED, 0),
                              encode=cfg.pools.get(WorkerRole.ENCODE, 0),
                              writer=TargetWriter.INITIAL, reason="scission up",
                              written_at_s=time.time())
        ray.get(self.controller.start.remote(initial, cfg.start_timeout_s),
                timeout=cfg.start_timeout_s + 30)
        router_port = cfg.router.port or find_free_port(cfg.router.host)
        http_port = cfg.router.http_port  # fixed here too, so a restarted router keeps it
        if http_port == 0:
            http_port = find_free_port(cfg.router.host)
        router_cfg = dataclasses.replace(cfg.router, etcd=self._etcd_cfg, port=router_port,
                                         cluster_token=self.cluster_token,
                                         http_port=http_port, model_path=cfg.router.model_path
                                         or cfg.engine.model_path,  # tokenizer, processor
                                         registry=RegistryConfig(prefix=cfg.registry_prefix),
                                         slo_ttft_ms=cfg.slo_ttft_ms, slo_tpot_ms=cfg.slo_tpot_ms)
        self.router = RouterActor.options(max_restarts=cfg.max_router_restarts,
                                          scheduling_strategy=here).remote(router_cfg)
        self.router_address = ray.get(self.router.start.remote(), timeout=cfg.start_timeout_s)
        if http_port is not None:
            self.router_http_address = f"{cfg.router.host}:{http_port}"
        return self.router_address

    @property
    def max_workers(self) -> int:
        """The worker budget: ``ClusterConfig.max_workers``, else Ray's CPUs / threads per
        worker (at least the initial pools)."""
        cfg = self.config
        if cfg.max_workers is not None:
            return cfg.max_workers
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        return max(sum(cfg.pools.values()), cpus // self._threads_per_worker())

    @property
    def workers(self) -> dict[str, ray.actor.ActorHandle]:
        """worker_id -> actor of every worker the controller manages now."""
        return ray.get(self.controller.handles.remote(), timeout=30)

    def add_worker(self, role: WorkerRole, timeout_s: float | None = None) -> str:
        """Raise ``role``'s target by one (as an operator would) and return the new worker's
        id once it is registered in etcd."""
        store = self._pool_store()
        before = set(self.workers)
        targets, revision = store.read_targets()
        assert targets is not None, "cluster not started"
        raised = dataclasses.replace(targets.with_role(role, targets.get(role) + 1),
                                     writer=TargetWriter.OPERATOR, reason="add_worker",
                                     written_at_s=time.time())
        if not store.write_targets(raised, revision):
            raise RuntimeError("pool targets changed meanwhile; try again")
        deadline = time.monotonic() + (timeout_s or self.config.start_timeout_s)
        directory = self._directory()
        try:
            while time.monotonic() < deadline:
                new = [w.worker_id for w in directory.workers(role) if w.worker_id not in before]
                if new:
                    return new[0]
                time.sleep(0.1)
        finally:
            directory.close()
        raise TimeoutError(f"no new {role.value} worker registered in time")

    def kill_worker(self, worker_id: str) -> None:
        """Hard-kill a worker for good (no deregistration: its lease expires; no restart, no
        replacement: its role's target is lowered)."""
        ray.get(self.controller.kill_worker.remote(worker_id), timeout=30)

    def crash_worker(self, worker_id: str) -> int:
        """SIGKILL a worker's process as a crash would; Ray restarts it while
        ``max_worker_restarts`` allows, then the controller replaces it. Returns the pid."""
        pid = ray.get(self.workers[worker_id].pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        return pid

    def crash_router(self) -> int:
        """SIGKILL the router process as a crash would; Ray restarts it on the same address
        while ``max_router_restarts`` allows. Returns the killed pid."""
        pid = ray.get(self.router.pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        return pid

    def drain(self, grace_s: float, cut_short: threading.Event | None = None) -> int:
        """Stop admitting at the router (new requests get UNAVAILABLE) and wait up to
        ``grace_s`` (or until ``cut_short`` is set) for the requests in flight to end. Returns
        how many were still running then (``stop()`` cuts them), -1 if the router could not
        be asked."""
        if self.router is None:
            return 0
        deadline = time.monotonic() + grace_s
        try:
            in_flight = ray.get(self.router.drain.remote(), timeout=30)
            while in_flight > 0 and time.monotonic() < deadline:
                if cut_short is not None and cut_short.wait(_DRAIN_POLL_S):
                    break
                in_flight = ray.get(self.router.in_flight.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as e:
            logger.warning("router drain failed (%s); stopping anyway", e)
            return -1
        return in_flight

    def stop(self) -> None:
        for actor in (self.router, self.controller):
            if actor is None:
                continue
            try:
                ray.get(actor.stop.remote(), timeout=40)
            except Exception as e:  # a dead actor cannot stop; it is killed below anyway
                logger.warning("graceful stop incomplete: %s", e)
            ray.kill(actor, no_restart=True)
        self.router = self.controller = None
        if self._ray_started:
            ray.shutdown()
        if self.etcd is not None:
            self.etcd.stop()

    def _pool_store(self) -> PoolStore:
        assert self._etcd_cfg is not None, "cluster not started"
        return PoolStore(connect(self._etcd_cfg), RegistryConfig(prefix=self.config.registry_prefix))

    def _directory(self) -> WorkerDirectory:
        assert self._etcd_cfg is not None, "cluster not started"
        return WorkerDirectory(connect(self._etcd_cfg),
                               RegistryConfig(prefix=self.config.registry_prefix)).start()

    def _threads_per_worker(self) -> int:
        cfg = self.config
        if cfg.threads_per_worker:
            return cfg.threads_per_worker
        if cfg.pin_cpus:
            return max(1, len(os.sched_getaffinity(0)) // sum(cfg.pools.values()))
        return max(1, (os.cpu_count() or 1) // sum(cfg.pools.values()))

    def _controller_config(self) -> ControllerConfig:
        return ControllerConfig(drain_deadline_s=self.config.drain_deadline_s,
                                max_workers=self.max_workers)

    def _planner_config(self) -> PlannerConfig:
        cfg = self.config
        if cfg.planner is not None:
            return cfg.planner
        return PlannerConfig(slo_ttft_ms=cfg.slo_ttft_ms, slo_tpot_ms=cfg.slo_tpot_ms,
                             max_workers=self.max_workers, interval_s=cfg.planner_interval_s)

    def _template(self) -> WorkerTemplate:
        cfg = self.config
        cpu_sets: tuple[tuple[int, ...], ...] = ()
        if cfg.pin_cpus:
            cpu_sets = tuple(assign_cpus(sorted(os.sched_getaffinity(0)),
                                         sum(cfg.pools.values()), cfg.threads_per_worker))
        threads = cfg.threads_per_worker or (len(cpu_sets[0]) if cpu_sets else
                                             self._threads_per_worker())
        host = cfg.worker_host
        if host == "auto":
            host = "127.0.0.1" if cfg.ray_address is None else NODE_HOST
        return WorkerTemplate(engine=cfg.engine, etcd=self._etcd_cfg, host=host,
                              registry=RegistryConfig(prefix=cfg.registry_prefix),
                              lease_ttl_s=cfg.lease_ttl_s, hold_timeout_s=cfg.hold_timeout_s,
                              max_restarts=cfg.max_worker_restarts, threads=threads,
                              cpu_sets=cpu_sets, name_suffix=str(os.getpid()),
                              cluster_token=self.cluster_token, kv_checksums=cfg.kv_checksums,
                              resources=cfg.worker_resources)


def worker_stub(endpoint: str, cluster_token: str):
    """A stub for one worker's internal API carrying the cluster token (tests, benchmarks:
    ``LocalCluster.cluster_token``)."""
    import grpc

    from scission.proto.scission.internal.v1 import worker_pb2_grpc
    from scission.worker.cluster_auth import with_cluster_token

    return worker_pb2_grpc.WorkerStub(with_cluster_token(grpc.insecure_channel(endpoint),
                                                         cluster_token))
