"""The goodput planner's decision core: ``PlannerCore.on_tick(TickInput) -> PoolDecision``.

No I/O: the adapter reads etcd/metrics into a ``TickInput`` and applies the decision; the clock
is ``TickInput.now_s``. Two loops share one decision per tick (STYLE §8, DESIGN "Planner"):

- **Predictive** (DistServe §4 goodput sizing; Dynamo SLA planner): forecast arrival rate
  (``predictor.py``) ÷ requests/s one worker sustains within the TTFT/TPOT SLOs (a
  ``PerformanceModel`` fitted online from engine steps) → replicas per role.
- **Reactive**: measured SLO attainment below target ⇒ that role is short by one worker
  (TTFT ⇒ prefill, TPOT ⇒ decode; when both fail, the worse p90/SLO ratio goes first).

Guards, in order: operator hold, pending change (until reached or ``pending_timeout_s``),
cooldown after any change, no SLO window yet. A condition must hold ``scale_up_ticks`` /
``scale_down_ticks`` consecutive unguarded ticks (hysteresis). Scale-down removes one worker per
decision, only when a worker has lived ``min_worker_lifetime_s``, the role's SLO window is not
cold, and the consolidation check passes (N−1 workers at ≤ ``scale_down_utilization`` of their
SLO capacity under max(measured, forecast) load). The total never grows past ``max_workers``;
at the budget a short role takes a worker from a role with slack (``Action.FLIP``, as
Splitwise/DistServe re-purpose instances between phases).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from scission.cluster.planner.perf_model import DEFAULT_MODEL, PerformanceModel
from scission.cluster.planner.predictor import PredictorKind, make_predictor
from scission.cluster.planner.sizing import (
    SloTargets,
    capacity_rps,
    eligible_workers,
    is_cold,
    planned_roles,
    replicas_for,
    short_reason,
    slo_ratio,
    utilization,
)
from scission.cluster.planner.types import (
    Action,
    ForwardSample,
    Loop,
    PoolDecision,
    TickInput,
)
from scission.registry.workers import WorkerRole

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannerConfig:
    slo_ttft_ms: float  # TTFT SLO (p90 target), ms
    slo_tpot_ms: float  # TPOT SLO (p90 target), ms
    max_workers: int  # budget: sum of all targets never grows past this
    min_workers_per_role: int = 1  # per needed role (prefill+decode, or colocated)
    interval_s: float = 10.0  # tick period (the adapter's; documents the tick unit)
    cooldown_s: float = 60.0  # no change within this after any change
    min_worker_lifetime_s: float = 120.0  # younger workers are never removed or flipped
    cold_start_s: float = 30.0  # samples/SLO windows from younger workers are ignored
    scale_up_ticks: int = 2  # consecutive ticks a "short" condition must hold
    scale_down_ticks: int = 6  # consecutive ticks a "slack" condition must hold
    scale_down_utilization: float = 0.7  # consolidation: N−1 workers' utilization ≤ this
    pending_timeout_s: float = 300.0  # a pending change blocks new ones at most this long
    attainment_target: float = 0.9  # fraction of requests meeting each SLO
    predictive: bool = True  # False: reactive loop only
    predictor: PredictorKind = PredictorKind.HOLT
    sample_window: int = 1024  # engine steps kept for the online performance-model fit

    def __post_init__(self) -> None:
        positive = {"slo_ttft_ms": self.slo_ttft_ms, "slo_tpot_ms": self.slo_tpot_ms,
                    "interval_s": self.interval_s}
        non_negative = {"cooldown_s": self.cooldown_s, "cold_start_s": self.cold_start_s,
                        "min_worker_lifetime_s": self.min_worker_lifetime_s,
                        "pending_timeout_s": self.pending_timeout_s}
        for name, value in positive.items():
            if not value > 0.0:
                raise ValueError(f"PlannerConfig.{name} must be > 0, got {value}")
        for name, value in non_negative.items():
            if not value >= 0.0:
                raise ValueError(f"PlannerConfig.{name} must be >= 0, got {value}")
        if self.min_workers_per_role < 1:
            raise ValueError(f"min_workers_per_role must be >= 1, got {self.min_workers_per_role}")
        if self.max_workers < self.min_workers_per_role:
            raise ValueError(f"max_workers {self.max_workers} < min_workers_per_role "
                             f"{self.min_workers_per_role}")
        if self.scale_up_ticks < 1 or self.scale_down_ticks < 1:
            raise ValueError(f"scale_up_ticks {self.scale_up_ticks} and scale_down_ticks "
                             f"{self.scale_down_ticks} must be >= 1")
        if not 0.0 < self.scale_down_utilization <= 1.0:
            raise ValueError(f"scale_down_utilization {self.scale_down_utilization} "
                             "not in (0, 1]")
        if not 0.0 < self.attainment_target <= 1.0:
            raise ValueError(f"attainment_target {self.attainment_target} not in (0, 1]")
        if self.sample_window < 1:
            raise ValueError(f"sample_window must be >= 1, got {self.sample_window}")

    @property
    def slo_targets(self) -> SloTargets:
        return SloTargets(self.slo_ttft_ms, self.slo_tpot_ms, self.attainment_target)

    @property
    def loop(self) -> Loop:
        """The loop a scale-down or NONE is attributed to."""
        return Loop.PREDICTIVE if self.predictive else Loop.REACTIVE


@dataclass(frozen=True, slots=True)
class RoleView:
    """One role's assessment at one tick."""

    role: WorkerRole
    target: int
    capacity_rps: float  # per worker within the SLOs (0 = unreachable)
    desired: int | None  # predictive replicas (None: predictive off or SLO unreachable)
    plan: str  # the predictive arithmetic, for reasons
    cold: bool  # SLO window ignored for this role
    short: str | None  # reactive: why short (None = not short, or cold)
    severity: float  # p90/SLO or desired/target, whichever is worse: orders short roles
    util_minus_one: float  # consolidation: utilization of target − 1 workers
    slack: str | None  # why target − 1 workers suffice (None = they do not, or not allowed)

    @property
    def wants_up(self) -> bool:
        return self.short is not None or (self.desired is not None and self.desired > self.target)

    @property
    def name(self) -> str:
        return self.role.value


