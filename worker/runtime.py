"""What every worker process runs, whatever its role: the engine loop, the NIXL agent, the
internal gRPC server, and the etcd registration with periodic load stats.

Role servicers (``prefill_worker``, ``decode_worker``) subclass ``BaseWorkerServicer``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scission.engine.config import EngineConfig
from scission.engine.engine_loop import EngineLoop, in_scratch_thread
from scission.engine.llm_engine import LLMEngine
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.proto.scission.internal.v1 import worker_pb2_grpc as pb_grpc
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_retry import retry_etcd
from scission.registry.kv_index import EMBEDDING_DIR, KVEventPublisher, KVIndexConfig
from scission.registry.signing import record_key
from scission.registry.workers import (
    EtcdClientConfig,
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
    connect,
)
from scission.worker import lifecycle
from scission.worker.cluster_auth import ClusterTokenInterceptor
from scission.worker.encode_service import (
    encode_rpc,
    make_encode_service,
    parse_embedding_notification,
)
from scission.worker.lifecycle import DrainResult, RoleServicer
from scission.worker.metrics import MAX_PUBLISHED_STEPS, WorkerMetrics, stats_record
from scission.worker.ports import advertised_host, bind_host

logger = logging.getLogger(__name__)
ServicerFor = Callable[[WorkerRole], Callable[["WorkerRuntime"], "BaseWorkerServicer"]]


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    role: WorkerRole
    engine: EngineConfig = field(default_factory=EngineConfig)
    etcd: EtcdClientConfig = field(default_factory=EtcdClientConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    kv_index: KVIndexConfig = field(default_factory=KVIndexConfig)
    # Bind address; "node" (``ports.NODE_HOST``) = this Ray node's IP (multi-node), 0.0.0.0 =
    # all interfaces.
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    # Address registered in etcd for the router and peers; None = ``host``, or this node's IP
    # when ``host`` is a wildcard (``worker/ports.advertised_host``).
    advertise_host: str | None = None
    lease_ttl_s: int = 5
    hold_timeout_s: float = 30.0  # prefill: unpulled KV is released after this
    kv_pull_timeout_s: float = 10.0
    kv_pull_failure_recompute: bool = True  # decode: recompute locally if a pull fails
    # decode: blocks of a timed-out pull stay quarantined until the prefill peer leaves the
    # directory, or at most this long; then the peer is disconnected and they are freed
    kv_quarantine_max_s: float = 60.0
    # decode: wait this long for free KV blocks for a pulled prompt before RESOURCE_EXHAUSTED
    # (a full cache frees blocks as running requests finish; 5 s turned overload into failures)
    kv_reserve_timeout_s: float = 60.0
    # prefill: one checksum per block in each transfer handle, checked by the decode worker
    # after its READ (kv_transfer/integrity.py; a mismatch = a failed pull, counted)
    kv_checksums: bool = False
    stats_interval_s: float = 0.5
    request_timeout_s: float = 600.0
    grpc_max_workers: int = 128
    metrics_port: int | None = None  # Prometheus /metrics on ``host`` (0 = any free); None = off
    # Vision-language models: the image embedding cache (pages registered with NIXL).
    embedding_cache_bytes: int = 128 * 1024**2
    embedding_page_tokens: int = 64  # embedding rows per page
    max_encode_batch_images: int = 8  # images per vision-tower forward pass
    max_receive_message_bytes: int = 256 * 1024**2  # internal gRPC (Encode carries images)
    # Starting while etcd is away (restarting, a Ray restart of this worker during an
    # outage): keep trying to load the directory and register for this long, then fail.
    etcd_wait_s: float = 60.0
    # The internal door (worker/cluster_auth.py): calls without this token are refused;
    # "" = no check (a worker built by hand in a test).
    cluster_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.lease_ttl_s < 1 or self.hold_timeout_s <= 0 or self.stats_interval_s <= 0 \
                or self.kv_reserve_timeout_s < 0 or self.kv_quarantine_max_s <= 0:
            raise ValueError("lease_ttl_s >= 1, hold_timeout_s > 0, stats_interval_s > 0, "
                             "kv_reserve_timeout_s >= 0, kv_quarantine_max_s > 0 required")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port out of range: {self.metrics_port}")


class WorkerRuntime:
    """Builds and owns one worker's parts; ``start()`` returns once registered in etcd."""

    def __init__(self, config: WorkerConfig, servicer_for: ServicerFor) -> None:
        """``servicer_for(role)`` builds the role's servicer from this runtime (called again on
        a role flip)."""
        from scission.kv_transfer.agent import KVTransferAgent

        self.config = config
        self.role = config.role  # changes on a role flip (worker_id stays)
        self._servicer_for = servicer_for
        # Every torch op of the build (weights, KV cache, embedding pages) off this (Ray's)
        # thread, so the loop thread's OpenMP team is the process's only one (in_scratch_thread)
        self.engine = in_scratch_thread(lambda: LLMEngine(config.engine))
        self.loop = EngineLoop(self.engine)
        self.encode_service = in_scratch_thread(lambda: make_encode_service(self.engine, config))
        pages = None if self.encode_service is None else self.encode_service.cache.pages
        self.agent = KVTransferAgent(f"{config.worker_id}:{uuid.uuid4().hex[:8]}",
                                     self.engine.kv_cache.layers, embedding_pages=pages)
        self.etcd = connect(config.etcd)
        self.directory = WorkerDirectory(self.etcd, config.registry,
                                         record_key=record_key(config.cluster_token))
        self.registration = WorkerRegistration(self.etcd, config.registry,
                                               on_new_incarnation=self._on_new_incarnation,
                                               record_key=record_key(config.cluster_token))
        self.kv_publisher = KVEventPublisher(self.etcd, config.registry, config.worker_id,
                                             config.kv_index)
        self.loop.add_hook(self._drain_kv_events)
        self.embedding_publisher = None if self.encode_service is None else KVEventPublisher(
            self.etcd, config.registry, config.worker_id, config.kv_index, EMBEDDING_DIR)
        # Encode calls carry whole images: the router's --max-message-bytes bounds them.
        self.token_check = ClusterTokenInterceptor(config.cluster_token) \
            if config.cluster_token else None
        if self.token_check is None:
            logger.warning("worker %s: no cluster token, the internal API is open to anyone "
                           "who reaches its port", config.worker_id)
        self.server = grpc.server(futures.ThreadPoolExecutor(config.grpc_max_workers),
                                  interceptors=[self.token_check] if self.token_check else [],
                                  options=[("grpc.max_receive_message_length",
                                            config.max_receive_message_bytes)])
        self.role_servicer = RoleServicer(servicer_for(self.role)(self))
        pb_grpc.add_WorkerServicer_to_server(self.role_servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.host = bind_host(config.host)
        self.port = self.server.add_insecure_port(f"{self.host}:{config.port}")
        self.endpoint = f"{config.advertise_host or advertised_host(self.host)}:{self.port}"
        self.info: WorkerInfo | None = None
        self._stop = threading.Event()
        self.metrics = WorkerMetrics(config.worker_id, self.engine.step_metrics, self.stats)
        self.metrics_port: int | None = None  # bound port once started with metrics on
        self.role_since_s = 0.0  # wall clock: start, then each role flip (WorkerInfo)
        self.num_notifications_dropped = 0  # embedding ones (``poll_notifications``)

    def start(self) -> WorkerRuntime:
        self.loop.start()
        self.server.start()
        wait_s, wid = self.config.etcd_wait_s, self.config.worker_id
        retry_etcd(self.directory.start, f"worker {wid}: directory", wait_s)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.host, self.config.metrics_port)
        self._started_at_s = self.role_since_s = time.time()
        retry_etcd(self.register, f"worker {wid}: registration", wait_s)
        self.kv_publisher.start()
        if self.embedding_publisher is not None:
            self.embedding_publisher.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._publish_stats, name="stats", daemon=True).start()
        logger.info("worker %s (%s) serving on %s, incarnation %d", self.config.worker_id,
                    self.role.value, self.endpoint, self.info.incarnation)
        return self

    @property
    def servicer(self) -> BaseWorkerServicer:
        """The current role's servicer."""
        return self.role_servicer.current

    def register(self) -> WorkerInfo:
        """Register as ``self.role`` under a new lease (start, and after a role flip); the KV
        index is published under it. Raises etcd errors."""
        eng = self.engine
        emb_layout = self.agent.embedding_layout()
        info = WorkerInfo(
            worker_id=self.config.worker_id, role=self.role, endpoint=self.endpoint,
            agent_name=self.agent.name, agent_metadata=self.agent.metadata(),
            kv_layout=self.agent.layout().to_bytes(), num_blocks=eng.kv_cache.num_blocks,
            block_size=eng.kv_cache.block_size, model_id=eng.model_config.model_id,
            started_at_s=self._started_at_s, role_since_s=self.role_since_s,
            embedding_layout=b"" if emb_layout is None else emb_layout.to_bytes(),
            accepts_images=self.encode_service is not None,
        )
        self.info = self.registration.register(info, self.config.lease_ttl_s)
        self._set_index_lease(self.info.incarnation)
        return self.info

    def drain(self, deadline_s: float) -> DrainResult:
        """See ``worker.lifecycle.drain``."""
        return lifecycle.drain(self, deadline_s)

    def flip(self, role: WorkerRole, deadline_s: float) -> DrainResult:
        """See ``worker.lifecycle.flip``."""
        return lifecycle.flip(self, role, deadline_s, self._servicer_for)

    def stop(self) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.kv_publisher.close()  # revoking the lease below removes the index keys
        if self.embedding_publisher is not None:
            self.embedding_publisher.close()
            self.encode_service.close()
        logger.info("KV index publisher of %s: %s", self.config.worker_id,
                    self.kv_publisher.counters)
        self.registration.deregister()
        self.server.stop(grace=2).wait()
        self.loop.stop()
        self.directory.close()
        self.agent.close()
        self.metrics.close()

    def stats(self) -> pb.WorkerStats:
        eng, sched = self.engine, self.engine.scheduler
        steps, last = eng.step_metrics.totals, eng.step_metrics.last
        enc = self.encode_service
        num_pages, num_free_pages = (0, 0) if enc is None else enc.page_counts()
        return pb.WorkerStats(
            worker_id=self.config.worker_id, role=self.role.value,
            num_blocks=eng.kv_cache.num_blocks, num_free_blocks=eng.num_free_blocks,
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_held=len(eng.held), queued_prefill_tokens=eng.queued_prefill_tokens(),
            num_prompt_tokens_computed=eng.num_prompt_tokens_computed,
            kv_usage=eng.kv_usage, num_steps_total=steps.num_steps, step_ms_total=steps.step_ms,
            num_prefill_tokens_total=steps.num_prefill_tokens,
            num_decode_tokens_total=steps.num_decode_tokens,
            last_step_ms=last.step_ms if last else 0.0,
            last_num_decode_requests=last.num_decode_requests if last else 0,
            last_num_prefill_tokens=last.num_prefill_tokens if last else 0,
            num_encode_waiting=0 if enc is None else enc.num_waiting,
            num_images_encoded_total=0 if enc is None else enc.num_encoded,
            num_embedding_cache_hits_total=0 if enc is None else enc.num_cache_hits,
            num_embedding_pages=num_pages, num_free_embedding_pages=num_free_pages,
            num_notifications_dropped_total=self.num_notifications_dropped + getattr(
                self.servicer, "num_notifications_dropped", 0),
            num_quarantined_blocks=self.servicer.num_quarantined_blocks,
            num_kv_checksum_mismatches_total=getattr(self.servicer,
                                                     "num_kv_checksum_mismatches", 0),
            num_kv_blocks_pulled_total=getattr(self.servicer, "num_kv_blocks_pulled", 0),
            num_kv_blocks_reused_total=getattr(self.servicer, "num_kv_blocks_reused", 0),
            num_kv_pipelined_reads_total=getattr(self.servicer, "num_kv_pipelined_reads", 0),
        )

    def _drain_kv_events(self) -> None:
        """Engine-loop hook: hand this step's KV (and embedding-cache) events to the
        publishers (no I/O here); unpin embeddings whose hold timed out."""
        self.kv_publisher.submit(self.engine.take_kv_events())
        if self.encode_service is not None:
            self.embedding_publisher.submit(self.encode_service.take_events())
            self.encode_service.expire(self.config.hold_timeout_s)

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """NIXL notifications; embedding ones (a reader done with pinned pages) are handled
        here, the rest (KV) returned for the role servicer. Call from the engine loop."""
        rest = []
        for peer, msg in self.agent.poll_notifications():
            note = parse_embedding_notification(msg)
            if note is None or self.encode_service is None:
                rest.append((peer, msg))
            elif not self.is_worker_agent(peer):
                self.num_notifications_dropped += 1  # a pin id is a secret; still: who?
                logger.warning("dropped an embedding notification from %s: sender is no "
                               "registered worker's NIXL agent", peer)
            elif not self.encode_service.on_notification(
                    note, self.info.incarnation if self.info else -1):
                self.num_notifications_dropped += 1  # stale incarnation or unknown pin
        return rest

    def is_worker_agent(self, agent_name: str) -> bool:
        """Whether a NIXL agent belongs to a registered worker (notifications carry no
        credential: one from anyone else is dropped)."""
        return any(w.agent_name == agent_name for w in self.directory.workers())

    def release_pins(self, pin_ids) -> bool:
        """End embedding pins (cancellation); True if any was held."""
        if self.encode_service is None:
            return False
        return any([self.encode_service.unpin(p) for p in pin_ids])

    def _set_index_lease(self, lease_id: int) -> None:
        self.kv_publisher.set_lease(lease_id)
        if self.embedding_publisher is not None:
            self.embedding_publisher.set_lease(lease_id)

    def _on_new_incarnation(self, info: WorkerInfo) -> None:
        """The lease was lost and re-granted: new transfer handles carry the new incarnation
        and the KV index is re-published under the new lease (the old keys died with it)."""
        self.info = info
        self._set_index_lease(info.incarnation)

    def _publish_stats(self) -> None:
        cursor = 0  # engine steps already published (advanced only once a put succeeds)
        while not self._stop.wait(self.config.stats_interval_s):
            try:  # any error (etcd blip, a racing read) is retried next tick, never fatal:
                # a dead publisher would freeze this worker's load for every router
                s = self.stats()
                steps, next_cursor = self.engine.step_metrics.since(cursor)
                recent, _ = self.engine.step_metrics.since(
                    max(0, next_cursor - MAX_PUBLISHED_STEPS))
                self.registration.update_stats(stats_record(s, steps, recent=recent))
                cursor = next_cursor
            except Exception as e:
                logger.warning("stats publish failed: %s", e)


class BaseWorkerServicer(pb_grpc.WorkerServicer):
    """Abort and GetStats for every role; role methods default to UNIMPLEMENTED."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.loop = runtime.loop
        self.engine = runtime.engine

    @property
    def num_quarantined_blocks(self) -> int:
        """Blocks kept out of allocation by this role (decode: timed-out pulls)."""
        return 0

    def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=self.loop.abort(request.request_id))

    def GetStats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return self.runtime.stats()

    def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        """Every role of a vision-language model: the encode role, and the worker that will
        run the prompt when the cluster has no encode pool (EP-D, colocated)."""
        return encode_rpc(self.runtime, request, context)
