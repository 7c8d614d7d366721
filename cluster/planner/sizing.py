"""Per-role sizing for the planner core: capacity per worker, replicas for a load, the
consolidation check, the reactive SLO signal and worker eligibility (pure functions, no state).

Sizing follows DistServe §4 (per-instance goodput under the TTFT/TPOT SLOs, then
``replicas = ceil(load / goodput)``) and the Dynamo SLA planner (``ceil(predicted load /
per-engine capacity)`` for prefill and decode separately); Splitwise sizes its prompt and token
pools the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scission.cluster.planner.perf_model import PerformanceModel
from scission.cluster.planner.types import SloObservation, WorkerObservation
from scission.registry.workers import WorkerRole

DISAGGREGATED_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)
_CEIL_EPS = 1e-9  # ceil(x) of a ratio that is an integer up to rounding stays that integer


@dataclass(frozen=True, slots=True)
class SloTargets:
    ttft_ms: float
    tpot_ms: float
    attainment: float  # fraction of requests meeting each SLO, 0..1


def planned_roles(targets: dict[WorkerRole, int]) -> tuple[WorkerRole, ...]:
    """PREFILL and DECODE when either is in use (disaggregated), else COLOCATED if in use."""
    if any(role in targets for role in DISAGGREGATED_ROLES):
        return DISAGGREGATED_ROLES
    if WorkerRole.COLOCATED in targets:
        return (WorkerRole.COLOCATED,)
    return ()


def capacity_rps(model: PerformanceModel, role: WorkerRole, slo: SloObservation,
                 targets: SloTargets) -> float:
    """Requests/s one ``role`` worker sustains within the SLOs at the window's mean lengths.

    A colocated worker spends ``1/cap_prefill`` s per request prefilling and ``1/cap_decode``
    decoding, so its capacity is ``1 / (1/cap_prefill + 1/cap_decode)`` (interference between
    the two phases, which DistServe §2 measures, is ignored). 0 = the SLO is unreachable.
    """
    prefill = model.max_prefill_rps_per_worker(slo.mean_prompt_tokens, targets.ttft_ms)
    decode = model.max_decode_rps_per_worker(slo.mean_prompt_tokens, slo.mean_output_tokens,
                                             targets.tpot_ms)
    if role is WorkerRole.PREFILL:
        return prefill
    if role is WorkerRole.DECODE:
        return decode
    assert role is WorkerRole.COLOCATED, f"no capacity for role {role}"
    if prefill <= 0.0 or decode <= 0.0:
        return 0.0
    return 1.0 / (1.0 / prefill + 1.0 / decode)


def replicas_for(load_rps: float, per_worker_rps: float) -> int | None:
    """``ceil(load / capacity)`` workers; None when one worker cannot meet the SLO at all."""
    if per_worker_rps <= 0.0:
        return None
    if math.isinf(per_worker_rps):
        return 0
    return max(0, math.ceil(load_rps / per_worker_rps - _CEIL_EPS))


def utilization(load_rps: float, num_workers: int, per_worker_rps: float) -> float:
    """Fraction of ``num_workers`` workers' SLO capacity that ``load_rps`` uses (inf if none)."""
    capacity = num_workers * per_worker_rps
    if capacity <= 0.0:
        return math.inf if load_rps > 0.0 else 0.0
    return load_rps / capacity


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
