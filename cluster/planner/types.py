"""The planner core's inputs and outputs (no I/O; STYLE §8: ``on_tick(TickInput) -> decision``).

Times are on the caller's clock (``now_s``): the adapter passes wall-clock seconds, tests
and the simulator a simulated clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from scission.registry.workers import WorkerRole


class Action(enum.Enum):
    NONE = "none"  # no change (the reason says why)
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    FLIP = "flip"  # move workers between roles (at the budget: same weights, no model load)


class Loop(enum.Enum):
    PREDICTIVE = "predictive"  # forecast load x fitted performance model -> replicas
    REACTIVE = "reactive"  # +-1 from measured SLO attainment


@dataclass(frozen=True, slots=True)
class WorkerObservation:
    worker_id: str
    role: WorkerRole
    started_at_s: float  # when it began serving this role (start or last flip), caller's clock
    draining: bool = False
    num_running: int = 0
    num_waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0  # used / total KV blocks, 0..1
    kv_capacity_tokens: int = 0  # num_blocks x block_size (0 = unknown: no KV cap on batches)


@dataclass(frozen=True, slots=True)
class ForwardSample:
    """One engine step of one worker (its forward-pass metrics)."""

    worker_id: str
    role: WorkerRole
    at_s: float  # when the step ended, on the caller's clock
    num_prefill_tokens: int  # prompt tokens scheduled in the step
    num_decode_requests: int  # decode rows in the step (batch size)
    num_context_tokens: int  # sum of the decode rows' context lengths
    step_ms: float


@dataclass(frozen=True, slots=True)
class SloObservation:
    """The router's window (``registry.metrics.SloWindow``, cluster scope)."""

    window_s: float
    num_finished: int
    arrival_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    ttft_p90_ms: float
    tpot_p90_ms: float
    ttft_attainment: float
    tpot_attainment: float
    attainment: float
    goodput_rps: float
    # The load's shape from *arrivals* over the router's shorter shape window (the fields above
    # describe requests when they finish: the load of a minute ago). 0 = not recorded.
    shape_window_s: float = 0.0
    num_recent_arrivals: int = 0
    recent_arrival_rps: float = 0.0
    arrival_mean_prompt_tokens: float = 0.0
    arrival_rms_prompt_tokens: float = 0.0  # sqrt(mean(prompt²)): prefill cost is ∝ prompt²
    arrival_mean_max_tokens: float = 0.0  # requested max_tokens (0 = not given)
    num_recent_finished: int = 0
    recent_mean_output_tokens: float = 0.0  # ok requests finished in the shape window


@dataclass(frozen=True, slots=True)
class TickInput:
    now_s: float
    targets: dict[WorkerRole, int]  # current targets (roles in use only)
    workers: list[WorkerObservation]  # registered workers
    slo: SloObservation | None  # None = no traffic measured yet
    samples: list[ForwardSample] = field(default_factory=list)  # new since the last tick
    hold_until_s: float = 0.0  # an operator's hold: no decision changes targets before this
    pending_change: bool = False  # the controller has not yet reached the last targets


@dataclass(frozen=True, slots=True)
class PoolDecision:
    action: Action
    loop: Loop
    targets: dict[WorkerRole, int]  # targets after the decision (== input when NONE)
    reason: str  # human-readable, with the inputs: "ttft_p90 2400 > 2000 ms x3 ticks ..."
    flip_worker_id: str | None = None  # FLIP: which worker (the first of flip_worker_ids)
    flip_to_role: WorkerRole | None = None  # FLIP: their new role
    # FLIP: every worker that moves, least loaded first (empty: just ``flip_worker_id``)
    flip_worker_ids: tuple[str, ...] = ()
