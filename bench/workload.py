"""Workloads: the requests of a benchmark with their prompts, built once and replayable.

A ``Workload`` is independent of the cluster it runs against, so a side-by-side comparison sends
the same prompts (and, with the same ``ArrivalConfig``, the same send times) to each cluster.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scission.bench.prompts import PromptBuilder
from scission.bench.traces import TraceKind, TraceRequest, TraceScaling, read_trace, scale_trace

logger = logging.getLogger(__name__)


class WorkloadKind(enum.Enum):
    SYNTHETIC = "synthetic"
    AZURE_CONV = "azure-conv"
    MOONCAKE_CONV = "mooncake-conv"
    MOONCAKE_SYNTHETIC = "mooncake-synthetic"

    @property
    def trace_kind(self) -> TraceKind | None:
        return None if self is WorkloadKind.SYNTHETIC else TraceKind(self.value)


class LengthDist(enum.Enum):
    FIXED = "fixed"  # always `mean_tokens`
    UNIFORM = "uniform"  # integers in [mean - spread, mean + spread]
    NORMAL = "normal"  # round(N(mean, spread)), clipped to >= 1


@dataclass(frozen=True)
class LengthConfig:
    """Distribution of a length in tokens; samples are clipped to ``>= 1``."""

    mean_tokens: int
    dist: LengthDist = LengthDist.FIXED
    spread_tokens: int = 0  # UNIFORM: half-width; NORMAL: standard deviation

    def __post_init__(self) -> None:
        if self.mean_tokens < 1 or self.spread_tokens < 0:
            raise ValueError(f"need mean >= 1 and spread >= 0, got {self}")

    def sample(self, num: int, rng: np.random.Generator) -> list[int]:
        match self.dist:
            case LengthDist.FIXED:
                values = np.full(num, self.mean_tokens)
            case LengthDist.UNIFORM:
                lo, hi = (
                    self.mean_tokens - self.spread_tokens,
                    self.mean_tokens + self.spread_tokens,
                )
                values = rng.integers(lo, hi, size=num, endpoint=True)
            case LengthDist.NORMAL:
                values = np.rint(rng.normal(self.mean_tokens, self.spread_tokens, size=num))
        return np.maximum(values, 1).astype(np.int64).tolist()


def synthetic_requests(
    num_requests: int, input_len: LengthConfig, output_len: LengthConfig, seed: int = 0
) -> list[TraceRequest]:
    """``num_requests`` requests with sampled lengths (arrival 0; arrivals come separately)."""
    rng = np.random.default_rng(seed)
    inputs = input_len.sample(num_requests, rng)
    outputs = output_len.sample(num_requests, rng)
    return [
        TraceRequest(arrival_s=0.0, input_tokens=i, output_tokens=o)
        for i, o in zip(inputs, outputs, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image of a chat request: encoded bytes (PNG/JPEG...) and their MIME type."""

    data: bytes
    mime_type: str


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """A token-id prompt, or (with ``images``) one user chat message: ``text`` then the
    images, as content parts; ``prompt_token_ids`` is then empty (the router tokenizes)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: int  # sent as max_tokens with ignore_eos
    arrival_s: float  # the trace's (scaled) arrival; used by ArrivalKind.TRACE
    text: str = ""
    images: tuple[ImagePart, ...] = ()

    @property
    def is_chat(self) -> bool:
        return bool(self.images)


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[WorkloadRequest, ...]

    @property
    def arrivals_s(self) -> list[float]:
        return [r.arrival_s for r in self.requests]


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. Traces use ``num_requests`` as a limit (first N rows; None = all rows)."""

    kind: WorkloadKind = WorkloadKind.SYNTHETIC
    num_requests: int | None = 200
    input_len: LengthConfig = LengthConfig(512)
    output_len: LengthConfig = LengthConfig(128)
    scaling: TraceScaling = TraceScaling()
    trace_dir: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.num_requests is None and self.kind is WorkloadKind.SYNTHETIC:
            raise ValueError("a synthetic workload needs num_requests")


def workload_requests(config: WorkloadConfig) -> list[TraceRequest]:
    """Lengths and arrivals (no prompts yet), scaled to the context window."""
    trace_kind = config.kind.trace_kind
    if trace_kind is None:
        assert config.num_requests is not None, "checked in WorkloadConfig"
        requests = synthetic_requests(
            config.num_requests, config.input_len, config.output_len, config.seed
        )
    else:
        requests = read_trace(trace_kind, config.trace_dir, config.num_requests)
    return scale_trace(requests, config.scaling)


def build_workload(
    config: WorkloadConfig, builder: PromptBuilder, request_id_prefix: str = "bench"
) -> Workload:
    """Requests with real-text prompts of their exact lengths (see ``scission.bench.prompts``)."""
    requests = []
    for index, r in enumerate(workload_requests(config)):
        ids = builder.prompt(r.input_tokens, index, r.prefix_hash_ids, r.hash_block_tokens)
        requests.append(
            WorkloadRequest(
                request_id=f"{request_id_prefix}-{index}",
                prompt_token_ids=tuple(ids),
                output_tokens=r.output_tokens,
                arrival_s=r.arrival_s,
            )
        )
    logger.info(
        "workload %s: %d requests, %d prompt tokens, %d output tokens",
        config.kind.value,
        len(requests),
        sum(len(r.prompt_token_ids) for r in requests),
        sum(r.output_tokens for r in requests),
    )
    return Workload(name=config.kind.value, requests=tuple(requests))
