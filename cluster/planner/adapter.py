"""The planner's adapter: etcd in, ``PlannerCore.on_tick`` out, decisions applied (AUTO).

Every ``interval_s``: read the planner control (mode, paused), the pool targets and commands,
the workers and their stats (forward-pass steps -> ``ForwardSample``), and the routers'
cluster-scope ``SloWindow``\\ s; build a ``TickInput`` on the wall clock; ask the core. A
decision other than NONE is recorded (``PoolStore.append_decision``) in ADVISORY and AUTO
modes; in AUTO it is applied: scale = new targets (compare-and-swap, writer PLANNER), flip of
k workers = k FLIP commands, each in one transaction with the targets that count it (see
``_apply_flips``). An operator's hold
(``PoolTargets.hold_until_s``) reaches the core, which then keeps the targets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable

from scission.cluster.planner.core import PlannerCore
from scission.cluster.planner.encode_sizing import EncodeSizer
from scission.cluster.planner.types import (
    Action,
    ForwardSample,
    PoolDecision,
    SloObservation,
    TickInput,
    WorkerObservation,
)
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.registry.metrics import SCOPE_CLUSTER, SloWindow, slo_prefix
from scission.registry.pools import (
    CommandKind,
    PlannerControl,
    PlannerDecision,
    PlannerMode,
    PoolStore,
    PoolTargets,
    TargetWriter,
)
from scission.registry.workers import RegistryConfig, WorkerRole

logger = logging.getLogger(__name__)


class PlannerLoop:
    """Runs the core every ``interval_s`` on a thread; ``tick_once`` is one iteration."""

    def __init__(self, core: PlannerCore, store: PoolStore, directory: WorkerDirectory,
                 etcd, registry: RegistryConfig, interval_s: float,
                 pending: Callable[[PoolTargets], bool],
                 encode_sizer: EncodeSizer | None = None) -> None:
        """``pending(targets)``: the controller has not reached ``targets`` yet.
        ``encode_sizer``: sizes the encode pool from its queue on ticks without a core
        decision (``encode_sizing``; None = a default one)."""
        self.core = core
        self.store = store
        self.directory = directory
        self._etcd = etcd
        self._slo_prefix = slo_prefix(registry.prefix)
        self.interval_s = interval_s
        self._pending = pending
        self.encode_sizer = encode_sizer or EncodeSizer()
        self._seen_steps: dict[str, float] = {}  # worker_id -> end time of the last step seen
        self._encode_queue: dict[str, int] = {}  # worker_id -> images waiting (last observe)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)
        self.last_decision: PoolDecision | None = None
        # (action, loop, "true"/"false" applied) -> decisions other than NONE since start
        self.decision_counts: Counter[tuple[str, str, str]] = Counter()

    def start(self, mode: PlannerMode) -> PlannerLoop:
        """Write the initial control record unless one exists; start ticking."""
        if self.store.read_control() is None:
            self.store.write_control(PlannerControl(mode=mode, updated_at_s=time.time()))
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick_once()
            except ETCD_ERRORS as exc:
                logger.warning("planner: etcd unavailable (%s)", describe_etcd_error(exc))
            except Exception:  # a bug must not stop the loop for good
                logger.exception("planner tick failed")

    def tick_once(self) -> PoolDecision | None:
        """One tick; returns the decision (None when the planner is off or paused)."""
        control = self.store.read_control() or PlannerControl()
        if control.mode is PlannerMode.OFF or control.paused:
            return None
        targets, revision, _ = self.store.snapshot()
        if targets is None:
            return None
        inp = self.observe(targets)
        decision = self.core.on_tick(inp)
        self.last_decision = decision
        applied = False
        if decision.action is not Action.NONE:
            applied = control.mode is PlannerMode.AUTO and \
                self._apply(decision, targets, revision)
            self.decision_counts[(decision.action.value, decision.loop.value,
                                  str(applied).lower())] += 1
            logger.info("planner %s (%s, %s): %s", decision.action.value, decision.loop.value,
                        "applied" if applied else control.mode.value, decision.reason)
        elif not inp.pending_change:
            self._size_encode(inp, control, targets, revision)
        record = PlannerDecision(
            at_s=time.time(), action=decision.action.value, loop=decision.loop.value,
            reason=decision.reason, mode=control.mode, applied=applied,
            prefill=decision.targets.get(WorkerRole.PREFILL, 0),
            decode=decision.targets.get(WorkerRole.DECODE, 0),
            flip_worker_id=",".join(_flip_workers(decision)),
            flip_to_role=decision.flip_to_role.value if decision.flip_to_role else "")
        self.store.write_last_tick(record)  # "none" included: `planner status` shows why
        if decision.action is not Action.NONE:
            self.store.append_decision(record)
        return decision

    def observe(self, targets: PoolTargets) -> TickInput:
        """The core's input from etcd, on the wall clock."""
        now = time.time()
        workers, samples = [], []
        self._encode_queue = {}
        for info in self.directory.workers():
            stats = self.directory.stats(info.worker_id)
            if stats is not None:
                self._encode_queue[info.worker_id] = getattr(stats, "num_encode_waiting", 0)
            workers.append(WorkerObservation(
                worker_id=info.worker_id, role=info.role,
                started_at_s=info.role_since_s or info.started_at_s,
                draining=info.draining,
                num_running=stats.num_running if stats else 0,
                num_waiting=stats.num_waiting if stats else 0,
                queued_prefill_tokens=stats.queued_prefill_tokens if stats else 0,
                kv_usage=getattr(stats, "kv_usage", 0.0) if stats else 0.0,
                kv_capacity_tokens=info.num_blocks * info.block_size))
            if stats is not None:
                samples += self._new_samples(info.worker_id, info.role, stats)
        return TickInput(now_s=now, targets=targets.as_dict(), workers=workers,
                         slo=self._slo(), samples=samples, hold_until_s=targets.hold_until_s,
                         pending_change=self._pending(targets))

    def _size_encode(self, inp: TickInput, control: PlannerControl, targets: PoolTargets,
                     revision: int) -> None:
        """The encode pool's load-based sizing (``encode_sizing``), recorded like a core
        decision and applied in AUTO."""
        queued = [self._encode_queue.get(w.worker_id, 0) for w in inp.workers
                  if w.role is WorkerRole.ENCODE and not w.draining]
        max_workers = getattr(getattr(self.core, "config", None), "max_workers", 0)
        change = self.encode_sizer.on_tick(
            inp.now_s, targets.encode, queued, max_workers - targets.total,
            held=targets.hold_until_s > inp.now_s)
        if change is None:
            return
        applied = control.mode is PlannerMode.AUTO and self.store.write_targets(
            dataclasses.replace(targets, encode=change.target, writer=TargetWriter.PLANNER,
                                reason=change.reason[:200], written_at_s=time.time(),
                                hold_until_s=0.0), revision)
        action = "scale_up" if change.target > targets.encode else "scale_down"
        self.decision_counts[(action, "encode-queue", str(applied).lower())] += 1
        logger.info("planner encode pool %d -> %d (%s): %s", targets.encode, change.target,
                    "applied" if applied else control.mode.value, change.reason)
        self.store.append_decision(PlannerDecision(
            at_s=time.time(), action=action, loop="encode-queue",
            reason=f"encode {targets.encode} -> {change.target}: {change.reason}",
            mode=control.mode, applied=applied, prefill=targets.prefill, decode=targets.decode))

    def _new_samples(self, worker_id: str, role: WorkerRole, stats) -> list[ForwardSample]:
        """Steps published since the last tick (``WorkerStatsRecord.steps``)."""
        last = self._seen_steps.get(worker_id, 0.0)
        out = []
        for step in getattr(stats, "steps", ()):
            end_s, prefill_tokens, decode_requests, context_tokens, step_ms = step[:5]
            if end_s <= last:
                continue
            out.append(ForwardSample(worker_id, role, end_s, int(prefill_tokens),
                                     int(decode_requests), int(context_tokens), step_ms))
            self._seen_steps[worker_id] = max(self._seen_steps.get(worker_id, 0.0), end_s)
        return out

    def _slo(self) -> SloObservation | None:
        """The routers' cluster-scope windows, combined (rates add up, ratios and p90s are
        weighted by finished requests); None when no router saw a request in its window."""
        windows = []
        for value, meta in self._etcd.get_prefix(self._slo_prefix):
            if not meta.key.decode(errors="replace").endswith("/" + SCOPE_CLUSTER):
                continue
            try:
                windows.append(SloWindow.from_bytes(value))
            except ValueError as exc:
                logger.warning("planner: skipping a malformed SLO window: %s", exc)
        return combine_windows(windows)

    def _apply(self, decision: PoolDecision, targets: PoolTargets, revision: int) -> bool:
        if decision.action is Action.FLIP:
            return self._apply_flips(decision, targets, revision)
        new = dataclasses.replace(
            targets, writer=TargetWriter.PLANNER, reason=decision.reason[:200],
            written_at_s=time.time(), hold_until_s=0.0,
            **{role.value: decision.targets.get(role, 0) for role in WorkerRole})
        return self.store.write_targets(new, revision)

    def _apply_flips(self, decision: PoolDecision, targets: PoolTargets, revision: int) -> bool:
        """One FLIP command per worker, the i-th written in one transaction with the targets
        after i flips (donor −i, receiver +i; the last with the decision's targets, which may
        also grant new workers). The controller may reconcile between two writes: at every
        revision the targets match the commands it can see, so it never starts or drains a
        worker for a flip in flight. Each write is a compare-and-swap on the revision the
        previous one left; a concurrent writer stops the rest (the flips written stand,
        consistent). True when at least the first was written."""
        ids, to_role = _flip_workers(decision), decision.flip_to_role
        assert ids and to_role is not None, "flip without a worker"
        donors = [r for r in WorkerRole if decision.targets.get(r, 0) < targets.get(r)]
        assert len(donors) == 1 and \
            targets.get(donors[0]) - decision.targets.get(donors[0], 0) == len(ids), \
            f"a flip of {len(ids)} workers has one donor role losing them: {donors}"
        for i, worker_id in enumerate(ids, start=1):
            counts = {role: targets.get(role) for role in WorkerRole}
            counts[donors[0]] -= i
            counts[to_role] += i
            if i == len(ids):
                counts = {role: decision.targets.get(role, 0) for role in WorkerRole}
            new = dataclasses.replace(
                targets, writer=TargetWriter.PLANNER, reason=decision.reason[:200],
                written_at_s=time.time(), hold_until_s=0.0,
                **{role.value: n for role, n in counts.items()})
            command = self.store.submit_command(
                CommandKind.FLIP, worker_id, to_role, writer=TargetWriter.PLANNER,
                reason=decision.reason[:200], targets=new, expected_revision=revision)
            if command is None:
                logger.warning("planner: targets changed meanwhile; %d of %d flips written",
                               i - 1, len(ids))
                return i > 1
            written, revision = self.store.read_targets()
            if written != new and i < len(ids):
                logger.warning("planner: targets changed meanwhile; %d of %d flips written",
                               i, len(ids))
                return True
        return True


