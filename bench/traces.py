"""Readers for the public serving traces in ``../shared/traces`` and their scaling.

Formats (``shared/traces/README.md``):

- Azure LLM inference trace 2023, conversation (``AzureLLMInferenceTrace_conv.csv``): CSV with
  header ``TIMESTAMP,ContextTokens,GeneratedTokens``, CRLF line ends, no trailing newline;
  ``TIMESTAMP`` is absolute wall-clock time with 7 fractional digits (100 ns). Arrival times are
  made relative to the first row, exactly (integer 100 ns ticks).
- Mooncake FAST'25 (``conversation_trace.jsonl``, ``synthetic_trace.jsonl``): JSONL with
  ``timestamp`` (ms from 0), ``input_length``, ``output_length``, ``hash_ids`` (prefix-block ids of
  512 tokens; equal leading ids mean a shared prompt prefix).

Scaling rule (``scale_trace``), applied per request with ``s = length_scale``:

1. ``input = max(1, round(input * s))``, ``output = max(1, round(output * s))``, and the hash block
   size becomes ``max(1, round(512 * s))``.
2. Clip to the context window ``C``: ``output = min(output, C - 1)``, then
   ``input = min(input, C - output)``. Outputs are kept whole (they set the decode work); prompts
   lose their tail, which keeps every shared leading block intact.
3. ``hash_ids`` are cut to ``ceil(input / block)`` (the blocks the prompt still covers).
4. ``arrival_s *= time_scale`` (0.5 replays twice as fast).

``length_scale="auto"`` picks ``s = min(1, C / max(input + output))`` over the selected requests,
so that step 2 never clips and relative lengths and prefix structure are preserved.
"""

from __future__ import annotations

import calendar
import csv
import enum
import json
import logging
import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

logger = logging.getLogger(__name__)

MOONCAKE_BLOCK_TOKENS = 512
_TICKS_PER_S = 10_000_000  # Azure timestamps have 100 ns resolution


def default_trace_dir() -> Path:
    """``<checkout>/../shared/traces`` (the checkout is the parent of ``bench/``)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "traces"


class TraceKind(enum.Enum):
    AZURE_CONV = "azure-conv"
    MOONCAKE_CONV = "mooncake-conv"
    MOONCAKE_SYNTHETIC = "mooncake-synthetic"

    @property
    def file_name(self) -> str:
        return _FILE_NAMES[self]


_FILE_NAMES = {
    TraceKind.AZURE_CONV: "AzureLLMInferenceTrace_conv.csv",
    TraceKind.MOONCAKE_CONV: "conversation_trace.jsonl",
    TraceKind.MOONCAKE_SYNTHETIC: "synthetic_trace.jsonl",
}


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload: when it arrives and how long its prompt and output are.

    ``prefix_hash_ids[i]`` names the i-th block of ``hash_block_tokens`` prompt tokens; requests
    with equal leading ids share those prompt tokens. Empty (and block 0) when the trace has none.
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    prefix_hash_ids: tuple[int, ...] = ()
    hash_block_tokens: int = 0

    def __post_init__(self) -> None:
        assert self.input_tokens >= 1 and self.output_tokens >= 1, f"empty lengths: {self}"
        assert self.arrival_s >= 0, f"negative arrival: {self}"


def _azure_ticks(timestamp: str) -> int:
    """``'2023-11-16 18:15:46.6805900'`` -> integer 100 ns ticks since the epoch (as UTC)."""
    whole, _, fraction = timestamp.partition(".")
    seconds = calendar.timegm(datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timetuple())
    assert len(fraction) <= 7, f"more than 7 fractional digits: {timestamp!r}"
    return seconds * _TICKS_PER_S + int(fraction.ljust(7, "0"))


def read_azure_conv(path: Path, max_requests: int | None = None) -> list[TraceRequest]:
    """Read the Azure 2023 CSV; ``arrival_s`` is relative to the first row."""
    requests: list[TraceRequest] = []
    first_ticks: int | None = None
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"], header
        for row in reader:
            if max_requests is not None and len(requests) >= max_requests:
                break
            ticks = _azure_ticks(row[0])
            first_ticks = ticks if first_ticks is None else first_ticks
            requests.append(
                TraceRequest(
                    arrival_s=(ticks - first_ticks) / _TICKS_PER_S,
                    input_tokens=int(row[1]),
                    output_tokens=int(row[2]),
                )
            )
    return requests


def read_mooncake(path: Path, max_requests: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake JSONL trace; ``arrival_s = timestamp_ms / 1000`` relative to the first."""
    requests: list[TraceRequest] = []
    first_ms: float | None = None
    with path.open() as f:
        for line in f:
            if max_requests is not None and len(requests) >= max_requests:
                break
            row = json.loads(line)
            first_ms = row["timestamp"] if first_ms is None else first_ms
            requests.append(
                TraceRequest(
                    arrival_s=(row["timestamp"] - first_ms) / 1e3,
                    input_tokens=int(row["input_length"]),
                    output_tokens=int(row["output_length"]),
                    prefix_hash_ids=tuple(int(h) for h in row["hash_ids"]),
                    hash_block_tokens=MOONCAKE_BLOCK_TOKENS,
                )
            )
    return requests


