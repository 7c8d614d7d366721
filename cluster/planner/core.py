"""The goodput planner's decision core: ``PlannerCore.on_tick(TickInput) -> PoolDecision``.

No I/O: the adapter reads etcd/metrics into a ``TickInput`` and applies the decision; the clock
is ``TickInput.now_s``. Two loops share one decision per tick (STYLE §8, DESIGN "Planner"):

- **Predictive** (DistServe §4 goodput sizing; Dynamo SLA planner): forecast arrival rate
  (``predictor.py``) of the load's current shape (lengths from the router's recent arrivals,
  ``sizing.load_shape``), a ``PerformanceModel`` fitted online from engine steps (damped) and
  the pools' backlogs → workers per role (``sizing.size_role``).
- **Reactive**: measured SLO attainment below target ⇒ that role is short by one worker
  (TTFT ⇒ prefill, TPOT ⇒ decode; when both fail, the worse p90/SLO ratio goes first).

Guards, in order: operator hold, pending change (until reached or ``pending_timeout_s``),
cooldown (``move_cooldown_s`` after a predictive change, ``cooldown_s`` after a reactive one;
the reactive loop always waits ``cooldown_s``, until the SLO window shows the last change), no
SLO window yet. A condition must hold ``scale_up_ticks`` / ``scale_down_ticks`` consecutive
unguarded ticks. Scale-up grants the predictive gap at once within ``max_workers``; the rest of
it comes from the other role by flips in the same decision (``Action.FLIP``, as
Splitwise/DistServe re-purpose instances between phases): as many workers as the donor can spare
above its predictive size; when it has none, the two roles split their workers (steady needs
first, then backlogs), only if measured attainment says the short role misses its SLO (a
forecast alone never takes a worker from a role without slack). Scale-down removes one worker
per decision, only when a worker has lived ``min_worker_lifetime_s``, the role's SLO window is
not cold, and N−1 workers run at ≤ ``scale_down_utilization`` of their SLO capacity.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from math import inf

from scission.cluster.planner.perf_model import DEFAULT_MODEL, PerformanceModel
from scission.cluster.planner.predictor import PredictorKind, make_predictor
from scission.cluster.planner.sizing import (
    LoadShape,
    RoleView,
    SloTargets,
    balanced_share,
    eligible_workers,
    is_cold,
    keep_workers,
    load_shape,
    planned_roles,
    pool_state,
    short_reason,
    size_role,
    slo_ratio,
    split_share,
    steady_reason,
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
    cooldown_s: float = 60.0  # no change within this after a reactive one (the SLO window)
    move_cooldown_s: float = 20.0  # ... after a predictive one (sized from arrivals, not the window)
    min_worker_lifetime_s: float = 120.0  # younger workers are never removed or flipped
    cold_start_s: float = 30.0  # samples/SLO windows from younger workers are ignored
    scale_up_ticks: int = 2  # consecutive ticks a "short" condition must hold
    scale_down_ticks: int = 30  # ... a "slack" one (5 min: Kubernetes HPA's scale-down window)
    scale_down_utilization: float = 0.7  # consolidation: N−1 workers' utilization ≤ this
    pending_timeout_s: float = 300.0  # a pending change blocks new ones at most this long
    attainment_target: float = 0.9  # fraction of requests meeting each SLO
    predictive: bool = True  # False: reactive loop only
    predictor: PredictorKind = PredictorKind.HOLT
    sample_window: int = 1024  # engine steps kept for the online performance-model fit
    fit_weight: float = 0.3  # of each new fit in the model (1 = no damping)
    prefill_budget_tokens: int = 1024  # prompt tokens per prefill step (max_num_batched_tokens)
    max_utilization: float = 0.9  # sizing plans each worker at most this busy

    def __post_init__(self) -> None:
        positive = {"slo_ttft_ms": self.slo_ttft_ms, "slo_tpot_ms": self.slo_tpot_ms,
                    "interval_s": self.interval_s}
        non_negative = {"cooldown_s": self.cooldown_s, "move_cooldown_s": self.move_cooldown_s,
                        "cold_start_s": self.cold_start_s,
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
        if self.sample_window < 1 or self.prefill_budget_tokens < 1:
            raise ValueError(f"sample_window {self.sample_window} and prefill_budget_tokens "
                             f"{self.prefill_budget_tokens} must be >= 1")
        fractions = {"scale_down_utilization": self.scale_down_utilization,
                     "attainment_target": self.attainment_target,
                     "max_utilization": self.max_utilization, "fit_weight": self.fit_weight}
        for name, value in fractions.items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"PlannerConfig.{name} {value} not in (0, 1]")

    @property
    def slo_targets(self) -> SloTargets:
        return SloTargets(self.slo_ttft_ms, self.slo_tpot_ms, self.attainment_target,
                          self.prefill_budget_tokens, self.max_utilization)

    @property
    def loop(self) -> Loop:
        """The loop a scale-down or NONE is attributed to."""
        return Loop.PREDICTIVE if self.predictive else Loop.REACTIVE


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
        self._cooldown_s = config.cooldown_s  # of the last change
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
            self._up_ticks, self._down_ticks = {}, {}
            return self._none(inp, blocked)
        assert inp.slo is not None, "guarded by _blocked_reason"
        shape = load_shape(inp.slo)
        views = [self._assess(inp, role, shape) for role in planned_roles(inp.targets)]
        self._count(views)
        decision = (self._repair_min(inp, views) or self._scale_up(inp, views)
                    or self._scale_down(inp, views) or self._none(inp, steady_reason(
                        views, self._up_ticks, self._down_ticks, self.config.scale_up_ticks,
                        self.config.scale_down_ticks)))
        if decision.action is not Action.NONE:
            self._last_change_s = self._pending_since_s = inp.now_s
            predictive = decision.loop is Loop.PREDICTIVE
            self._cooldown_s = self.config.move_cooldown_s if predictive else self.config.cooldown_s
            self._up_ticks, self._down_ticks = {}, {}
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
        if warm:  # refit, damped: the fit's coefficients drift from one window to the next
            self._samples.extend(warm)
            fitted = PerformanceModel.fit(self._samples, prior=self._model)
            if fitted is not None and fitted is not self._model:
                self._model = self._model.blend(fitted, self.config.fit_weight)
        if inp.slo is not None:  # the window's rate: the shape window's is as good, noisier
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
        if self._last_change_s is not None and now - self._last_change_s < self._cooldown_s:
            left = self._cooldown_s - (now - self._last_change_s)
            return f"cooldown: last change at {self._last_change_s:.1f} s, {left:.1f} s left"
        if inp.slo is None:
            return "no SLO window yet (no traffic measured)"
        if not planned_roles(inp.targets):
            return f"no plannable role in targets {_fmt(inp.targets)}"
        return None

    def _assess(self, inp: TickInput, role: WorkerRole, shape: LoadShape) -> RoleView:
        c, slo = self.config, inp.slo
        assert slo is not None, "guarded by _blocked_reason"
        target = inp.targets.get(role, 0)
        forecast = self._predictor.predict() if c.predictive else 0.0
        sizing = size_role(self._model, role, forecast, shape, c.slo_targets,
                           pool_state(inp.workers, role))
        desired, steady, plan = None, None, f"{role.value}: predictive loop off"
        if c.predictive and sizing.replicas is not None:
            desired = max(sizing.replicas, c.min_workers_per_role)
            steady = max(sizing.steady_replicas or 0, c.min_workers_per_role)
        if c.predictive:
            plan = f"forecast {forecast:.2f} rps ({shape.source}); {sizing.plan}"
        cold = is_cold(role, inp.workers, slo, inp.now_s, c.cold_start_s)
        short = None if cold else short_reason(role, slo, c.slo_targets)
        severity = 0.0 if cold else slo_ratio(role, slo, c.slo_targets)
        if desired is not None and desired > target:
            severity = max(severity, desired / max(target, 1))
        load, cap = max(slo.arrival_rps, forecast), sizing.capacity_rps
        util = utilization(load, target - 1, cap)
        keep = keep_workers(load, cap, desired, c.min_workers_per_role, c.scale_down_utilization)
        # a flip keeps the worker in the budget: the donor may go down to its predictive size
        need = keep if desired is None else desired
        spare, slack, movable = 0, None, 0
        if not cold and short is None and min(keep, need) < target:
            movable = len(eligible_workers(inp.workers, role, inp.now_s,
                                           c.min_worker_lifetime_s))
            spare = min(target - need, movable)
        if keep < target and movable > 0:
            slack = (f"load {load:.2f} rps / ({target - 1} x {cap:.2f} rps per {role.value} "
                     f"worker) = utilization {util:.2f} <= {c.scale_down_utilization:.2f}")
        return RoleView(role, target, cap, desired, steady, plan, cold, short, severity, util,
                        max(spare, 0), slack)

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
        else the worst reactive one +1, within the budget; what the budget does not grant to
        the worst role comes from the other role by flips (one decision)."""
        c = self.config
        ready = sorted((v for v in views if self._up_ticks[v.role] >= c.scale_up_ticks),
                       key=lambda v: (-v.severity, v.name))
        if not ready:
            return None
        budget_left = c.max_workers - sum(inp.targets.values())
        planned = [v for v in ready if v.desired is not None and v.desired > v.target]
        loop = Loop.PREDICTIVE if planned else Loop.REACTIVE
        since_s = inf if self._last_change_s is None else inp.now_s - self._last_change_s
        if not planned and since_s < c.cooldown_s:  # the window still shows the last change
            return None
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
        worst = (planned or ready)[0]
        rest = worst.desired - new[worst.role] if planned and worst.desired is not None \
            else int(not reasons)
        if rest > 0 and budget_left == 0:
            flip = self._flip(inp, worst, views, loop, new, rest)
            if isinstance(flip, PoolDecision):
                reason = "; ".join([*reasons, flip.reason])
                return PoolDecision(Action.FLIP, loop, flip.targets, reason,
                                    flip.flip_worker_id, flip.flip_to_role, flip.flip_worker_ids)
            if not reasons:
                return self._none(inp, flip)
        return PoolDecision(Action.SCALE_UP, loop, new, "; ".join(reasons))

    def _flip(self, inp: TickInput, short: RoleView, views: list[RoleView], loop: Loop,
              targets: dict[WorkerRole, int], gap: int) -> PoolDecision | str:
        """At the budget: move up to ``gap`` of the other role's least-loaded eligible workers
        to ``short`` (its spare, or the proportional split); the reason when none moves."""
        c = self.config
        why = short.plan if loop is Loop.PREDICTIVE else short.short
        head = (f"at budget {c.max_workers} workers: {short.name} short for "
                f"{self._up_ticks[short.role]} ticks ({why})")
        donor = next((v for v in views if v.role is not short.role), None)
        if donor is None:
            return f"{head}; no other role has slack"
        if donor.spare > 0:
            k = min(gap, donor.spare)
            because = (f"{donor.name} can spare {donor.spare} ({donor.target} workers, needs "
                       f"{donor.target - donor.spare})")
        else:
            k, because = self._rebalance(short, donor, targets)
            k = min(k, gap, targets[donor.role] - c.min_workers_per_role)
        if short.steady is not None and short.desired is not None \
                and short.desired > short.steady:  # a backlog: as fast as the donor keeps up
            total = targets[short.role] + targets[donor.role]
            draining_rps = short.capacity_rps / c.max_utilization  # it drains flat out
            most = max(short.steady, balanced_share(total, draining_rps, donor.capacity_rps))
            if most - targets[short.role] < k:
                k = most - targets[short.role]
                because += f"; {short.name} at most {most} while its backlog lasts (balanced)"
        if k <= 0:
            return f"{head}; {because}"
        movable = eligible_workers(inp.workers, donor.role, inp.now_s, c.min_worker_lifetime_s)
        ids = tuple(w.worker_id for w in movable[:k])
        if not ids:
            return f"{head}; {because}; no {donor.name} worker may move yet"
        new = dict(targets)
        new[donor.role] -= len(ids)
        new[short.role] = new.get(short.role, 0) + len(ids)
        shown = ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")
        reason = f"{head}; {because}; flip {shown} {donor.name} -> {short.name}"
        return PoolDecision(Action.FLIP, loop, new, reason, flip_worker_id=ids[0],
                            flip_to_role=short.role, flip_worker_ids=ids)

    def _rebalance(self, short: RoleView, donor: RoleView,
                   targets: dict[WorkerRole, int]) -> tuple[int, str]:
        """The donor has no spare: how many workers ``short`` takes anyway, and why. Only when
        its measured attainment misses the SLO; then the two roles split their workers in
        proportion to what each needs (predictive), or one worker goes to the role further
        from its SLO (reactive)."""
        if short.short is None:
            return 0, (f"no other role has slack, and {short.name} meets its slo (measured "
                       f"attainment vetoes a flip on the forecast alone)")
        total = targets[short.role] + targets[donor.role]
        if short.desired is not None and donor.desired is not None:
            assert short.steady is not None and donor.steady is not None, "set with desired"
            ideal = split_share(total, (short.steady, short.desired),
                                (donor.steady, donor.desired))
            return ideal - targets[short.role], (
                f"{donor.name} has no slack; both short ({short.name} needs {short.steady}, "
                f"{short.desired} with its backlog; {donor.name} {donor.steady}, "
                f"{donor.desired}): split {total} workers, {short.name} {ideal}")
        if short.severity > donor.severity:
            return 1, (f"{donor.name} has no slack; {short.name} is further from its slo "
                       f"({short.severity:.2f} > {donor.severity:.2f})")
        return 0, (f"no other role has slack, and {donor.name} is as far from its slo "
                   f"({donor.severity:.2f} >= {short.severity:.2f})")

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

    def _none(self, inp: TickInput, reason: str) -> PoolDecision:
        return PoolDecision(Action.NONE, self.config.loop, dict(inp.targets), reason)


def _fmt(targets: dict[WorkerRole, int]) -> str:
    return "{" + ", ".join(f"{r.value}: {n}" for r, n in targets.items()) + "}"
