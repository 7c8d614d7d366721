"""Request and sampling types shared by every worker.

``Request`` follows vLLM v1's ``Request``: prompt and output token ids, the number of
tokens whose KV is already in the cache, and the request's ``block_table``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from scission.engine.multimodal import MMInput


class InvalidRequestError(ValueError):
    """Bad input at the edge; ``field`` names the offending field. Maps to INVALID_ARGUMENT."""

    def __init__(self, field_name: str, message: str, out_of_range: bool = False) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.out_of_range = out_of_range  # True -> gRPC OUT_OF_RANGE


class DuplicateRequestError(ValueError):
    """A request_id that is already running, streaming or held on this worker. The existing
    request is left as it was. Maps to ALREADY_EXISTS."""


class RequestStatus(enum.IntEnum):
    """Ordered: every status >= FINISHED_STOPPED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``top_k <= 0`` disables top-k.

    ``seed`` makes sampling reproducible: token ``i`` is drawn with a generator seeded from
    ``(seed, i)``, so the same request gives the same tokens on any worker, batch or preemption.

    Raises:
        InvalidRequestError: on a value out of range (the field is named).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise InvalidRequestError("temperature", f"must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    """One generation request inside an engine.

    Token ranges (``num_tokens = num_prompt_tokens + len(output_token_ids)``)::

        |<------------- all_token_ids ------------->|
        |<-- num_computed_tokens -->|<- to compute ->|
        KV in block_table           not yet in cache
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_s: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    hold_kv_after_prefill: bool = False  # prefill role: keep blocks pinned for a KV pull
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    mm_inputs: tuple[MMInput, ...] = ()  # images, by segment offset (engine/multimodal.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)
