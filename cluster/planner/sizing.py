"""Per-role sizing for the planner core: the load's shape, workers per role for a load and a
backlog, the consolidation check, the reactive SLO signal and worker eligibility (pure
functions, no state); ``RoleView``, one role's assessment at one tick.

Sizing follows DistServe §4 (goodput under the TTFT/TPOT SLOs) and the Dynamo SLA planner
(``ceil(predicted load / per-engine capacity)`` for prefill and decode separately; Splitwise
sizes its prompt and token pools the same way), with the prefill pool as one M/D/c queue
(Erlang C) rather than N independent M/D/1 instances: the router sends each prompt to the
least-queued prefill worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scission.cluster.planner.perf_model import PerformanceModel, servers_for_wait
from scission.cluster.planner.types import SloObservation, WorkerObservation
from scission.registry.workers import WorkerRole

DISAGGREGATED_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)
_CEIL_EPS = 1e-9  # ceil(x) of a ratio that is an integer up to rounding stays that integer


@dataclass(frozen=True, slots=True)
class SloTargets:
    """The SLOs and how the sizing meets them (``PlannerConfig.slo_targets``)."""

    ttft_ms: float
    tpot_ms: float
    attainment: float  # fraction of requests meeting each SLO, 0..1
    prefill_budget_tokens: int = 1024  # prompt tokens per prefill step (chunked prefill)
    max_utilization: float = 0.9  # of a worker's saturation throughput, sizing never plans more


def planned_roles(targets: dict[WorkerRole, int]) -> tuple[WorkerRole, ...]:
    """PREFILL and DECODE when either is in use (disaggregated), else COLOCATED if in use."""
    if any(role in targets for role in DISAGGREGATED_ROLES):
        return DISAGGREGATED_ROLES
    if WorkerRole.COLOCATED in targets:
        return (WorkerRole.COLOCATED,)
    return ()


def replicas_for(load_rps: float, per_worker_rps: float) -> int | None:
    """``ceil(load / capacity)`` workers; None when one worker cannot meet the SLO at all."""
    if per_worker_rps <= 0.0:
        return None
    if math.isinf(per_worker_rps):
        return 0
    return max(0, math.ceil(load_rps / per_worker_rps - _CEIL_EPS))


@dataclass(frozen=True, slots=True)
class LoadShape:
    """What the predictive loop sizes for: lengths from arrivals where the router has them."""

    prompt_tokens: float  # mean
    rms_prompt_tokens: float  # sqrt(mean(prompt²))
    output_tokens: float  # mean
    source: str  # where the lengths came from, for reasons

    @property
    def prompt_cv2(self) -> float:
        """Squared coefficient of variation of the prompt length (0 = all equal)."""
        p = max(self.prompt_tokens, 1.0)
        return max(self.rms_prompt_tokens ** 2 / (p * p) - 1.0, 0.0)


@dataclass(frozen=True, slots=True)
class PoolState:
    """What a role's registered workers hold now (``pool_state``)."""

    kv_capacity_tokens: int = 0  # of the smallest worker that reported it (0 = unknown)
    queued_prefill_tokens: int = 0  # prompt tokens not yet computed
    num_running: int = 0
    num_waiting: int = 0  # e.g. decode: KV arrived, waiting for a batch slot
    num_workers: int = 0  # serving (not draining)
    num_full: int = 0  # of them, with requests waiting (full: batch or KV)
    num_running_full: int = 0  # requests running on those


def pool_state(workers: Sequence[WorkerObservation], role: WorkerRole) -> PoolState:
    """``role``'s serving workers, summed (their engines' queues, as they report them)."""
    mine = [w for w in workers if w.role is role and not w.draining]
    full = [w for w in mine if w.num_waiting > 0]
    return PoolState(min((w.kv_capacity_tokens for w in mine if w.kv_capacity_tokens), default=0),
                     sum(w.queued_prefill_tokens for w in mine),
                     sum(w.num_running for w in mine), sum(w.num_waiting for w in mine),
                     len(mine), len(full), sum(w.num_running for w in full))


MIN_RECENT_FINISHED = 5  # fewer recent finishes: the output length of the whole window


