"""The planner adapter's side of a decision (``cluster/planner/adapter.py``) against a store
double: a flip of several workers as one FLIP command per worker, each written with targets that
count it, and the shape fields of several routers' windows combined."""

from __future__ import annotations

import dataclasses

import pytest

from scission.cluster.planner.adapter import PlannerLoop, combine_windows
from scission.cluster.planner.types import Action, Loop, PoolDecision, TickInput
from scission.registry.metrics import SloWindow
from scission.registry.pools import (
    CommandKind,
    PlannerControl,
    PlannerDecision,
    PlannerMode,
    PoolTargets,
    TargetWriter,
)
from scission.registry.workers import RegistryConfig, WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


class FakeStore:
    """``PoolStore``'s targets and commands in memory: each write bumps the revision; a write
    with ``expected_revision`` is a compare-and-swap. ``race_after`` = the number of command
    writes after which another writer changes the targets."""

    def __init__(self, targets: PoolTargets, race_after: int | None = None) -> None:
        self.targets, self.revision = targets, 1
        self.commands: list[tuple[str, WorkerRole, PoolTargets]] = []  # worker, role, targets
        self.decisions: list[PlannerDecision] = []
        self.race_after = race_after

    def read_control(self) -> PlannerControl:
        return PlannerControl(mode=PlannerMode.AUTO)

    def snapshot(self) -> tuple[PoolTargets, int, list]:
        return self.targets, self.revision, []

    def read_targets(self) -> tuple[PoolTargets, int]:
        return self.targets, self.revision

    def write_targets(self, targets: PoolTargets, expected_revision: int | None = None) -> bool:
        if expected_revision is not None and expected_revision != self.revision:
            return False
        self.targets, self.revision = targets, self.revision + 1
        return True

    def submit_command(self, kind: CommandKind, worker_id: str, to_role: WorkerRole, *,
                       writer: TargetWriter, reason: str, targets: PoolTargets,
                       expected_revision: int) -> object | None:
        assert kind is CommandKind.FLIP and writer is TargetWriter.PLANNER
        if expected_revision != self.revision:
            return None
        self.commands.append((worker_id, to_role, targets))
        self.targets, self.revision = targets, self.revision + 1
        if self.race_after is not None and len(self.commands) == self.race_after:
            self.write_targets(dataclasses.replace(targets, writer=TargetWriter.OPERATOR))
        return object()

    def append_decision(self, decision: PlannerDecision) -> None:
        self.decisions.append(decision)

    def write_last_tick(self, decision: PlannerDecision) -> None:
        self.last_tick = decision


class FakeCore:
    def __init__(self, decision: PoolDecision) -> None:
        self.decision = decision

    def on_tick(self, inp: TickInput) -> PoolDecision:
        return self.decision


class FakeDirectory:
    def workers(self) -> list:
        return []


class FakeEtcd:
    def get_prefix(self, prefix: str) -> list:
        return []


def make_loop(decision: PoolDecision, store: FakeStore) -> PlannerLoop:
    return PlannerLoop(FakeCore(decision), store, FakeDirectory(), FakeEtcd(), RegistryConfig(),
                       interval_s=10.0, pending=lambda targets: False)


def flip(targets: dict[WorkerRole, int], ids: tuple[str, ...]) -> PoolDecision:
    return PoolDecision(Action.FLIP, Loop.PREDICTIVE, targets, "flip", flip_worker_id=ids[0],
                        flip_to_role=P, flip_worker_ids=ids)


def test_flip_of_three_workers_writes_one_command_each_with_its_targets():
    """2P:6D → 5P:3D by flipping d1, d2, d3: three FLIP commands, the i-th written with the
    targets after i flips (3:5, 4:4, 5:3), each a compare-and-swap on the last revision; the
    decision record lists every worker."""
    store = FakeStore(PoolTargets(prefill=2, decode=6))
    decision = make_loop(flip({P: 5, D: 3}, ("d1", "d2", "d3")), store).tick_once()
    assert decision is not None and decision.action is Action.FLIP
    assert [(w, r, t.prefill, t.decode) for w, r, t in store.commands] == [
        ("d1", P, 3, 5), ("d2", P, 4, 4), ("d3", P, 5, 3)]
    assert all(t.writer is TargetWriter.PLANNER for _, _, t in store.commands)
    assert (store.targets.prefill, store.targets.decode, store.revision) == (5, 3, 4)
    assert store.decisions[0].applied and store.decisions[0].flip_worker_id == "d1,d2,d3"


def test_flip_with_new_workers_writes_the_decision_targets_last():
    """2P:5D with a budget of 8 → 4P:4D: one new prefill worker and one flip (d1). The one
    command carries the decision's targets (the flip and the new worker together)."""
    store = FakeStore(PoolTargets(prefill=2, decode=5))
    make_loop(flip({P: 4, D: 4}, ("d1",)), store).tick_once()
    assert [(w, t.prefill, t.decode) for w, _, t in store.commands] == [("d1", 4, 4)]


def test_concurrent_writer_stops_the_remaining_flips():
    """Another writer changes the targets right after the first command: the second
    compare-and-swap fails, nothing more is written, the first flip stands (applied)."""
    store = FakeStore(PoolTargets(prefill=2, decode=6), race_after=1)
    make_loop(flip({P: 5, D: 3}, ("d1", "d2", "d3")), store).tick_once()
    assert [(w, t.prefill, t.decode) for w, _, t in store.commands] == [("d1", 3, 5)]
    assert store.targets.writer is TargetWriter.OPERATOR
    assert store.decisions[0].applied


