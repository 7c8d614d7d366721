"""The public gRPC server: ``scission.v1.Generation`` plus health checking and reflection."""

from __future__ import annotations

import json
import logging
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scission.engine.loader import read_vlm_config, vlm_architecture
from scission.engine.mm_processor import MultimodalProcessor
from scission.engine.tokenizer import default_model_path, load_tokenizer
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_retry import retry_etcd
from scission.registry.kv_index import EMBEDDING_DIR
from scission.registry.kv_index_watch import KVIndexWatcher
from scission.registry.signing import record_key
from scission.registry.slo_publisher import SloPublisher
from scission.registry.workers import connect
from scission.router import auth
from scission.router.admission import Admission
from scission.router.config import RouterConfig
from scission.router.convert import parse_generate_request
from scission.router.encode_step import EncodeStep
from scission.router.generation import GenerationServicer
from scission.router.http_api import HttpSecurity, HttpServer, served_model_name
from scission.router.metrics import RouterMetrics
from scission.router.placement import Placer
from scission.router.prefix_index import PrefixIndex, PromptHasher
from scission.router.slo import SloTracker
from scission.router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


def http_security(config: RouterConfig, api_keys: auth.ApiKeys | None) -> HttpSecurity:
    return HttpSecurity(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file,
                        api_keys, auth.HTTP_HEALTH_PATHS if config.auth_exempt_health
                        else frozenset())


class RouterServer:
    """Owns the router's parts; ``start()`` returns once the port is bound."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model_path or default_model_path())
        self.etcd = connect(config.etcd)
        self.directory = WorkerDirectory(self.etcd, config.registry,
                                         on_added=lambda info: self.pool.on_worker_added(info),
                                         on_removed=lambda wid: self.pool.on_worker_removed(wid),
                                         record_key=record_key(config.cluster_token))
        self.pool = WorkerPool(self.directory, config.max_message_bytes, config.cluster_token)
        self.index = PrefixIndex(config.placement.speculative_ttl_s)
        self.kv_watcher = KVIndexWatcher(self.etcd, config.registry, self.index)
        self.placer = Placer(config.placement, self.pool, prefix_match=self.index.match)
        self.hasher = PromptHasher(self.directory.workers)
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"  # system-assigned, per process
        self.slo = SloTracker(config.slo_ttft_ms, config.slo_tpot_ms, config.slo_window_s)
        self.slo_publisher = SloPublisher(self.etcd, config.registry, self.router_id,
                                          lambda: self.slo.windows(self.router_id),
                                          config.slo_publish_interval_s)
        self.metrics = RouterMetrics(self.index, self.kv_watcher, self.slo)
        self.metrics_port: int | None = None  # bound port once started with metrics on
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes)]
        keys = auth.load_api_keys(config.api_keys_file, config.api_keys_env)
        self.api_keys = auth.ApiKeys(keys) if keys else None
        interceptors = [] if self.api_keys is None else [auth.GrpcAuthInterceptor(
            self.api_keys, auth.GRPC_HEALTH_METHODS if config.auth_exempt_health else frozenset())]
        self.server = grpc.server(futures.ThreadPoolExecutor(config.max_concurrent_rpcs),
                                  interceptors=interceptors, options=opts,
                                  maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        self.admission = Admission(config.max_concurrent_requests,
                                   config.max_queued_prompt_tokens)
        model = config.served_model_name or served_model_name(config.model_path or
                                                              default_model_path())
        self.embedding_index, self.embedding_watcher, encode_step = self._encode_step()
        self.servicer = GenerationServicer(config, self.tokenizer, self.pool, self.placer,
                                           self.index, self.hasher, self.metrics, self.slo,
                                           self.admission, model, encode_step)
        add_generation_service(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        creds = auth.grpc_server_credentials(config)
        bind = f"{config.host}:{config.port}"
        self.port = self.server.add_insecure_port(bind) if creds is None else \
            self.server.add_secure_port(bind, creds)
        self.address = f"{config.host}:{self.port}"
        self.http: HttpServer | None = None
        if config.http_port is not None:  # binds now, serves from start()
            self.http = HttpServer(self.servicer, model, config.host, config.http_port,
                                   config.max_message_bytes, config.max_concurrent_rpcs,
                                   http_security(config, self.api_keys))
        self.http_address = self.http.address if self.http is not None else None

    def _encode_step(self) -> tuple[PrefixIndex | None, KVIndexWatcher | None,
                                    EncodeStep | None]:
        """For a vision-language model: the embedding index (fed from etcd) and the encode
        step; (None, None, None) for a text-only model."""
        path = Path(self.config.model_path or default_model_path())
        config = path / "config.json"
        if not config.is_file() or vlm_architecture(json.loads(config.read_text())) is None:
            return None, None, None
        processor = MultimodalProcessor.from_pretrained(str(path), read_vlm_config(path)[1])
        index = PrefixIndex(self.config.placement.speculative_ttl_s)
        watcher = KVIndexWatcher(self.etcd, self.config.registry, index,
                                 index_dir=EMBEDDING_DIR)
        step = EncodeStep(self.pool, self.placer, self.tokenizer, processor, index,
                          self.config.prefill_timeout_s)
        logger.info("serving images for %s (encode step on)", processor.model_id)
        return index, watcher, step

    def start(self) -> RouterServer:
        cfg = self.config
        retry_etcd(self.directory.start, "router: worker directory", cfg.etcd_wait_s)
        retry_etcd(self.kv_watcher.start, "router: KV index", cfg.etcd_wait_s)
        if self.embedding_watcher is not None:
            retry_etcd(self.embedding_watcher.start, "router: embedding index", cfg.etcd_wait_s)
        if cfg.metrics_port is not None:
            guarded = not cfg.auth_exempt_metrics  # then the same key and TLS as the doors
            self.metrics_port = self.metrics.serve(
                cfg.metrics_host, cfg.metrics_port, cfg.kv_lag_probe_interval_s,
                self.api_keys if guarded else None,
                auth.server_ssl_context(cfg) if guarded else None)
        self.slo_publisher.start()
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("scission.v1.Generation", health_pb2.HealthCheckResponse.SERVING)
        logger.info("router %s serving scission.v1.Generation on %s (%s, %s)", self.router_id,
                    self.address, "TLS" if cfg.tls else "plaintext",
                    "API keys" if self.api_keys else "no API keys")
        if self.http is not None:
            self.http.start()
            logger.info("router %s serving the OpenAI-compatible HTTP API on %s",
                        self.router_id, self.http_address)
        return self

    def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.stop()
        self.server.stop(grace=2).wait()
        self.slo_publisher.close()  # revokes its lease: the SLO keys vanish
        self.metrics.close()
        self.kv_watcher.close()
        if self.embedding_watcher is not None:
            self.embedding_watcher.close()
            self.servicer.encode_step.close()
        self.directory.close()
        self.pool.close()


def add_generation_service(servicer: GenerationServicer, server: grpc.Server) -> None:
    """``pb_grpc.add_GenerationServicer_to_server`` with a deserializer that never raises
    (``convert.parse_generate_request``): undecodable bytes reach ``validate`` and get
    INVALID_ARGUMENT, counted like any other bad request."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=parse_generate_request,
        response_serializer=pb.GenerateResponse.SerializeToString)}
    name = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