class PlannerCore:
    """Decides pool targets once per tick; keeps only its own state (forecaster, fitted model,
    hysteresis counters, last change), never touches the cluster."""

    def __init__(self, config: PlannerConfig, model: PerformanceModel = DEFAULT_MODEL) -> None:
        self.config = config
        self._model = model
        self._predictor = make_predictor(config.predictor)
        self._samples: deque[ForwardSample] = deque(maxlen=config.sample_window)
        self._up_ticks: dict[WorkerRole, int] = {}
        self._down_ticks: dict[WorkerRole, int] = {}
        self._last_change_s: float | None = None
        self._pending_since_s: float | None = None

    @property
    def model(self) -> PerformanceModel:
        """The current (prior or fitted) performance model."""
        return self._model

    @property
    def forecast_rps(self) -> float:
        """The predictor's forecast of next tick's arrival rate, requests/s."""
        return self._predictor.predict()

    def on_tick(self, inp: TickInput) -> PoolDecision:
        """One planning step at ``inp.now_s``; the decision's reason carries its inputs."""
        self._ingest(inp)
        blocked = self._blocked_reason(inp)
        if blocked is not None:
            self._up_ticks.clear()
            self._down_ticks.clear()
            return self._none(inp, blocked)
        views = [self._assess(inp, role) for role in planned_roles(inp.targets)]
        self._count(views)
        decision = (self._repair_min(inp, views) or self._scale_up(inp, views)
                    or self._scale_down(inp, views) or self._none(inp, self._steady_reason(views)))
        if decision.action is not Action.NONE:
            self._last_change_s = self._pending_since_s = inp.now_s
            self._up_ticks.clear()
            self._down_ticks.clear()
            logger.info("planner %s (%s): %s -> %s: %s", decision.action.value,
                        decision.loop.value, _fmt(inp.targets), _fmt(decision.targets),
                        decision.reason)
        return decision

    # -- state updates ----------------------------------------------------------------------

    def _ingest(self, inp: TickInput) -> None:
        """Refit the model on warm samples, feed the forecaster, track the pending change."""
        started = {w.worker_id: w.started_at_s for w in inp.workers}
        warm = [s for s in inp.samples if s.worker_id in started
                and s.at_s - started[s.worker_id] >= self.config.cold_start_s]
        if warm:
            self._samples.extend(warm)
            self._model = PerformanceModel.fit(self._samples, prior=self._model) or self._model
        if inp.slo is not None:
            self._predictor.observe(inp.slo.arrival_rps)
        if not inp.pending_change:
            self._pending_since_s = None
        elif self._pending_since_s is None:
            self._pending_since_s = inp.now_s

    def _count(self, views: list[RoleView]) -> None:
        """Hysteresis: consecutive ticks each role has been short / had slack."""
        for v in views:
            up = v.wants_up
            self._up_ticks[v.role] = self._up_ticks.get(v.role, 0) + 1 if up else 0
            down = v.slack is not None and not up
            self._down_ticks[v.role] = self._down_ticks.get(v.role, 0) + 1 if down else 0

    # -- assessment -------------------------------------------------------------------------

    def _blocked_reason(self, inp: TickInput) -> str | None:
        """Why no decision may change targets this tick (None = free to decide)."""
        c, now = self.config, inp.now_s
        if inp.hold_until_s > now:
            return f"operator hold until {inp.hold_until_s:.1f} s (now {now:.1f} s)"
        if inp.pending_change and self._pending_since_s is not None \
                and now - self._pending_since_s < c.pending_timeout_s:
            return (f"pending change since {self._pending_since_s:.1f} s: waiting for the "
                    f"controller (timeout {c.pending_timeout_s:.0f} s)")
        if self._last_change_s is not None and now - self._last_change_s < c.cooldown_s:
            left = c.cooldown_s - (now - self._last_change_s)
            return f"cooldown: last change at {self._last_change_s:.1f} s, {left:.1f} s left"
        if inp.slo is None:
            return "no SLO window yet (no traffic measured)"
        if not planned_roles(inp.targets):
            return f"no plannable role in targets {_fmt(inp.targets)}"
        return None

    def _assess(self, inp: TickInput, role: WorkerRole) -> RoleView:
        c, slo = self.config, inp.slo
        assert slo is not None, "guarded by _blocked_reason"
        target = inp.targets.get(role, 0)
        cap = capacity_rps(self._model, role, slo, c.slo_targets)
        forecast = self._predictor.predict() if c.predictive else 0.0
        desired, plan = None, f"{role.value}: predictive loop off"
        if c.predictive:
            desired = replicas_for(forecast, cap)
            plan = (f"forecast {forecast:.2f} rps / {cap:.2f} rps per {role.value} worker "
                    f"= {desired}" if desired is not None
                    else f"{role.value}: slo unreachable by one worker per the model")
            if desired is not None:
                desired = max(desired, c.min_workers_per_role)
        cold = is_cold(role, inp.workers, slo, inp.now_s, c.cold_start_s)
        short = None if cold else short_reason(role, slo, c.slo_targets)
        severity = 0.0 if cold else slo_ratio(role, slo, c.slo_targets)
        if desired is not None and desired > target:
            severity = max(severity, desired / max(target, 1))
        load = max(slo.arrival_rps, forecast)
        util = utilization(load, target - 1, cap)
        slack = None
        if (target > c.min_workers_per_role and not cold and short is None
                and util <= c.scale_down_utilization
                and eligible_workers(inp.workers, role, inp.now_s, c.min_worker_lifetime_s)):
            slack = (f"load {load:.2f} rps / ({target - 1} x {cap:.2f} rps per {role.value} "
                     f"worker) = utilization {util:.2f} <= {c.scale_down_utilization:.2f}")
        return RoleView(role, target, cap, desired, plan, cold, short, severity, util, slack)

    # -- decisions --------------------------------------------------------------------------

    def _repair_min(self, inp: TickInput, views: list[RoleView]) -> PoolDecision | None:
        """Raise any needed role below ``min_workers_per_role`` (within the budget)."""
        c = self.config
        budget_left = c.max_workers - sum(inp.targets.values())
        new, reasons = dict(inp.targets), []
        for v in views:
            grant = min(c.min_workers_per_role - v.target, budget_left)
            if grant > 0:
                new[v.role], budget_left = v.target + grant, budget_left - grant
                reasons.append(f"{v.name} target {v.target} < min {c.min_workers_per_role}")
        if not reasons:
            return None
        return PoolDecision(Action.SCALE_UP, Loop.REACTIVE, new, "; ".join(reasons))

    def _scale_up(self, inp: TickInput, views: list[RoleView]) -> PoolDecision | None:
        """Short roles (past hysteresis), worst first: predictive ones to their replicas,
        else the worst reactive one +1; at the budget, a flip."""
        c = self.config
        ready = sorted((v for v in views if self._up_ticks[v.role] >= c.scale_up_ticks),
                       key=lambda v: (-v.severity, v.name))
        if not ready:
            return None
        budget_left = c.max_workers - sum(inp.targets.values())
        planned = [v for v in ready if v.desired is not None and v.desired > v.target]
        loop = Loop.PREDICTIVE if planned else Loop.REACTIVE
        new, reasons = dict(inp.targets), []
        for v in planned or ready[:1]:
            want = v.desired - v.target if planned and v.desired is not None else 1
            grant = min(want, budget_left)
            if grant <= 0:
                continue
            new[v.role], budget_left = v.target + grant, budget_left - grant
            why = v.plan if planned else v.short
            capped = f" (budget {c.max_workers} caps +{want})" if grant < want else ""
            reasons.append(f"{v.name} short for {self._up_ticks[v.role]} ticks: {why}; "
                           f"{v.target} -> {new[v.role]}{capped}")
        if reasons:
            return PoolDecision(Action.SCALE_UP, loop, new, "; ".join(reasons))
        return self._flip(inp, ready[0], views, loop)

    def _flip(self, inp: TickInput, short: RoleView, views: list[RoleView],
              loop: Loop) -> PoolDecision:
        """At the budget: move the least-loaded eligible worker of the role with most slack."""
        why = short.plan if loop is Loop.PREDICTIVE else short.short
        donors = sorted((v for v in views if v.role is not short.role and v.slack is not None),
                        key=lambda v: (v.util_minus_one, v.name))
        if not donors:
            return self._none(inp, f"at budget {self.config.max_workers} workers: {short.name} "
                                   f"short ({why}) and no other role has slack")
        donor = donors[0]
        worker = eligible_workers(inp.workers, donor.role, inp.now_s,
                                  self.config.min_worker_lifetime_s)[0]
        new = dict(inp.targets)
        new[donor.role] -= 1
        new[short.role] = new.get(short.role, 0) + 1
        reason = (f"at budget {self.config.max_workers} workers: {short.name} short for "
                  f"{self._up_ticks[short.role]} ticks ({why}); {donor.name} has slack "
                  f"({donor.slack}); flip {worker.worker_id} {donor.name} -> {short.name}")
        return PoolDecision(Action.FLIP, loop, new, reason, flip_worker_id=worker.worker_id,
                            flip_to_role=short.role)

    def _scale_down(self, inp: TickInput, views: list[RoleView]) -> PoolDecision | None:
        """One worker off the role whose N−1 workers would be least utilized."""
        ready = [v for v in views if self._down_ticks[v.role] >= self.config.scale_down_ticks]
        if not ready:
            return None
        v = min(ready, key=lambda v: (v.util_minus_one, v.name))
        new = dict(inp.targets)
        new[v.role] = v.target - 1
        reason = (f"{v.name} slack for {self._down_ticks[v.role]} ticks: {v.slack}; "
                  f"{v.target} -> {v.target - 1}")
        return PoolDecision(Action.SCALE_DOWN, self.config.loop, new, reason)

    def _steady_reason(self, views: list[RoleView]) -> str:
        """Why nothing changes: each role's plan, SLO ratio, N−1 utilization, hysteresis."""
        c, parts = self.config, []
        for v in views:
            window = "slo window cold" if v.cold else f"severity {v.severity:.2f}"
            parts.append(f"{v.name} {v.target}: {v.plan}; {window}; utilization at "
                         f"{v.target - 1} = {v.util_minus_one:.2f}; short "
                         f"{self._up_ticks[v.role]}/{c.scale_up_ticks} ticks, slack "
                         f"{self._down_ticks[v.role]}/{c.scale_down_ticks} ticks")
        return "steady: " + "; ".join(parts)

    def _none(self, inp: TickInput, reason: str) -> PoolDecision:
        return PoolDecision(Action.NONE, self.config.loop, dict(inp.targets), reason)


def _fmt(targets: dict[WorkerRole, int]) -> str:
    return "{" + ", ".join(f"{r.value}: {n}" for r, n in targets.items()) + "}"
