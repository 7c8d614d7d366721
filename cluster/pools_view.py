"""What ``scission pools`` and ``scission planner status`` show: one read of etcd (targets,
workers and their stats, the routers' SLO windows, the planner's control, decisions and the
open commands) into a ``PoolsSnapshot``, printed as tables (tabulate) or as one JSON object.

Several routers each publish their own ``SloWindow`` per scope; ``merge_windows`` adds their
rates and weights their percentiles and attainment by finished requests (exact with one
router, an approximation with more: percentiles do not add).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from dataclasses import dataclass

import etcd3
from tabulate import tabulate

from scission.registry.directory import WorkerDirectory
from scission.registry.metrics import SCOPE_CLUSTER, SloWindow, slo_prefix
from scission.registry.pools import (
    CommandKind,
    PlannerControl,
    PlannerDecision,
    PoolStore,
    PoolTargets,
    WorkerCommand,
)
from scission.registry.records import Record
from scission.registry.workers import WorkerInfo, WorkerRole

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SloSummary:
    """One scope's SLO window, merged over the routers that publish it."""

    scope: str
    num_routers: int
    window_s: float
    num_arrivals: int
    num_finished: int
    arrival_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    attainment: float  # 0..1, TTFT and TPOT both within the SLO
    goodput_rps: float
    slo_ttft_ms: float
    slo_tpot_ms: float


def _weighted(windows: list[SloWindow], name: str, weights: list[int]) -> float:
    total = sum(weights)
    if total == 0:
        return sum(getattr(w, name) for w in windows) / len(windows)
    return sum(getattr(w, name) * n for w, n in zip(windows, weights, strict=True)) / total