def _flip_workers(decision: PoolDecision) -> tuple[str, ...]:
    """The workers a FLIP moves: ``flip_worker_ids``, or the one ``flip_worker_id``."""
    if decision.flip_worker_ids:
        return decision.flip_worker_ids
    return (decision.flip_worker_id,) if decision.flip_worker_id else ()


def combine_windows(windows: list[SloWindow]) -> SloObservation | None:
    """One observation from several routers' windows (see ``PlannerLoop._slo``); None when
    no router saw a request in its window.

    Requests that arrived but none finished (an overload where every request outlasts the
    window) still give an observation: the arrival rate and the load's shape, with
    ``num_finished`` 0 and the per-finish fields 0. The core then treats the measured
    attainment as unknown (``sizing.is_cold``) but sizes the pools from the forecast, instead
    of seeing nothing until the first request finishes."""
    finished = sum(w.num_finished for w in windows)
    if not any(w.num_finished or w.num_arrivals or w.num_recent_arrivals for w in windows):
        return None

    def weighted(field: str) -> float:
        if finished == 0:
            return 0.0
        return sum(getattr(w, field) * w.num_finished for w in windows) / finished

    return SloObservation(
        window_s=max(w.window_s for w in windows), num_finished=finished,
        arrival_rps=sum(w.arrival_rps for w in windows),
        mean_prompt_tokens=weighted("mean_prompt_tokens"),
        mean_output_tokens=weighted("mean_output_tokens"),
        ttft_p90_ms=weighted("ttft_p90_ms"), tpot_p90_ms=weighted("tpot_p90_ms"),
        ttft_attainment=weighted("ttft_attainment"), tpot_attainment=weighted("tpot_attainment"),
        attainment=weighted("attainment"), goodput_rps=sum(w.goodput_rps for w in windows),
        **_combine_shapes(windows))


