"""Workloads of the cluster simulator (``bench/simulator.py``): requests and report phases.

Two sources, both as a list of ``SimRequest`` sorted by arrival plus the ``Phase`` windows the
report is cut into:

- ``shifting_workload``: Poisson arrivals at ``rate_rps`` whose lengths alternate every
  ``phase_s`` between a prefill-heavy shape (long prompts, short outputs) and a decode-heavy one
  (short prompts, long outputs); each length is uniform within ``±jitter`` of the shape's mean.
- ``trace_workload``: a public trace (``bench/traces.py``) with lengths scaled by
  ``length_scale`` (clipped to the context) and times compressed so that its mean rate is
  ``rate_rps``; replayed from its start again (shifted by its span) when ``duration_s`` is
  longer than the compressed trace. Phases are consecutive ``phase_s`` windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scission.bench.traces import TraceKind, TraceScaling, read_trace, scale_trace


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request and what happened to it (seconds on the simulated clock; -1 = not yet)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    phase: int
    prefilled_tokens: int = 0  # prompt tokens computed so far (chunked prefill)
    first_token_s: float = -1.0
    finish_s: float = -1.0
    failed: bool = False  # no worker could take it
    decode_worker: object = None  # the ``ServingWorker`` chosen to stream its tokens
    prefill_worker: object = None  # the ``PrefillWorker`` (None: prefilled where it decodes)
    finish_step: int = 0  # decode: the serving worker's step index at which it finishes
    # Migration (a drain deadline evicted it): the tokens it had streamed are recomputed with
    # the prompt where it continues. ``work_*`` = what its current worker computes/generates:
    # prompt + carried, output − carried.
    carried_tokens: int = 0
    num_migrations: int = 0
    work_prompt_tokens: int = -1
    work_output_tokens: int = -1

    def __post_init__(self) -> None:
        self.work_prompt_tokens = self.prompt_tokens
        self.work_output_tokens = self.output_tokens

    def carry(self, num_streamed: int) -> None:
        """Evicted after streaming ``num_streamed`` more tokens: it restarts from its prompt
        plus every token streamed so far (``router.flows.Resume``)."""
        self.carried_tokens += num_streamed
        self.num_migrations += 1
        self.prefilled_tokens = 0
        self.work_prompt_tokens = self.prompt_tokens + self.carried_tokens
        self.work_output_tokens = self.output_tokens - self.carried_tokens
        assert self.work_output_tokens >= 1, "a migrated request has tokens left to generate"

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_s - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float:
        """``(E2E - TTFT) / (output - 1)``; 0 for one-token outputs (meets any TPOT SLO)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.finish_s - self.first_token_s) * 1e3 / (self.output_tokens - 1)


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Shape:
    """Mean lengths of one phase kind."""

    prompt_tokens: int
    output_tokens: int


PREFILL_HEAVY = Shape(prompt_tokens=768, output_tokens=24)
DECODE_HEAVY = Shape(prompt_tokens=96, output_tokens=320)


def _uniform(rng: np.random.Generator, mean: int, jitter: float, n: int) -> np.ndarray:
    lo, hi = max(1, round(mean * (1 - jitter))), max(1, round(mean * (1 + jitter)))
    return rng.integers(lo, hi + 1, n)


def shifting_workload(rate_rps: float, duration_s: float, phase_s: float, seed: int = 0,
                      shapes: tuple[Shape, Shape] = (PREFILL_HEAVY, DECODE_HEAVY),
                      jitter: float = 0.25) -> tuple[list[SimRequest], list[Phase]]:
    """Poisson arrivals; phase ``k`` (``[k·phase_s, (k+1)·phase_s)``) has shape ``k % 2``."""
    assert rate_rps > 0 and duration_s > 0 and phase_s > 0, "rate, duration, phase must be > 0"
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_rps, int(rate_rps * duration_s * 1.2) + 16)
    times = np.cumsum(gaps)
    times = times[times < duration_s]
    phase_idx = (times // phase_s).astype(np.int64)
    kinds = phase_idx % 2
    n = len(times)
    prompts = np.where(kinds == 0, _uniform(rng, shapes[0].prompt_tokens, jitter, n),
                       _uniform(rng, shapes[1].prompt_tokens, jitter, n))
    outputs = np.where(kinds == 0, _uniform(rng, shapes[0].output_tokens, jitter, n),
                       _uniform(rng, shapes[1].output_tokens, jitter, n))
    requests = [SimRequest(i, float(t), int(p), int(o), int(k)) for i, (t, p, o, k)
                in enumerate(zip(times, prompts, outputs, phase_idx, strict=True))]
    names = ("prefill-heavy", "decode-heavy")
    num_phases = math.ceil(duration_s / phase_s)
    phases = [Phase(f"{k}:{names[k % 2]}", k * phase_s, min((k + 1) * phase_s, duration_s))
              for k in range(num_phases)]
    return requests, phases


def trace_workload(kind: TraceKind, rate_rps: float, duration_s: float, phase_s: float,
                   length_scale: float, max_context_tokens: int,
                   max_rows: int | None = None) -> tuple[list[SimRequest], list[Phase], dict]:
    """The trace at mean rate ``rate_rps`` (module docstring); also returns how it was scaled."""
    raw = read_trace(kind, max_requests=max_rows)
    span_s = raw[-1].arrival_s - raw[0].arrival_s
    native_rps = (len(raw) - 1) / span_s
    time_scale = native_rps / rate_rps
    scaled = scale_trace(raw, TraceScaling(max_context_tokens, length_scale, time_scale))
    period_s = span_s * time_scale + 1.0 / rate_rps  # one replay, then the next one starts
    requests: list[SimRequest] = []
    offset_s = 0.0
    while offset_s < duration_s:
        for r in scaled:
            t = offset_s + r.arrival_s
            if t >= duration_s:
                break
            requests.append(SimRequest(len(requests), t, r.input_tokens, r.output_tokens,
                                       int(t // phase_s)))
        offset_s += period_s
    num_phases = math.ceil(duration_s / phase_s)
    phases = [Phase(f"{k}:{k * phase_s:.0f}-{min((k + 1) * phase_s, duration_s):.0f}s",
                    k * phase_s, min((k + 1) * phase_s, duration_s)) for k in range(num_phases)]
    info = {"trace": kind.value, "native_rps": native_rps, "time_scale": time_scale,
            "length_scale": length_scale, "max_context_tokens": max_context_tokens,
            "replays": math.ceil(duration_s / period_s), "num_rows": len(raw)}
    return requests, phases, info
