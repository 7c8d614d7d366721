"""The model executor every worker runs: ``step() = schedule() -> execute() -> update()``.

Single-threaded by design; ``engine_loop.EngineLoop`` drives it from a thread and feeds it
requests from gRPC handlers. Roles use it differently:

- colocated: ``add_request`` and step until finished (chunked prefill mixed with decode);
- prefill: ``add_request(hold_kv=True)``; after the first token the request finishes but
  its blocks stay pinned in ``held`` until ``release`` (a decode worker pulled them);
- decode: ``reserve_prompt_blocks`` for the prompt (a prefix already cached here is
  referenced, not pulled), the rest of the KV arrives over NIXL, then
  ``add_prefilled_request`` joins the running batch without running the prompt.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scission.engine.attention import TorchAttentionBackend
from scission.engine.block_hash import hash_seed
from scission.engine.block_manager import BlockManager
from scission.engine.config import AttentionBackendKind, EngineConfig
from scission.engine.dense_linear import pack_dense_linears
from scission.engine.detokenizer import IncrementalDetokenizer
from scission.engine.kv_cache import KVCache, num_blocks_for
from scission.engine.kv_events import KVEvent
from scission.engine.loader import load_checkpoint
from scission.engine.model import LlamaForCausalLM
from scission.engine.model_runner import ModelRunner
from scission.engine.multimodal import MMInput
from scission.engine.quant import quantize_model
from scission.engine.request import (
    DuplicateRequestError,
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
)
from scission.engine.scheduler import Scheduler
from scission.engine.step_metrics import StepRecorder, StepShape
from scission.engine.tokenizer import Tokenizer, default_model_path, load_tokenizer
from scission.engine.vision_loader import load_vision

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str
    finish_reason: FinishReason | None
    num_cached_tokens: int
    num_prompt_tokens: int


def make_attention_backend(kind: AttentionBackendKind, device: str):
    """torch on CPU; Triton on CUDA or when forced (e.g. TRITON_INTERPRET=1 tests)."""
    if kind == AttentionBackendKind.TRITON or (kind == AttentionBackendKind.AUTO
                                               and device.startswith("cuda")):
        from scission.engine.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    return TorchAttentionBackend()


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_path = config.model_path or default_model_path()
        model_cfg, state = load_checkpoint(self.model_path)
        self.model_config = model_cfg
        self.model = LlamaForCausalLM(model_cfg, config.torch_dtype).to(config.device)
        self.model.load_hf_state_dict(state)
        del state
        if config.weight_quantization != "none":
            mode = config.weight_quantization
            read_bytes = quantize_model(self.model, mode)
            # Quantized KV differs from the float model's: never share prefix-cache entries.
            model_cfg = dataclasses.replace(model_cfg, model_id=f"{model_cfg.model_id}+{mode}")
            self.model_config = model_cfg
            logger.info("%s quantization: a decode step reads %.0f MB of linear weights",
                        mode, read_bytes / 1e6)
        if config.linear_backend != "torch":
            packed = pack_dense_linears(self.model)
            if config.linear_backend == "onednn" and packed == 0 \
                    and config.weight_quantization == "none":
                raise ValueError(f"linear_backend onednn: no oneDNN linear for "
                                 f"{config.dtype} on {config.device}; --linear-backend "
                                 f"auto uses torch's F.linear where oneDNN has no path")
        # Vision-language checkpoints: the vision tower + connector and the HF processor.
        vision = load_vision(self.model_path, config.torch_dtype)
        self.vision_encoder, self.mm_processor = vision if vision is not None else (None, None)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_path)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | set(model_cfg.eos_token_ids)
        self.max_model_len = model_cfg.max_position_embeddings
        cache = config.cache
        num_blocks = num_blocks_for(model_cfg, cache, config.torch_dtype)
        self.kv_cache = KVCache(model_cfg, num_blocks, cache.block_size, config.torch_dtype,
                                config.device, cache.kv_layout)
        self.block_manager = BlockManager(num_blocks, cache.block_size,
                                          hash_seed(model_cfg.model_id), cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        attn = make_attention_backend(config.attention_backend, config.device)
        self.runner = ModelRunner(self.model, self.kv_cache, attn)
        if config.native_decode and config.weight_quantization == "w4a8":
            from scission.engine.native_decode import enable_native_decode

            if enable_native_decode(self.model, self.kv_cache) is not None \
                    and isinstance(attn, TorchAttentionBackend):
                attn.native_prefill = True  # prefill chunks' attention in C as well
        if not config.enforce_eager:  # graph mode: compile now, not on the first request
            from scission.engine.compile import enable_graph_mode

            # after native decode: with it on, text steps never reach the graphs
            enable_graph_mode(self.model, self.kv_cache, attn)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # prefill role: finished, blocks pinned
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (all time)
        self.step_metrics = StepRecorder()  # forward-pass metrics, one sample per step

    # -- request intake -------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    hold_kv: bool = False, mm_inputs: Sequence[MMInput] = ()) -> Request:
        """Queue a prompt; ``mm_inputs`` (with embeddings) for its images.

        Raises:
            DuplicateRequestError: the id is running or held here (nothing changes).
            ValueError: an image segment outside the prompt / without embeddings (callers
                validate lengths).
        """
        req = Request(request_id, list(prompt_token_ids), params, hold_kv_after_prefill=hold_kv,
                      mm_inputs=_checked_mm_inputs(mm_inputs, len(prompt_token_ids), True))
        self._register(req)
        self.scheduler.add_request(req)
        return req

    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Decode role: allocate blocks for ``num_tokens`` prompt tokens (None = no room)."""
        table: list[int] = []
        if self.block_manager.allocate(request_id, table, num_tokens) is None:
            return None
        return table

    def reserve_prompt_blocks(self, request_id: str, prompt_token_ids: list[int],
                              mm_inputs: Sequence[MMInput] = ()) -> tuple[list[int], int] | None:
        """Decode role: blocks for a prompt whose KV is pulled from a prefill worker. The
        longest prefix of full blocks this worker's prefix cache already holds is taken from
        it (referenced, not copied); only the blocks after it need pulling.

        Returns:
            ``(block_table, num_cached_blocks)``: ``block_table[:num_cached_blocks]`` already
            hold the prompt's KV; None = not enough free blocks (nothing changes).
        """
        bs = self.kv_cache.block_size
        prefix = self.block_manager.cached_prefix(prompt_token_ids, mm_inputs,
                                                  max_blocks=len(prompt_token_ids) // bs)
        table: list[int] = []
        if self.block_manager.allocate(request_id, table, len(prompt_token_ids),
                                       prefix) is None:
            return None
        return table, len(prefix)

    def free_reserved(self, request_id: str, block_ids: list[int]) -> None:
        self.block_manager.free(request_id, list(block_ids))

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int],
                              first_token_id: int, params: SamplingParams,
                              block_ids: list[int], num_cached_tokens: int = 0,
                              mm_inputs: Sequence[MMInput] = ()) -> Request:
        """Decode role: the prompt's KV is already in ``block_ids``; decode from the first token.
        ``mm_inputs`` only key the prompt's blocks (their embeddings may be ``None``)."""
        req = Request(request_id, list(prompt_token_ids), params, block_table=list(block_ids),
                      num_computed_tokens=len(prompt_token_ids), num_cached_tokens=num_cached_tokens,
                      mm_inputs=_checked_mm_inputs(mm_inputs, len(prompt_token_ids), False))
        self._register(req)
        self.block_manager.cache_full_blocks(request_id, req.block_table, req.prompt_token_ids,
                                             req.num_computed_tokens, req.mm_inputs)
        self._detok[request_id].push([first_token_id])
        req.output_token_ids.append(first_token_id)
        self.scheduler.add_request(req)
        return req

    def add_recompute_request(self, request_id: str, prompt_token_ids: list[int],
                              output_token_ids: list[int], params: SamplingParams,
                              mm_inputs: Sequence[MMInput] = ()) -> Request:
        """Continue a request whose KV is elsewhere or lost (failed pull, migration off a dead
        worker): recompute prompt + ``output_token_ids`` here, then keep decoding. Seeded
        sampling continues at output position ``len(output_token_ids)``, so the tokens are the
        ones the request would have produced anyway."""
        req = Request(request_id, list(prompt_token_ids), params,
                      mm_inputs=_checked_mm_inputs(mm_inputs, len(prompt_token_ids), True))
        self._register(req)
        self._detok[request_id].push(list(output_token_ids))
        req.output_token_ids.extend(output_token_ids)
        self.scheduler.add_request(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. Returns False if unknown."""
        if self.release(request_id):
            return True
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._detok.pop(request_id, None)
        return True

    def release(self, request_id: str) -> bool:
        """Prefill role: unpin a held request's blocks (after the pull, or on timeout)."""
        req = self.held.pop(request_id, None)
        if req is None:
            return False
        self.block_manager.free(request_id, req.block_table)
        return True

    # -- the loop -------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        start_s = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        shape = StepShape.of(sched)  # before _update advances num_computed_tokens
        sampled = self.runner.execute(sched)
        outputs = self._update(sched, sampled)
        self.step_metrics.record(shape, (time.perf_counter() - start_s) * 1e3,
                                 len(self.scheduler.running), len(self.scheduler.waiting),
                                 self.kv_usage)
        return outputs

    def _update(self, sched, sampled: dict[str, int]) -> list[RequestOutput]:
        outputs = []
        for req, n in sched.scheduled:
            prompt_left = max(req.num_prompt_tokens - req.num_computed_tokens, 0)
            self.num_prompt_tokens_computed += min(n, prompt_left)
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req.request_id, req.block_table,
                                                 req.all_token_ids, req.num_computed_tokens,
                                                 req.mm_inputs)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            out = self._detok[req.request_id].push([token])
            status = self._check_stop(req, token, out.stopped_on)
            text = out.text_delta
            if status is not None:
                text += "" if out.stopped_on else self._detok[req.request_id].finish()
                self._finish(req, status)
            elif req.hold_kv_after_prefill:  # prefill role: pin the KV for the decode pull
                self._hold(req)
            outputs.append(RequestOutput(req.request_id, (token,), text, req.finish_reason,
                                         req.num_cached_tokens, req.num_prompt_tokens))
        return outputs

    def _check_stop(self, req: Request, token: int, stopped_on: str | None) -> RequestStatus | None:
        p = req.sampling_params
        if stopped_on is not None or token in p.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if not p.ignore_eos and token in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)

    def _hold(self, req: Request) -> None:
        """Leave the batch but keep the blocks; ``finish_reason`` stays None (decode continues)."""
        self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED, keep_blocks=True)
        req.status = RequestStatus.RUNNING  # not finished for the caller: decode goes on
        self.held[req.request_id] = req
        self.requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)

    def knows(self, request_id: str) -> bool:
        """The id is running, waiting or held here (another request may not take it)."""
        return request_id in self.requests or request_id in self.held

    def _register(self, req: Request) -> None:
        if self.knows(req.request_id):
            raise DuplicateRequestError(f"request_id {req.request_id!r} is already in use "
                                        "on this worker")
        self.requests[req.request_id] = req
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, stop=req.sampling_params.stop)

    # -- introspection --------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        """KV cache events since the last call (``BlockManager.take_events``), for the global
        KV-block index; call on the engine's thread."""
        return self.block_manager.take_events()

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks not free (0..1); cached-but-free blocks count as free."""
        num_blocks = self.kv_cache.num_blocks
        return 1.0 - self.block_manager.num_free_blocks / num_blocks if num_blocks else 0.0

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed; safe from other threads (copies the queues first:
        iterating a deque the loop thread appends to raises)."""
        waiting, running = list(self.scheduler.waiting), list(self.scheduler.running)
        return sum(r.num_tokens_to_compute for r in waiting) + sum(
            r.num_tokens_to_compute for r in running if r.num_tokens_to_compute > 1)


def _checked_mm_inputs(mm_inputs: Sequence[MMInput], num_prompt_tokens: int,
                       need_embeddings: bool) -> tuple[MMInput, ...]:
    """Sorted by offset; raises ValueError on a segment past the prompt, overlapping segments
    or (where the prompt is computed here) missing embeddings."""
    ordered = tuple(sorted(mm_inputs, key=lambda m: m.offset))
    end = 0
    for mm in ordered:
        if mm.offset < end or mm.end > num_prompt_tokens:
            raise ValueError(f"image segment [{mm.offset}, {mm.end}) overlaps another or "
                             f"leaves the prompt ({num_prompt_tokens} tokens)")
        if need_embeddings and mm.embeddings is None:
            raise ValueError(f"image segment at {mm.offset} has no embeddings")
        end = mm.end
    return ordered