def _combine_shapes(windows: list[SloWindow]) -> dict[str, float]:
    """The shape fields of several windows: rates add up, means are weighted by the recent
    arrivals (prompt, max_tokens) or finishes (output) behind them."""
    arrivals = sum(w.num_recent_arrivals for w in windows)
    finished = sum(w.num_recent_finished for w in windows)

    def weighted(field: str, by: str, total: int) -> float:
        return sum(getattr(w, field) * getattr(w, by) for w in windows) / total if total else 0.0

    rms = math.sqrt(sum(w.arrival_rms_prompt_tokens ** 2 * w.num_recent_arrivals
                        for w in windows) / arrivals) if arrivals else 0.0
    return dict(
        shape_window_s=max(w.shape_window_s for w in windows), num_recent_arrivals=arrivals,
        recent_arrival_rps=sum(w.recent_arrival_rps for w in windows),
        arrival_mean_prompt_tokens=weighted("arrival_mean_prompt_tokens", "num_recent_arrivals",
                                            arrivals),
        arrival_rms_prompt_tokens=rms,
        arrival_mean_max_tokens=weighted("arrival_mean_max_tokens", "num_recent_arrivals",
                                         arrivals),
        num_recent_finished=finished,
        recent_mean_output_tokens=weighted("recent_mean_output_tokens", "num_recent_finished",
                                           finished))