def load_shape(slo: SloObservation) -> LoadShape:
    """Prompt lengths of the recent arrivals (else of the window's finished requests). Output
    length: the arrivals' requested ``max_tokens`` if given (the router knows nothing else of a
    request's output before it finishes); else that of the requests finished recently
    (``MIN_RECENT_FINISHED`` at least), else of the whole window: up to a request's lifetime
    late when the output length changes."""
    if slo.num_recent_arrivals > 0 and slo.arrival_mean_prompt_tokens > 0.0:
        prompt, rms, src = (slo.arrival_mean_prompt_tokens,
                            max(slo.arrival_rms_prompt_tokens, slo.arrival_mean_prompt_tokens),
                            "arrivals")
    else:
        prompt, rms, src = slo.mean_prompt_tokens, slo.mean_prompt_tokens, "finished"
    if slo.arrival_mean_max_tokens > 0.0:
        out, out_src = slo.arrival_mean_max_tokens, "max_tokens"
    elif slo.num_recent_finished >= MIN_RECENT_FINISHED:
        out, out_src = slo.recent_mean_output_tokens, "recent"
    else:
        out, out_src = slo.mean_output_tokens, "finished"
    return LoadShape(prompt, rms, out, f"prompt {prompt:.0f} ({src}), output {out:.0f} "
                                       f"({out_src})")


@dataclass(frozen=True, slots=True)
class RoleSizing:
    """One role's predictive sizing at one tick."""

    capacity_rps: float  # per worker at ``max_utilization`` (0 = SLO unreachable)
    replicas: int | None  # workers for the load and backlog (None = SLO unreachable)
    plan: str  # the arithmetic, for reasons
    steady: int | None = None  # workers for the load alone (None: as ``replicas``)

    @property
    def steady_replicas(self) -> int | None:
        return self.replicas if self.steady is None else self.steady


def size_role(model: PerformanceModel, role: WorkerRole, load_rps: float, shape: LoadShape,
              targets: SloTargets, state: PoolState = PoolState()) -> RoleSizing:
    """Workers of ``role`` for ``load_rps`` of ``shape`` within the SLOs (DistServe §4 goodput
    sizing, for a pool rather than one instance), and for the backlog ``state`` holds.

    Prefill: the pool is one M/D/c queue (``servers_for_wait``: the router sends each prompt to
    the least-queued worker) of service ``S`` per prompt (``prefill_service_ms``: full
    token-budget steps); TTFT = wait + the prompt alone (``prefill_alone_ms`` at the rms length);
    P(TTFT > SLO) ≤ 1 − attainment and utilization ≤ ``max_utilization``. A backlog (queued
    prompts beyond one per worker, e.g. after the load's shape changed) adds the workers that
    serve it within the TTFT SLO (capped, when it flips workers in, at
    what the decode pool can take: ``balanced_share``). Decode: ``n`` rows per worker, the batch whose step meets the
    TPOT SLO (``max_decode_batch``) capped by KV (``kv_capacity_tokens / (prompt + output)``),
    each row ``output`` steps: ``max_utilization · n / (output · step)`` requests/s per worker;
    when most workers have requests waiting for a batch slot, at least the workers that run
    them all (at ``n`` rows, or what the full workers run if fewer). Colocated: ``1 / (1/prefill + 1/decode)`` per worker (no interference model).
    """
    if role is WorkerRole.PREFILL:
        return _prefill(model, load_rps, shape, targets, state)
    if role is WorkerRole.DECODE:
        return _decode(model, load_rps, shape, targets, state)
    assert role is WorkerRole.COLOCATED, f"no sizing for role {role}"
    prefill = _prefill(model, load_rps, shape, targets, PoolState())
    decode = _decode(model, load_rps, shape, targets, PoolState(state.kv_capacity_tokens))
    cap = 0.0 if min(prefill.capacity_rps, decode.capacity_rps) <= 0.0 else \
        1.0 / (1.0 / prefill.capacity_rps + 1.0 / decode.capacity_rps)
    replicas = replicas_for(load_rps, cap)
    return RoleSizing(cap, replicas, f"colocated: {load_rps:.2f} rps / {cap:.2f} rps per "
                                     f"worker = {replicas}")


