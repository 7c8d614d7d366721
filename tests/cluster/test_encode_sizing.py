"""The encode pool's load-based sizing: the rule alone, and through the planner loop."""

from __future__ import annotations

import dataclasses

from test_planner_adapter import FakeCore, FakeEtcd, FakeStore

from scission.cluster.planner.adapter import PlannerLoop
from scission.cluster.planner.encode_sizing import EncodeSizer, EncodeSizingConfig
from scission.cluster.planner.types import Action, Loop, PoolDecision
from scission.registry.pools import PoolTargets, TargetWriter
from scission.registry.workers import RegistryConfig, WorkerInfo, WorkerRole, WorkerStatsRecord

CFG = EncodeSizingConfig(high_queue_per_worker=4.0, low_queue_per_worker=0.25,
                         window_ticks=3, cooldown_s=30.0)


def test_scales_up_after_a_full_window_of_high_queues_then_cools_down():
    sizer = EncodeSizer(CFG)
    # per-worker means: (6+2)/2 = 4, (5+5)/2 = 5, (4+3)/2 = 3.5 -> window mean 12.5/3 > 4
    assert sizer.on_tick(0.0, 2, [6, 2], 4, held=False) is None
    assert sizer.on_tick(5.0, 2, [5, 5], 4, held=False) is None
    up = sizer.on_tick(10.0, 2, [4, 3], 4, held=False)
    assert up is not None and up.target == 3 and "4.2 images/worker" in up.reason
    for t in (15.0, 20.0, 25.0, 35.0):  # a new window fills, but the cooldown holds it
        assert sizer.on_tick(t, 3, [9, 9, 9], 4, held=False) is None
    assert sizer.on_tick(40.0, 3, [9, 9, 9], 4, held=False).target == 4


def test_scales_down_only_when_every_sample_is_low_and_never_below_one():
    sizer = EncodeSizer(CFG)
    assert [sizer.on_tick(t, 2, q, 4, held=False) for t, q in
            ((0.0, [0, 0]), (5.0, [1, 0]), (10.0, [0, 0]))] == [None, None, None]  # 0.5 > 0.25
    sizer = EncodeSizer(CFG)
    decisions = [sizer.on_tick(t, 2, [0, 0], 4, held=False) for t in (0.0, 5.0, 10.0)]
    assert decisions[:2] == [None, None] and decisions[2].target == 1
    sizer = EncodeSizer(CFG)
    assert all(sizer.on_tick(t, 1, [0], 4, held=False) is None for t in (0.0, 5.0, 10.0))


def test_no_pool_no_budget_or_a_hold_keep_the_target():
    for target, queued, budget, held in ((0, [], 4, False), (2, [9, 9], 0, False),
                                         (2, [9, 9], 4, True)):
        sizer = EncodeSizer(CFG)
        assert all(sizer.on_tick(t, target, queued, budget, held) is None
                   for t in (0.0, 5.0, 10.0))


class EncodeDirectory:
    """Two encode workers whose published stats say ``queued`` images each."""

    def __init__(self, queued: int) -> None:
        self.queued = queued

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(worker_id=f"encode-{i}", role=WorkerRole.ENCODE, endpoint="x:1",
                           agent_name="a", agent_metadata=b"", kv_layout=b"", num_blocks=1,
                           block_size=16, model_id="m", started_at_s=0.0) for i in range(2)]

    def stats(self, worker_id: str) -> WorkerStatsRecord:
        return WorkerStatsRecord(num_free_blocks=1, num_running=0, num_waiting=0,
                                 queued_prefill_tokens=0, updated_at_s=0.0,
                                 num_encode_waiting=self.queued)


def test_planner_loop_adds_an_encode_worker_when_the_queue_stays_high():
    """Through ``PlannerLoop.tick_once`` with a core that decides nothing: the third tick of
    8 queued images per encoder raises the encode target 2 -> 3 (compare-and-swap, writer
    PLANNER, prefill/decode untouched) and records the decision."""
    targets = PoolTargets(prefill=1, decode=1, encode=2)
    store = FakeStore(targets)
    core = FakeCore(PoolDecision(Action.NONE, Loop.PREDICTIVE, targets.as_dict(), "steady"))
    core.config = dataclasses.make_dataclass("C", [("max_workers", int)])(8)
    loop = PlannerLoop(core, store, EncodeDirectory(8), FakeEtcd(), RegistryConfig(),
                       interval_s=10.0, pending=lambda t: False,
                       encode_sizer=EncodeSizer(dataclasses.replace(CFG, cooldown_s=0.0)))
    for _ in range(3):
        loop.tick_once()
    assert (store.targets.prefill, store.targets.decode, store.targets.encode) == (1, 1, 3)
    assert store.targets.writer is TargetWriter.PLANNER
    (decision,) = store.decisions
    assert decision.action == "scale_up" and decision.loop == "encode-queue" and decision.applied
