"""How one request ended, for the router's metrics and SLO windows."""

from __future__ import annotations

from dataclasses import dataclass

from scission.proto.scission.v1 import generation_pb2 as pb
from scission.registry.workers import WorkerInfo
from scission.router.slo import RequestRecord


@dataclass
class Outcome:
    """How one request ended, for the metrics (set as the request goes; times are
    ``time.monotonic()``)."""

    status: str = "cancelled"  # the client went away unless something else is recorded
    prompt_tokens: int = 0  # from the final Usage (ok requests only)
    cached_tokens: int = 0
    valid: bool = False  # passed validation: counts in the SLO windows
    num_prompt_tokens: int = 0
    max_tokens: int = 0  # requested (the planner's load shape reads it at arrival)
    num_output_tokens: int = 0  # streamed to the client
    placed_s: float | None = None  # first placement
    first_token_s: float | None = None
    last_token_s: float | None = None
    prefill: WorkerInfo | None = None  # the worker that ran the prompt (last placement)
    decode: WorkerInfo | None = None  # the worker that streamed last
    usage: pb.Usage | None = None  # the final chunk's
    image_pins: tuple = ()  # embedding pins of the latest encode step (released at the end)

    def record(self, start_s: float, end_s: float) -> RequestRecord:
        """The SLO record: TTFT / TPOT / E2E as in the client's Usage when it got one."""
        n, first, u = self.num_output_tokens, self.first_token_s, self.usage
        if u is not None:
            ttft_ms, e2e_ms = u.ttft_ms, u.e2e_ms
        else:
            ttft_ms = None if first is None else (first - start_s) * 1e3
            e2e_ms = (end_s - start_s) * 1e3
        tpot_ms = itl_ms = None
        if n > 1 and ttft_ms is not None and first is not None and self.last_token_s is not None:
            tpot_ms = u.tpot_ms if u is not None else (e2e_ms - ttft_ms) / (n - 1)
            itl_ms = (self.last_token_s - first) * 1e3 / (n - 1)
        pre, dec = self.prefill, self.decode
        return RequestRecord(
            status=self.status, num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=n,
            e2e_ms=e2e_ms, ttft_ms=ttft_ms, tpot_ms=tpot_ms, itl_ms=itl_ms,
            queue_ms=None if self.placed_s is None else (self.placed_s - start_s) * 1e3,
            prefill_worker=pre.worker_id if pre else "", prefill_role=pre.role if pre else None,
            decode_worker=dec.worker_id if dec else "", decode_role=dec.role if dec else None)
