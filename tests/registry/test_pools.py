"""PoolStore against a real etcd: typed records, compare-and-swap, one-revision snapshots."""

from __future__ import annotations

import pytest

from scission.registry.pools import (
    MAX_DECISIONS_KEPT,
    CommandKind,
    CommandState,
    PlannerControl,
    PlannerDecision,
    PlannerMode,
    PoolStore,
    PoolTargets,
    TargetWriter,
)
from scission.registry.workers import RegistryConfig, WorkerRole


@pytest.fixture
def store(etcd_client, etcd_prefix) -> PoolStore:
    return PoolStore(etcd_client, RegistryConfig(prefix=etcd_prefix))


def test_targets_compare_and_swap(store):
    """A write with a stale revision changes nothing and says so; a current one lands."""
    assert store.read_targets() == (None, 0)
    assert store.write_targets(PoolTargets(prefill=1, decode=1), expected_revision=0)
    targets, revision = store.read_targets()
    assert (targets.prefill, targets.decode, targets.writer) == (1, 1, TargetWriter.INITIAL)
    two = PoolTargets(prefill=1, decode=2, writer=TargetWriter.OPERATOR, hold_until_s=5.0)
    assert store.write_targets(two, revision)
    assert not store.write_targets(PoolTargets(prefill=3, decode=3), revision)  # stale
    assert store.read_targets()[0] == two
    assert two.held(4.0) and not two.held(5.0)
    assert two.as_dict() == {WorkerRole.PREFILL: 1, WorkerRole.DECODE: 2}


def test_command_with_targets_is_one_transaction(store):
    """A command written with targets appears with them in one snapshot, or not at all when
    the targets moved meanwhile."""
    store.write_targets(PoolTargets(prefill=2, decode=1))
    _, revision = store.read_targets()
    flipped = PoolTargets(prefill=1, decode=2, writer=TargetWriter.OPERATOR)
    command = store.submit_command(CommandKind.FLIP, "prefill-1", WorkerRole.DECODE,
                                   targets=flipped, expected_revision=revision)
    assert command is not None and command.state is CommandState.PENDING
    targets, _, commands = store.snapshot()
    assert targets == flipped and commands == [command]
    stale = store.submit_command(CommandKind.DRAIN, "decode-0",
                                 targets=PoolTargets(prefill=1, decode=1),
                                 expected_revision=revision)
    assert stale is None
    assert store.snapshot()[2] == [command]


def test_control_and_decisions_are_kept_bounded(store):
    """The control record and the last tick round-trip; only the newest MAX_DECISIONS_KEPT
    decisions stay."""
    assert store.read_control() is None
    store.write_control(PlannerControl(mode=PlannerMode.AUTO, paused=True, updated_at_s=1.0))
    assert store.read_control() == PlannerControl(PlannerMode.AUTO, True, 1.0)
    for i in range(MAX_DECISIONS_KEPT + 3):
        store.append_decision(PlannerDecision(at_s=float(i), action="scale_up", loop="reactive",
                                              reason=f"r{i}", mode=PlannerMode.AUTO,
                                              applied=True, prefill=1, decode=i))
    assert store.read_last_tick() is None
    store.write_last_tick(PlannerDecision(at_s=7.0, action="none", loop="predictive",
                                          reason="no change", mode=PlannerMode.AUTO,
                                          applied=False, prefill=1, decode=1))
    assert store.read_last_tick().reason == "no change"
    newest = store.decisions(limit=100)
    assert len(newest) == MAX_DECISIONS_KEPT
    assert [d.reason for d in newest[-2:]] == [f"r{MAX_DECISIONS_KEPT + 1}",
                                               f"r{MAX_DECISIONS_KEPT + 2}"]
