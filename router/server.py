"""The public gRPC server: ``scission.v1.Generation`` plus health checking and reflection."""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scission.cluster.registry import WorkerDirectory, connect
from scission.engine.request import InvalidRequestError
from scission.engine.tokenizer import Tokenizer, default_model_path, load_tokenizer
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
from scission.router import flows
from scission.router.config import RouterConfig
from scission.router.convert import validate
from scission.router.placement import NoWorkersError, Placer
from scission.router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)
MAX_PLACEMENT_ATTEMPTS = 3  # a prefill that fails before streaming is retried elsewhere
SUSPECT_S = 10.0  # a failed worker gets no traffic for this long (or until it leaves etcd)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, pool: WorkerPool,
                 placer: Placer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.placer = placer
        self.context_len = tokenizer.context_length or 2048

    def Generate(self, request: pb.GenerateRequest, context):
        start_s = time.monotonic()
        cfg = self.config
        try:
            vr = validate(request, self.tokenizer, self.context_len, cfg.default_max_tokens,
                          cfg.max_tokens_limit, cfg.max_prompt_tokens)
        except InvalidRequestError as e:
            code = grpc.StatusCode.OUT_OF_RANGE if e.out_of_range else \
                grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(e))
        for attempt in range(MAX_PLACEMENT_ATTEMPTS):
            try:
                placement = self.placer.place(len(vr.prompt_token_ids), [])
            except NoWorkersError as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            try:
                yield from self._run(vr, placement, start_s)
                return
            except flows.FlowError as e:
                if e.failed_worker is None or attempt + 1 == MAX_PLACEMENT_ATTEMPTS:
                    context.abort(e.code, str(e))
                self.pool.mark_suspect(e.failed_worker, SUSPECT_S)

    def _run(self, vr, placement, start_s: float):
        cfg = self.config
        if placement.disaggregated:
            return flows.run_disaggregated(vr, placement, self.pool, start_s,
                                           cfg.prefill_timeout_s, cfg.request_timeout_s)
        return flows.run_local(vr, placement, self.pool, start_s, cfg.request_timeout_s)


class RouterServer:
    """Owns the router's parts; ``start()`` returns once the port is bound."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model_path or default_model_path())
        self.etcd = connect(config.etcd)
        self.directory = WorkerDirectory(self.etcd, config.registry)
        self.pool = WorkerPool(self.directory)
        self.placer = Placer(config.placement, self.pool, block_size=16)
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes)]
        self.server = grpc.server(futures.ThreadPoolExecutor(config.max_concurrent_rpcs),
                                  options=opts, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        pb_grpc.add_GenerationServicer_to_server(
            GenerationServicer(config, self.tokenizer, self.pool, self.placer), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Generation"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        self.address = f"{config.host}:{self.port}"

    def start(self) -> RouterServer:
        self.directory.start()
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("scission.v1.Generation", health_pb2.HealthCheckResponse.SERVING)
        logger.info("router serving scission.v1.Generation on %s", self.address)
        return self

    def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=2).wait()
        self.directory.close()
        self.pool.close()