def _prefill(model: PerformanceModel, load_rps: float, shape: LoadShape, targets: SloTargets,
             state: PoolState) -> RoleSizing:
    budget, util = targets.prefill_budget_tokens, targets.max_utilization
    service_ms = model.prefill_service_ms(shape.prompt_tokens, shape.rms_prompt_tokens, budget)
    alone_ms = model.prefill_alone_ms(shape.rms_prompt_tokens, budget)
    if alone_ms >= targets.ttft_ms:
        return RoleSizing(0.0, None, f"prefill: a {shape.rms_prompt_tokens:.0f}-token prompt "
                                     f"alone takes {alone_ms:.0f} ms >= the ttft slo")
    if service_ms <= 0.0:
        return RoleSizing(math.inf, 0, "prefill: free per the model")
    offered, wait_s = load_rps * service_ms / 1000.0, (targets.ttft_ms - alone_ms) / 1000.0
    n = servers_for_wait(offered, service_ms / 1000.0, wait_s, 1.0 - targets.attainment,
                         shape.prompt_cv2, math.ceil(offered / util - _CEIL_EPS))
    plan = (f"prefill: {load_rps:.2f} rps x {service_ms:.0f} ms per prompt = {offered:.2f} busy "
            f"workers; ttft p{100 * targets.attainment:.0f} <= {targets.ttft_ms:.0f} ms at "
            f"utilization <= {util:.2f}: {n}")
    per_token_s = service_ms / max(shape.prompt_tokens, 1.0) / 1000.0
    excess_s = state.queued_prefill_tokens * per_token_s - n * service_ms / 1000.0
    drain = math.ceil(offered + excess_s / wait_s - _CEIL_EPS)
    if drain > n:
        plan += f"; backlog {excess_s:.0f} worker-s served within {wait_s:.1f} s: {drain}"
    return RoleSizing(util * 1000.0 / service_ms, max(n, drain), plan, n)