def make_window(router_id: str, **fields: float) -> SloWindow:
    base = dict(router_id=router_id, scope="cluster", window_s=60.0, updated_at_s=0.0,
                slo_ttft_ms=1000.0, slo_tpot_ms=100.0, num_arrivals=100, num_finished=100,
                num_failed=0, arrival_rps=2.0, mean_prompt_tokens=100.0,
                mean_output_tokens=10.0, queue_p90_ms=1.0, ttft_p50_ms=1.0, ttft_p90_ms=1.0,
                tpot_p50_ms=1.0, tpot_p90_ms=1.0, itl_p90_ms=1.0, e2e_p90_ms=1.0,
                ttft_attainment=1.0, tpot_attainment=1.0, attainment=1.0, goodput_rps=2.0)
    return SloWindow(**{**base, **fields})


def test_combine_windows_shape_fields():
    """Two routers: recent rates add up (1 + 3 rps), arrival means are weighted by recent
    arrivals (10 at 100 tokens, 30 at 300: 250; rms sqrt((10·100² + 30·300²) / 40) = 264.6),
    the recent output by recent finishes (1 at 10, 3 at 50: 40)."""
    a = make_window("a", shape_window_s=10.0, num_recent_arrivals=10, recent_arrival_rps=1.0,
                    arrival_mean_prompt_tokens=100.0, arrival_rms_prompt_tokens=100.0,
                    arrival_mean_max_tokens=20.0, num_recent_finished=1,
                    recent_mean_output_tokens=10.0)
    b = make_window("b", shape_window_s=10.0, num_recent_arrivals=30, recent_arrival_rps=3.0,
                    arrival_mean_prompt_tokens=300.0, arrival_rms_prompt_tokens=300.0,
                    arrival_mean_max_tokens=40.0, num_recent_finished=3,
                    recent_mean_output_tokens=50.0)
    obs = combine_windows([a, b])
    assert obs is not None
    assert (obs.num_recent_arrivals, obs.recent_arrival_rps) == (40, 4.0)
    assert obs.arrival_mean_prompt_tokens == 250.0
    assert obs.arrival_rms_prompt_tokens == pytest.approx((280000.0 / 4.0) ** 0.5)
    assert obs.arrival_mean_max_tokens == 35.0
    assert (obs.num_recent_finished, obs.recent_mean_output_tokens) == (4, 40.0)
    old = combine_windows([make_window("c")])  # a router without the shape fields
    assert old is not None and (old.num_recent_arrivals, old.arrival_mean_prompt_tokens) == (0, 0)


def overloaded_window(arrival_rps: float) -> SloWindow:
    """A router under overload: requests arrive (100-token prompts, max_tokens 40) and none
    finished within the window."""
    return make_window(
        "r", num_arrivals=int(arrival_rps * 60), num_finished=0, arrival_rps=arrival_rps,
        mean_prompt_tokens=0.0, mean_output_tokens=0.0, ttft_attainment=0.0,
        tpot_attainment=0.0, attainment=0.0, goodput_rps=0.0, shape_window_s=20.0,
        num_recent_arrivals=int(arrival_rps * 20), recent_arrival_rps=arrival_rps,
        arrival_mean_prompt_tokens=100.0, arrival_rms_prompt_tokens=100.0,
        arrival_mean_max_tokens=40.0)


def test_combine_windows_with_nothing_finished():
    """Arrivals but no finish: an observation (rate and shape; the per-finish fields 0), not
    None; a window with no request at all still gives None."""
    obs = combine_windows([overloaded_window(15.0), overloaded_window(5.0)])
    assert obs is not None
    assert (obs.num_finished, obs.arrival_rps, obs.attainment, obs.ttft_p90_ms) == (0, 20.0, 0, 0)
    assert (obs.num_recent_arrivals, obs.arrival_mean_prompt_tokens) == (400, 100.0)
    idle = make_window("idle", num_arrivals=0, num_finished=0, arrival_rps=0.0)
    assert combine_windows([idle]) is None
    assert combine_windows([]) is None


def test_planner_sizes_pools_when_nothing_finishes():
    """Overload in which no request finishes within the window: the planner is no longer blind.
    Same load and sizing as ``test_step_up_predictive_within_scale_up_ticks`` (15 rps →
    prefill 2, decode ceil(15 / 8.17) = 2) from the arrivals alone, scale_up_ticks (2) ticks
    after the load appears; the reactive loop stays off (attainment unknown: cold)."""
    from planner_helpers import MODEL, SimCluster, changes, make_config, run

    from scission.cluster.planner.core import PlannerCore

    core = PlannerCore(make_config(), MODEL)
    decisions = run(core, SimCluster({P: 1, D: 1}), [15.0] * 5,
                    slo=lambda i, load: combine_windows([overloaded_window(load)]))
    assert changes(decisions) == [(1, Action.SCALE_UP, {P: 2, D: 2})]
    assert decisions[1].loop is Loop.PREDICTIVE
    assert "forecast 15.00 rps (prompt 100 (arrivals), output 40 (max_tokens))" in \
        decisions[1].reason