def merge_windows(windows: list[SloWindow]) -> SloSummary | None:
    """The routers' windows of one scope as one summary; None if there are none."""
    if not windows:
        return None
    finished = [w.num_finished for w in windows]
    arrivals = [w.num_arrivals for w in windows]
    by_finished = {name: _weighted(windows, name, finished) for name in (
        "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "attainment")}
    return SloSummary(
        scope=windows[0].scope, num_routers=len(windows),
        window_s=max(w.window_s for w in windows), num_arrivals=sum(arrivals),
        num_finished=sum(finished), arrival_rps=sum(w.arrival_rps for w in windows),
        mean_prompt_tokens=_weighted(windows, "mean_prompt_tokens", arrivals),
        mean_output_tokens=_weighted(windows, "mean_output_tokens", arrivals),
        goodput_rps=sum(w.goodput_rps for w in windows),
        slo_ttft_ms=windows[0].slo_ttft_ms, slo_tpot_ms=windows[0].slo_tpot_ms, **by_finished)


def read_slo(client: etcd3.MultiEndpointEtcd3Client, prefix: str) -> dict[str, SloSummary]:
    """scope -> merged SLO window of every router publishing under ``prefix``."""
    by_scope: dict[str, list[SloWindow]] = {}
    for value, meta in client.get_prefix(slo_prefix(prefix)):
        try:
            window = SloWindow.from_bytes(value)
        except ValueError as exc:
            logger.warning("ignoring malformed SLO window at %r: %s", meta.key, exc)
            continue
        by_scope.setdefault(window.scope, []).append(window)
    merged = {scope: merge_windows(ws) for scope, ws in sorted(by_scope.items())}
    return {scope: s for scope, s in merged.items() if s is not None}


@dataclass(frozen=True)
class PoolRow:
    """One role's pool: its target, its workers' load, the SLO of the requests it served."""

    role: WorkerRole
    target: int | None  # None = no targets recorded
    workers: list[str]  # registered, not draining
    draining_workers: list[str]
    num_waiting: int | None  # None = no worker of the pool published stats yet
    queued_prefill_tokens: int | None
    kv_used_blocks: int | None
    kv_total_blocks: int
    slo: SloSummary | None  # the role's scope, else the cluster's

    @property
    def kv_usage_pct(self) -> float | None:
        if self.kv_used_blocks is None or self.kv_total_blocks == 0:
            return None
        return 100.0 * self.kv_used_blocks / self.kv_total_blocks


def _load(directory: WorkerDirectory, infos: list[WorkerInfo]) -> dict[str, int | None]:
    """Summed stats of ``infos`` (the workers that published stats): waiting requests, queued
    prefill tokens, KV blocks used and total. None = no worker published stats yet."""
    pairs = [(w, s) for w in infos if (s := directory.stats(w.worker_id)) is not None]
    if not pairs:
        return {"num_waiting": None, "queued_prefill_tokens": None, "kv_used_blocks": None,
                "kv_total_blocks": 0}
    return {"num_waiting": sum(s.num_waiting for _, s in pairs),
            "queued_prefill_tokens": sum(s.queued_prefill_tokens for _, s in pairs),
            "kv_used_blocks": sum(w.num_blocks - s.num_free_blocks for w, s in pairs),
            "kv_total_blocks": sum(w.num_blocks for w, _ in pairs)}


def pool_rows(directory: WorkerDirectory, targets: PoolTargets | None,
              slo: dict[str, SloSummary]) -> list[PoolRow]:
    """A row per role that has a target > 0 or a registered worker, in WorkerRole order."""
    rows = []
    for role in WorkerRole:
        infos = directory.workers(role)
        target = targets.get(role) if targets is not None else None
        if not infos and not target:
            continue
        rows.append(PoolRow(
            role=role, target=target,
            workers=[w.worker_id for w in infos if not w.draining],
            draining_workers=[w.worker_id for w in infos if w.draining],
            slo=slo.get(role.value, slo.get(SCOPE_CLUSTER)), **_load(directory, infos)))
    return rows


@dataclass(frozen=True)
class PoolsSnapshot:
    prefix: str
    at_s: float  # wall clock of the read
    targets: PoolTargets | None
    pools: list[PoolRow]
    slo: dict[str, SloSummary]  # scope -> merged window
    control: PlannerControl | None  # None = never set (the planner is off)
    decisions: list[PlannerDecision]  # oldest first
    commands: list[WorkerCommand]  # pending or running, oldest first


def take_snapshot(client: etcd3.MultiEndpointEtcd3Client, store: PoolStore, prefix: str,
                  directory: WorkerDirectory, num_decisions: int = 5) -> PoolsSnapshot:
    """Read everything ``scission pools`` shows (raises etcd errors)."""
    targets, _ = store.read_targets()
    slo = read_slo(client, prefix)
    return PoolsSnapshot(
        prefix=prefix, at_s=time.time(), targets=targets,
        pools=pool_rows(directory, targets, slo), slo=slo, control=store.read_control(),
        decisions=store.decisions(num_decisions) if num_decisions > 0 else [],
        commands=[c for c in store.commands() if not c.finished])


# -- JSON -----------------------------------------------------------------------------------
def record_dict(record: Record | SloSummary) -> dict:
    """A record's fields with enums by value (what ``--json`` prints)."""
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _plain(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.hex()
    return value


def targets_dict(targets: PoolTargets | None, now_s: float) -> dict | None:
    if targets is None:
        return None
    return {**record_dict(targets), "total": targets.total, "held": targets.held(now_s)}


def control_dict(control: PlannerControl | None, decisions: list[PlannerDecision]) -> dict:
    control = control if control is not None else PlannerControl()
    return {**record_dict(control), "decisions": [record_dict(d) for d in decisions]}


def snapshot_dict(snap: PoolsSnapshot) -> dict:
    pools = [{
        "role": row.role.value, "target": row.target, "running": len(row.workers),
        "draining": len(row.draining_workers), "workers": row.workers,
        "draining_workers": row.draining_workers, "num_waiting": row.num_waiting,
        "queued_prefill_tokens": row.queued_prefill_tokens,
        "kv_used_blocks": row.kv_used_blocks, "kv_total_blocks": row.kv_total_blocks,
        "kv_usage_pct": row.kv_usage_pct, "slo_scope": row.slo.scope if row.slo else None,
        **{name: getattr(row.slo, name) if row.slo else None for name in (
            "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "attainment",
            "arrival_rps")},
    } for row in snap.pools]
    return {
        "prefix": snap.prefix, "at_s": snap.at_s, "targets": targets_dict(snap.targets, snap.at_s),
        "pools": pools, "slo": {scope: record_dict(s) for scope, s in snap.slo.items()},
        "planner": control_dict(snap.control, snap.decisions),
        "commands": [record_dict(c) for c in snap.commands],
    }


# -- text -----------------------------------------------------------------------------------
def _num(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _pair(a: float | None, b: float | None) -> str:
    return "-" if a is None else f"{_num(a)} / {_num(b)}"


def _clock(at_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at_s))


def targets_line(targets: PoolTargets | None, now_s: float) -> str:
    if targets is None:
        return "targets: none recorded (the controller writes them at start)"
    counts = " ".join(f"{role.value}={n}" for role, n in targets.as_dict().items()) or "none"
    hold = ""
    if targets.held(now_s):
        hold = (f", held until {_clock(targets.hold_until_s)}, "
                f"{targets.hold_until_s - now_s:.0f} s left")
    reason = f": {targets.reason}" if targets.reason else ""
    return f"targets: {counts}  (by {targets.writer.value}{hold}{reason})"


def pools_table(rows: list[PoolRow]) -> str:
    headers = ["ROLE", "TARGET", "RUNNING", "DRAINING", "QUEUE REQ/TOK", "KV USE",
               "TTFT P50/P90 MS", "TPOT P50/P90 MS", "ATTAIN", "REQ/S", "SLO SCOPE"]
    table = [[
        row.role.value, _num(row.target, "d"), len(row.workers), len(row.draining_workers),
        "-" if row.num_waiting is None else f"{row.num_waiting} / {row.queued_prefill_tokens}",
        "-" if row.kv_usage_pct is None else f"{row.kv_usage_pct:.1f}%",
        _pair(row.slo and row.slo.ttft_p50_ms, row.slo and row.slo.ttft_p90_ms),
        _pair(row.slo and row.slo.tpot_p50_ms, row.slo and row.slo.tpot_p90_ms),
        "-" if row.slo is None else f"{100 * row.slo.attainment:.0f}%",
        "-" if row.slo is None else f"{row.slo.arrival_rps:.2f}",
        "-" if row.slo is None else row.slo.scope,
    ] for row in rows]
    return tabulate(table, headers, tablefmt="plain", disable_numparse=True)


def planner_line(control: PlannerControl | None, slo: SloSummary | None) -> str:
    control = control if control is not None else PlannerControl()
    slos = "" if slo is None else f"  SLO: TTFT <= {slo.slo_ttft_ms:.0f} ms, " \
                                  f"TPOT <= {slo.slo_tpot_ms:.0f} ms"
    return f"planner: mode={control.mode.value} paused={'yes' if control.paused else 'no'}{slos}"


def decisions_table(decisions: list[PlannerDecision]) -> str:
    if not decisions:
        return "  (no decisions yet)"
    table = [[_clock(d.at_s), d.mode.value, d.loop, d.action, "yes" if d.applied else "no",
              f"prefill={d.prefill} decode={d.decode}"
              + (f" flip {d.flip_worker_id}->{d.flip_to_role}" if d.flip_worker_id else ""),
              d.reason] for d in decisions]
    return tabulate(table, ["AT", "MODE", "LOOP", "ACTION", "APPLIED", "TARGETS", "REASON"],
                    tablefmt="plain", disable_numparse=True)


def commands_table(commands: list[WorkerCommand], now_s: float) -> str:
    if not commands:
        return "  (none pending or running)"
    table = [[c.command_id, c.kind.value, c.worker_id,
              c.to_role.value if c.kind is CommandKind.FLIP else "-", c.state.value,
              f"{now_s - c.issued_at_s:.0f} s", c.message] for c in commands]
    return tabulate(table, ["ID", "KIND", "WORKER", "TO", "STATE", "AGE", "MESSAGE"],
                    tablefmt="plain", disable_numparse=True)


def render(snap: PoolsSnapshot) -> str:
    """The text of ``scission pools``."""
    return "\n".join([
        targets_line(snap.targets, snap.at_s), "", pools_table(snap.pools), "",
        planner_line(snap.control, snap.slo.get(SCOPE_CLUSTER)), "last decisions:",
        decisions_table(snap.decisions), "", "commands:", commands_table(snap.commands, snap.at_s),
    ])