def read_trace(
    kind: TraceKind, trace_dir: Path | None = None, max_requests: int | None = None
) -> list[TraceRequest]:
    """Read the first ``max_requests`` rows (all when None) of a trace file in ``trace_dir``."""
    path = (trace_dir or default_trace_dir()) / kind.file_name
    if kind is TraceKind.AZURE_CONV:
        return read_azure_conv(path, max_requests)
    return read_mooncake(path, max_requests)


@dataclass(frozen=True)
class TraceScaling:
    """How to fit a trace to a model and a time budget (rule in the module docstring).

    ``length_scale`` is a factor > 0, or None for "auto".
    """

    max_context_tokens: int = 8192
    length_scale: float | None = 1.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be >= 2, got {self.max_context_tokens}")
        if self.length_scale is not None and self.length_scale <= 0:
            raise ValueError(f"length_scale must be > 0, got {self.length_scale}")
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")


def auto_length_scale(requests: list[TraceRequest], max_context_tokens: int) -> float:
    """``min(1, C / max(input + output))``: the largest factor at which nothing is clipped."""
    longest = max((r.input_tokens + r.output_tokens for r in requests), default=1)
    return min(1.0, max_context_tokens / longest)


def scale_request(
    request: TraceRequest, length_scale: float, max_context_tokens: int, time_scale: float
) -> TraceRequest:
    """Apply the scaling rule of the module docstring to one request."""
    output_tokens = max(1, round(request.output_tokens * length_scale))
    input_tokens = max(1, round(request.input_tokens * length_scale))
    output_tokens = min(output_tokens, max_context_tokens - 1)
    input_tokens = min(input_tokens, max_context_tokens - output_tokens)
    block_tokens, hash_ids = 0, ()
    if request.prefix_hash_ids:
        block_tokens = max(1, round(request.hash_block_tokens * length_scale))
        hash_ids = request.prefix_hash_ids[: math.ceil(input_tokens / block_tokens)]
    return replace(
        request,
        arrival_s=request.arrival_s * time_scale,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        prefix_hash_ids=hash_ids,
        hash_block_tokens=block_tokens,
    )


def scale_trace(requests: list[TraceRequest], scaling: TraceScaling) -> list[TraceRequest]:
    """Scale lengths and times of every request; logs the factor used and how many were clipped."""
    length_scale = scaling.length_scale
    if length_scale is None:
        length_scale = auto_length_scale(requests, scaling.max_context_tokens)
    scaled = [
        scale_request(r, length_scale, scaling.max_context_tokens, scaling.time_scale)
        for r in requests
    ]
    num_clipped = sum(
        s.input_tokens < max(1, round(r.input_tokens * length_scale))
        for r, s in zip(requests, scaled, strict=True)
    )
    logger.info(
        "trace scaled: %d requests, length_scale %.4g, time_scale %.4g, %d prompts clipped to "
        "the %d-token context",
        len(scaled),
        length_scale,
        scaling.time_scale,
        num_clipped,
        scaling.max_context_tokens,
    )
    return scaled
