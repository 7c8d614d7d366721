"""The public gRPC server: ``scission.v1.Generation`` plus health checking and reflection."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scission.engine.loader import read_vlm_config, vlm_architecture
from scission.engine.mm_processor import MultimodalProcessor
from scission.engine.request import InvalidRequestError
from scission.engine.tokenizer import Tokenizer, default_model_path, load_tokenizer
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_retry import retry_etcd
from scission.registry.kv_index import EMBEDDING_DIR
from scission.registry.kv_index_watch import KVIndexWatcher
from scission.registry.signing import record_key
from scission.registry.slo_publisher import SloPublisher
from scission.registry.workers import connect
from scission.router import auth, flows
from scission.router.admission import Admission, OverCapacityError
from scission.router.config import RouterConfig
from scission.router.convert import ValidatedRequest, parse_generate_request, validate
from scission.router.encode_step import EncodeStep
from scission.router.errors import RequestRejected
from scission.router.http_api import HttpSecurity, HttpServer, served_model_name
from scission.router.metrics import RouterMetrics
from scission.router.outcome import Outcome
from scission.router.placement import NoWorkersError, Placement, Placer, place_or_wait
from scission.router.prefix_index import PrefixIndex, PromptBlocks, PromptHasher
from scission.router.slo import SloTracker
from scission.router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)
MAX_PLACEMENT_ATTEMPTS = 4  # retries before streaming + migrations after, in all
SUSPECT_S = 10.0  # a failed worker gets no traffic for this long (or until it leaves etcd)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, pool: WorkerPool,
                 placer: Placer, index: PrefixIndex, hasher: PromptHasher,
                 metrics: RouterMetrics, slo: SloTracker, admission: Admission,
                 model_name: str = "", encode_step: EncodeStep | None = None) -> None:
        """``model_name``: the served model's id, named in refusals. ``encode_step``: set
        when the model takes images in chat input (None: such a request is refused
        INVALID_ARGUMENT before any image is decoded)."""
        self.config = config
        self.model_name = model_name
        self.encode_step = encode_step
        self.accepts_images = encode_step is not None
        self.image_limits = config.image_limits
        self.admission = admission
        self.tokenizer = tokenizer
        self.pool = pool
        self.placer = placer
        self.index = index
        self.hasher = hasher
        self.metrics = metrics
        self.slo = slo
        self.context_len = tokenizer.context_length or 2048
        self.draining = False  # set on `scission down`: new requests are refused

    def Generate(self, request: pb.GenerateRequest, context):
        """The gRPC door: ``generate`` with a refusal mapped to a status (over capacity also
        gets ``retry-after`` trailing metadata, in seconds)."""
        try:
            yield from self.generate(request)
        except RequestRejected as e:
            if e.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
            context.abort(e.code, e.message)

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        """Validate, admit, place and stream one request; the path both doors share.

        Raises ``RequestRejected`` (bad input, over capacity, no workers, a worker failure).
        Closing the generator cancels the request (its worker calls are cancelled and held
        KV released)."""
        start_s = time.monotonic()
        outcome = Outcome()
        ticket = None
        try:
            if self.draining:
                _reject(outcome, grpc.StatusCode.UNAVAILABLE, "router is shutting down "
                        "(scission down): not accepting new requests")
            cfg = self.config
            try:
                vr = validate(request, self.tokenizer, self.context_len, cfg.default_max_tokens,
                              cfg.max_tokens_limit, cfg.max_prompt_tokens,
                              accepts_images=self.accepts_images, model_name=self.model_name,
                              image_limits=self.image_limits)
            except InvalidRequestError as e:
                code = grpc.StatusCode.OUT_OF_RANGE if e.out_of_range else \
                    grpc.StatusCode.INVALID_ARGUMENT
                _reject(outcome, code, str(e), e.field)
            if vr.images:
                vr = self._encode(vr, outcome)
            try:
                ticket = self.admission.admit(len(vr.prompt_token_ids))
            except OverCapacityError as e:
                _reject(outcome, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                        retry_after_s=cfg.retry_after_s)
            for resp in self._serve(vr, start_s, outcome):
                if resp.token_ids:
                    ticket.first_token()
                yield resp
        finally:
            if outcome.image_pins:  # pins the prefill did not consume (no-op once pulled)
                self.encode_step.release_pins(outcome.image_pins)
            if ticket is not None:
                ticket.release()
            self.metrics.observe_request(outcome.status, outcome.prompt_tokens,
                                         outcome.cached_tokens)
            if outcome.valid:
                self._observe_slo(vr.request_id, outcome, start_s)

    def _observe_slo(self, request_id: str, outcome: Outcome, start_s: float) -> None:
        """Windowed SLO aggregates + latency histograms (a request that was never placed
        arrives now, in the cluster scope only)."""
        if outcome.placed_s is None:
            self.slo.arrive(start_s, (), outcome.num_prompt_tokens, outcome.max_tokens)
        record = outcome.record(start_s, time.monotonic())
        ttft_ok, tpot_ok = self.slo.finish(record)
        self.metrics.observe_latencies(record)
        logger.debug("request %s: %s, SLO met ttft=%s tpot=%s", request_id, record, ttft_ok,
                     tpot_ok)

    def _serve(self, vr: ValidatedRequest, start_s: float,
               outcome: Outcome) -> Iterator[pb.GenerateResponse]:
        """Place and run. A worker that fails before anything streamed is retried elsewhere;
        one that dies mid-stream has its request migrated: another decode-capable worker
        recomputes prompt + streamed tokens and continues (DESIGN: fault model)."""
        outcome.valid, outcome.num_prompt_tokens = True, len(vr.prompt_token_ids)
        outcome.max_tokens = vr.params.max_tokens
        t0 = time.perf_counter()
        prompt = self.hasher(vr.prompt_token_ids, _segments(vr)) if self.placer.cfg.kv_aware \
            else PromptBlocks(0, [])
        hash_s = time.perf_counter() - t0
        streamed: list[int] = []
        base_id = vr.request_id
        for attempt in range(MAX_PLACEMENT_ATTEMPTS):
            resume = flows.Resume(tuple(streamed), outcome.first_token_s or 0.0,
                                  outcome.prefill.worker_id if outcome.prefill else "") \
                if streamed else None
            if attempt:  # a fresh internal id per try: a worker refuses an id it still
                # holds (ALREADY_EXISTS), e.g. the failed try's request not yet aborted there
                vr = dataclasses.replace(vr, request_id=f"{base_id}-{attempt}")
            if attempt and vr.images:  # the last try's pins were consumed or released
                vr = self._encode(vr, outcome)
            placement = self._migrate(outcome) if resume else \
                self._place(vr, prompt, outcome, hash_s if attempt == 0 else 0)
            self._placed(placement, outcome, start_s, first=resume is None)
            try:
                for resp in self._run(vr, placement, start_s, resume):
                    if resp.token_ids:  # O(1) per chunk: the SLO record's timings
                        outcome.last_token_s = time.monotonic()
                        if outcome.first_token_s is None:
                            outcome.first_token_s = outcome.last_token_s
                        outcome.num_output_tokens += len(resp.token_ids)
                    streamed.extend(resp.token_ids)
                    if resp.HasField("usage"):
                        outcome.status = "ok"
                        outcome.prompt_tokens = resp.usage.prompt_tokens
                        outcome.cached_tokens = resp.usage.cached_tokens
                        outcome.usage = resp.usage
                    yield resp
                return
            except flows.FlowError as e:
                if e.failed_worker is None or attempt + 1 == MAX_PLACEMENT_ATTEMPTS:
                    _reject(outcome, e.code, str(e))
                if e.failed_worker:
                    self.pool.mark_suspect(e.failed_worker, SUSPECT_S)
                if streamed:
                    logger.warning("request %s: worker %s failed after %d tokens; migrating",
                                   vr.request_id, e.failed_worker, len(streamed))

    def _placed(self, placement: Placement, outcome: Outcome, start_s: float,
                first: bool) -> None:
        """Note where the request runs; the first placement counts its arrival per pool."""
        if first:  # not a migration: this placement's worker runs the prompt
            outcome.prefill = placement.prefill_worker
        outcome.decode = placement.decode
        if outcome.placed_s is None:
            outcome.placed_s = time.monotonic()
            self.slo.arrive(start_s, {placement.prefill_worker.role, placement.decode.role},
                            outcome.num_prompt_tokens, outcome.max_tokens)

    def _encode(self, vr: ValidatedRequest, outcome: Outcome) -> ValidatedRequest:
        """The encode step (``router/encode_step.py``) with its refusals mapped; the built
        prompt gets the length checks text prompts got in ``validate``."""
        if outcome.image_pins:
            self.encode_step.release_pins(outcome.image_pins)
            outcome.image_pins = ()
        try:
            vr = self.encode_step.prepare(vr)
        except InvalidRequestError as e:
            _reject(outcome, grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        except NoWorkersError as e:
            _reject(outcome, grpc.StatusCode.UNAVAILABLE, str(e))
        except grpc.RpcError as e:
            _reject(outcome, e.code(), f"encoding images failed: {e.details()}")
        outcome.image_pins = vr.image_pins
        self.metrics.images.labels("hit").inc(vr.num_cached_images)
        self.metrics.images.labels("miss").inc(len(vr.images) - vr.num_cached_images)
        limit = min(self.config.max_prompt_tokens or self.context_len, self.context_len)
        n = len(vr.prompt_token_ids)
        if n > limit or n + vr.params.max_tokens > self.context_len:
            _reject(outcome, grpc.StatusCode.OUT_OF_RANGE, f"prompt with its images has {n} "
                    f"tokens; limit {limit}, and with max_tokens ({vr.params.max_tokens}) at "
                    f"most the context length {self.context_len}", "input")
        return vr

    def _migrate(self, outcome: Outcome) -> Placement:
        try:
            return self.placer.place_decode()
        except NoWorkersError as e:
            _reject(outcome, grpc.StatusCode.UNAVAILABLE, str(e))

    def _place(self, vr: ValidatedRequest, prompt: PromptBlocks, outcome: Outcome,
               hash_s: float) -> Placement:
        """Placement plus a speculative index entry for the worker that will prefill; records
        the decision time (``hash_s`` spent hashing the prompt + this)."""
        t0, cfg = time.perf_counter() - hash_s, self.config
        gone = self.pool.last_removed_s  # workers that left recently are re-registering
        wait_s = cfg.no_workers_wait_s if gone is not None and \
            time.monotonic() - gone < cfg.no_workers_gap_window_s else 0.0
        try:
            placement = place_or_wait(self.placer, len(vr.prompt_token_ids),
                                      prompt.block_hashes, prompt.block_size, wait_s)
        except NoWorkersError as e:
            _reject(outcome, grpc.StatusCode.UNAVAILABLE, str(e))
        self.index.insert_speculative(placement.prefill_worker.worker_id, prompt.block_hashes)
        self.metrics.decision_s.observe(time.perf_counter() - t0)
        return placement

    def _run(self, vr, placement, start_s: float, resume: flows.Resume | None):
        cfg = self.config
        if placement.disaggregated and resume is None:
            return flows.run_disaggregated(vr, placement, self.pool, start_s,
                                           cfg.prefill_timeout_s, cfg.request_timeout_s,
                                           self.placer.place_decode)
        return flows.run_local(vr, placement, self.pool, start_s, cfg.request_timeout_s, resume)


def _reject(outcome: Outcome, code: grpc.StatusCode, message: str, param: str | None = None,
            retry_after_s: int | None = None) -> NoReturn:
    """Record the status and end the request."""
    outcome.status = code.name.lower()
    raise RequestRejected(code, message, param, retry_after_s)


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


def _segments(vr: ValidatedRequest) -> list[tuple[int, int, bytes]]:
    """``(offset, length, image_hash)`` of the prompt's image segments (block hash keys)."""
    return [(r.offset, r.length, r.image_hash) for r in vr.image_refs]
