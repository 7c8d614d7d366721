"""The operator's changes to ``PoolTargets``: build them (stamped ``TargetWriter.OPERATOR``
with a hold), check them, and write them with compare-and-swap (``PoolStore.write_targets``
with the revision read; on a lost race the change is re-applied to what won).

Used by ``scission pools scale|drain|flip`` (``pools_cli.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from scission.registry.directory import WorkerDirectory
from scission.registry.pools import PoolStore, PoolTargets, TargetWriter
from scission.registry.workers import WorkerRole

logger = logging.getLogger(__name__)

CAS_ATTEMPTS = 5  # target writes tried before giving up on a busy key
PREFILL_CAPABLE = (WorkerRole.PREFILL, WorkerRole.COLOCATED)
DECODE_CAPABLE = (WorkerRole.DECODE, WorkerRole.COLOCATED)

Change = Callable[[PoolTargets | None], PoolTargets]  # current (None = unset) -> new
Write = Callable[[PoolTargets, int], bool]  # (new, expected revision) -> False if it lost


class TargetsRefused(ValueError):
    """The new targets are invalid (nothing was written)."""


class TargetsConflict(RuntimeError):
    """Every compare-and-swap lost a race (nothing was written)."""


def running_counts(directory: WorkerDirectory) -> dict[WorkerRole, int]:
    """role -> registered workers that are not draining."""
    counts = dict.fromkeys(WorkerRole, 0)
    for info in directory.workers():
        counts[info.role] += 0 if info.draining else 1
    return counts


def operator_targets(current: PoolTargets | None, running: dict[WorkerRole, int],
                     deltas: dict[WorkerRole, int], absolute: dict[WorkerRole, int],
                     reason: str, hold_s: float) -> PoolTargets:
    """``current`` (or, if none is recorded, the running workers) with ``absolute`` counts
    set and ``deltas`` added (floored at 0), stamped as the operator's and held ``hold_s``
    seconds from now (0 = no hold)."""
    now_s = time.time()
    base = current if current is not None else PoolTargets(
        prefill=running[WorkerRole.PREFILL], decode=running[WorkerRole.DECODE],
        colocated=running[WorkerRole.COLOCATED], encode=running[WorkerRole.ENCODE])
    counts = {role: base.get(role) for role in WorkerRole} | absolute
    for role, delta in deltas.items():
        counts[role] = max(0, counts[role] + delta)
    return replace(base, **{role.value: n for role, n in counts.items()},
                   writer=TargetWriter.OPERATOR, reason=reason, written_at_s=now_s,
                   hold_until_s=now_s + hold_s if hold_s > 0 else 0.0)


def check_targets(old: PoolTargets | None, new: PoolTargets, max_workers: int | None) -> None:
    """Raise TargetsRefused for targets without a prefill-capable or a decode-capable worker,
    or growing to more than ``max_workers`` in total (None = no limit)."""
    counts = targets_text(new)
    if new.prefill + new.colocated == 0:
        raise TargetsRefused(f"refused: targets {counts} leave no prefill-capable worker "
                             "(prefill or colocated)")
    if new.decode + new.colocated == 0:
        raise TargetsRefused(f"refused: targets {counts} leave no decode-capable worker "
                             "(decode or colocated)")
    if max_workers is not None and new.total > max_workers and \
            new.total > (old.total if old is not None else 0):
        raise TargetsRefused(f"refused: {new.total} workers in total is above the cluster's "
                             f"max workers ({max_workers})")


def update_targets(store: PoolStore, change: Change, max_workers: int | None,
                   write: Write | None = None,
                   attempts: int = CAS_ATTEMPTS) -> tuple[PoolTargets | None, PoolTargets]:
    """Read, ``change``, check and compare-and-swap the targets; on a lost race re-read and
    apply ``change`` to what won. Returns (before, after).

    ``write(new, revision)`` does the conditional write (default ``store.write_targets``; a
    drain or flip writes its command in the same transaction)."""
    if write is None:
        write = lambda new, revision: store.write_targets(new, expected_revision=revision)  # noqa: E731
    for attempt in range(1, attempts + 1):
        current, revision = store.read_targets()
        new = change(current)
        check_targets(current, new, max_workers)
        if write(new, revision):
            return current, new
        logger.info("targets changed since revision %d (try %d/%d); re-reading",
                    revision, attempt, attempts)
    raise TargetsConflict(f"the targets changed under each of {attempts} writes (planner or "
                          "another operator); nothing written, try again")


def targets_text(targets: PoolTargets | None) -> str:
    """``prefill=2 decode=1`` (roles with a target > 0), ``none`` if unset."""
    if targets is None:
        return "none"
    return " ".join(f"{role.value}={n}" for role, n in targets.as_dict().items()) or "all 0"


def hold_text(targets: PoolTargets) -> str:
    if not targets.hold_until_s:
        return "no hold: the planner (mode auto) may change them"
    until = time.strftime("%H:%M:%S", time.localtime(targets.hold_until_s))
    return (f"held {targets.hold_until_s - targets.written_at_s:.0f} s: the planner changes "
            f"no targets before {until}")
