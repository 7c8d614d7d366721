"""``scission.v1.Generation``: one request from validation through placement, the worker
calls (flows) and retries to the streamed response."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import NoReturn

import grpc

from scission.engine.request import InvalidRequestError
from scission.engine.tokenizer import Tokenizer
from scission.proto.scission.v1 import generation_pb2 as pb
from scission.proto.scission.v1 import generation_pb2_grpc as pb_grpc
from scission.router import flows
from scission.router.admission import Admission, OverCapacityError
from scission.router.config import RouterConfig
from scission.router.convert import ValidatedRequest, validate
from scission.router.encode_step import EncodeStep
from scission.router.errors import RequestRejected
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
        """Placement plus speculative index entries for the workers that will hold the prompt's
        KV (prefill and decode); records the decision time (``hash_s`` hashing + this)."""
        t0, cfg = time.perf_counter() - hash_s, self.config
        gone = self.pool.last_removed_s  # workers that left recently are re-registering
        wait_s = cfg.no_workers_wait_s if gone is not None and \
            time.monotonic() - gone < cfg.no_workers_gap_window_s else 0.0
        try:
            placement = place_or_wait(self.placer, len(vr.prompt_token_ids),
                                      prompt.block_hashes, prompt.block_size, wait_s)
        except NoWorkersError as e:
            _reject(outcome, grpc.StatusCode.UNAVAILABLE, str(e))
        for worker in {placement.prefill_worker.worker_id, placement.decode.worker_id}:
            self.index.insert_speculative(worker, prompt.block_hashes)
        self.metrics.decision_s.observe(time.perf_counter() - t0)
        return placement

    def _run(self, vr, placement, start_s: float, resume: flows.Resume | None):
        cfg = self.config
        if placement.disaggregated and resume is None:
            return flows.run_disaggregated(vr, placement, self.pool, start_s,
                                           cfg.prefill_timeout_s, cfg.request_timeout_s,
                                           self.placer.place_decode, cfg.kv_pipelining)
        return flows.run_local(vr, placement, self.pool, start_s, cfg.request_timeout_s, resume)


def _reject(outcome: Outcome, code: grpc.StatusCode, message: str, param: str | None = None,
            retry_after_s: int | None = None) -> NoReturn:
    """Record the status and end the request."""
    outcome.status = code.name.lower()
    raise RequestRejected(code, message, param, retry_after_s)


def _segments(vr: ValidatedRequest) -> list[tuple[int, int, bytes]]:
    """``(offset, length, image_hash)`` of the prompt's image segments (block hash keys)."""
    return [(r.offset, r.length, r.image_hash) for r in vr.image_refs]