def _decode(model: PerformanceModel, load_rps: float, shape: LoadShape, targets: SloTargets,
            state: PoolState) -> RoleSizing:
    out = max(shape.output_tokens, 1.0)
    ctx = shape.prompt_tokens + out / 2.0
    rows = model.max_decode_batch(ctx, targets.tpot_ms)
    if state.kv_capacity_tokens > 0 and rows > 0:
        rows = min(rows, max(int(state.kv_capacity_tokens // (shape.prompt_tokens + out)), 1))
    if rows == 0:
        return RoleSizing(0.0, None, "decode: an empty step misses the tpot slo")
    step_s = model.decode_tpot_ms(rows, ctx) / 1000.0
    cap = math.inf if step_s <= 0.0 else targets.max_utilization * rows / (out * step_s)
    n = replicas_for(load_rps, cap)
    plan = (f"decode: {load_rps:.2f} rps / ({targets.max_utilization:.2f} x {rows} rows / "
            f"({out:.0f} x {step_s * 1000:.0f} ms)) = {n}")
    held = 0
    if n is not None and 2 * state.num_full > state.num_workers:
        # most workers are full: they run what their KV and batch allow, if fewer than rows
        per_worker = min(float(rows), max(state.num_running_full / state.num_full, 1.0))
        held = math.ceil((state.num_running + state.num_waiting) / per_worker - _CEIL_EPS)
        if held > n:
            plan += (f"; {state.num_running} running + {state.num_waiting} waiting at "
                     f"{per_worker:.1f} rows per worker: {held}")
    return RoleSizing(cap, None if n is None else max(n, held), plan, n)


def balanced_share(total: int, capacity_rps: float, other_capacity_rps: float) -> int:
    """Workers of one role out of ``total`` shared with the role in series with it (prefill
    feeds decode) such that both pools carry the same requests/s: ``n·cap = (total − n)·other``
    (the most the role can use: beyond that the other pool cannot keep up)."""
    if not 0.0 < capacity_rps < math.inf or not 0.0 < other_capacity_rps < math.inf:
        return total
    return round(total * other_capacity_rps / (capacity_rps + other_capacity_rps))


def split_share(total: int, mine: tuple[int, int], other: tuple[int, int]) -> int:
    """My share of ``total`` workers when two roles need more than that together; each need is
    ``(steady, with_backlog)``. Steady needs come first (in proportion when they alone exceed
    ``total``); what is left goes to the backlogs, in proportion."""
    (steady, want), (other_steady, other_want) = mine, other
    if steady + other_steady >= total:
        return round(total * steady / max(steady + other_steady, 1))
    extra, other_extra = max(want - steady, 0), max(other_want - other_steady, 0)
    left = total - steady - other_steady
    return steady + round(left * extra / max(extra + other_extra, 1))


@dataclass(frozen=True, slots=True)
class RoleView:
    """One role's assessment at one tick."""

    role: WorkerRole
    target: int
    capacity_rps: float  # per worker within the SLOs (0 = unreachable)
    desired: int | None  # predictive replicas (None: predictive off or SLO unreachable)
    steady: int | None  # ... for the forecast load alone (``desired`` adds the backlog)
    plan: str  # the predictive arithmetic, for reasons
    cold: bool  # SLO window ignored for this role
    short: str | None  # reactive: why short (None = not short, or cold)
    severity: float  # p90/SLO or desired/target, whichever is worse: orders short roles
    util_minus_one: float  # consolidation: utilization of target − 1 workers
    spare: int  # workers it can flip away and still have its predictive size (0 = none)
    slack: str | None  # why target − 1 workers suffice (None = they do not, or not allowed)

    @property
    def wants_up(self) -> bool:
        return self.short is not None or (self.desired is not None and self.desired > self.target)

    @property
    def name(self) -> str:
        return self.role.value


def utilization(load_rps: float, num_workers: int, per_worker_rps: float) -> float:
    """Fraction of ``num_workers`` workers' SLO capacity that ``load_rps`` uses (inf if none)."""
    capacity = num_workers * per_worker_rps
    if capacity <= 0.0:
        return math.inf if load_rps > 0.0 else 0.0
    return load_rps / capacity


def keep_workers(load_rps: float, per_worker_rps: float, desired: int | None,
                 min_workers: int, max_utilization: float) -> int:
    """Workers a role needs under ``load_rps``: at least ``min_workers`` and its predictive
    ``desired``, and enough that they run at ≤ ``max_utilization`` of their SLO capacity (the
    consolidation check); a huge number when the SLO is unreachable (it never has spare)."""
    if per_worker_rps <= 0.0:
        return 1 << 30
    need = 0 if math.isinf(per_worker_rps) else \
        math.ceil(load_rps / (per_worker_rps * max_utilization) - _CEIL_EPS)
    return max(min_workers, desired or 0, need)


def slo_ratio(role: WorkerRole, slo: SloObservation, targets: SloTargets) -> float:
    """The role's measured p90 over its SLO (> 1 = missing it): TTFT for prefill, TPOT for
    decode, the worse of the two for colocated."""
    ttft = slo.ttft_p90_ms / targets.ttft_ms
    tpot = slo.tpot_p90_ms / targets.tpot_ms
    return {WorkerRole.PREFILL: ttft, WorkerRole.DECODE: tpot}.get(role, max(ttft, tpot))


def short_reason(role: WorkerRole, slo: SloObservation, targets: SloTargets) -> str | None:
    """Why measured attainment says ``role`` is short of workers, or None when it is not."""
    parts = []
    if role in (WorkerRole.PREFILL, WorkerRole.COLOCATED) and \
            slo.ttft_attainment < targets.attainment:
        parts.append(f"ttft attainment {slo.ttft_attainment:.2f} < {targets.attainment:.2f} "
                     f"(ttft_p90 {slo.ttft_p90_ms:.0f} ms vs slo {targets.ttft_ms:.0f} ms)")
    if role in (WorkerRole.DECODE, WorkerRole.COLOCATED) and \
            slo.tpot_attainment < targets.attainment:
        parts.append(f"tpot attainment {slo.tpot_attainment:.2f} < {targets.attainment:.2f} "
                     f"(tpot_p90 {slo.tpot_p90_ms:.0f} ms vs slo {targets.tpot_ms:.0f} ms)")
    return "; ".join(parts) or None


def is_cold(role: WorkerRole, workers: Sequence[WorkerObservation], slo: SloObservation,
            now_s: float, cold_start_s: float) -> bool:
    """The SLO window says nothing about ``role``'s steady state: no finished requests, or a
    non-draining worker of the role younger than ``cold_start_s``."""
    if slo.num_finished == 0:
        return True
    return any(w.role is role and not w.draining and now_s - w.started_at_s < cold_start_s
               for w in workers)


def eligible_workers(workers: Sequence[WorkerObservation], role: WorkerRole, now_s: float,
                     min_lifetime_s: float) -> list[WorkerObservation]:
    """Workers of ``role`` a scale-down or flip may take: not draining, alive at least
    ``min_lifetime_s``; least loaded first (running + waiting, queued tokens, KV use, id)."""
    found = [w for w in workers if w.role is role and not w.draining
             and now_s - w.started_at_s >= min_lifetime_s]
    return sorted(found, key=lambda w: (w.num_running + w.num_waiting, w.queued_prefill_tokens,
                                        w.kv_usage, w.worker_id))


def steady_reason(views: Sequence[RoleView], up_ticks: dict[WorkerRole, int],
                  down_ticks: dict[WorkerRole, int], scale_up_ticks: int,
                  scale_down_ticks: int) -> str:
    """Why nothing changes: each role's plan, SLO ratio, N−1 utilization, hysteresis."""
    parts = []
    for v in views:
        window = "slo window cold" if v.cold else f"severity {v.severity:.2f}"
        parts.append(f"{v.name} {v.target}: {v.plan}; {window}; utilization at "
                     f"{v.target - 1} = {v.util_minus_one:.2f}; short "
                     f"{up_ticks[v.role]}/{scale_up_ticks} ticks, slack "
                     f"{down_ticks[v.role]}/{scale_down_ticks} ticks")
    return "steady: " + "; ".join(parts)
