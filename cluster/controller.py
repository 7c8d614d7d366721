"""The controller: reconciles the pools with the targets in etcd (DESIGN: Planner).

Every ``reconcile_interval_s`` it reads the targets and the worker commands at one etcd
revision (``PoolStore.snapshot``) and:

1. runs new commands (operator CLI or planner): DRAIN a worker (marked draining in etcd, so
   routers stop placing there; its requests finish, or migrate after ``drain_deadline_s``;
   then it deregisters and exits: never a kill) or FLIP its role in the same process (drain,
   swap the servicer, register again as the new role: no model load);
2. counts workers per role (starting + serving; a flipping worker counts as its new role, a
   draining one not at all) and starts workers for a role below target, or drains the least
   loaded (then youngest) serving workers of a role above target. Live processes never exceed
   ``max_workers``: a start waits for a drained worker to exit;
3. replaces a worker whose process died for good (its Ray restarts used up): it leaves the
   count and a new worker with a new id is started.

Workers are Ray actors owned by the controller actor; they live as long as it does.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import ActorDiedError

from scission.cluster.spawner import WorkerSpawner
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.registry.pools import (
    CommandKind,
    CommandState,
    PoolStore,
    PoolTargets,
    WorkerCommand,
)
from scission.registry.workers import WorkerRole

logger = logging.getLogger(__name__)
MAX_FINISHED_COMMANDS_KEPT = 50


@dataclass(frozen=True)
class ControllerConfig:
    drain_deadline_s: float = 60.0  # then what still runs migrates
    reconcile_interval_s: float = 0.5
    liveness_interval_s: float = 1.0  # how often serving workers are pinged through Ray
    max_workers: int | None = None  # live worker processes at most; None = no limit

    def __post_init__(self) -> None:
        if self.drain_deadline_s < 0 or self.reconcile_interval_s <= 0 or \
                self.liveness_interval_s <= 0:
            raise ValueError("drain_deadline_s >= 0 and positive intervals required")
        if self.max_workers is not None and self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")


class WorkerState(enum.Enum):
    STARTING = "starting"  # loading the model
    SERVING = "serving"
    DRAINING = "draining"  # leaving: drained, then stopped
    FLIPPING = "flipping"  # drained, then serving as ``to_role``


@dataclass
class ManagedWorker:
    worker_id: str
    role: WorkerRole
    actor: ray.actor.ActorHandle
    state: WorkerState
    ready_ref: ray.ObjectRef | None  # start() while STARTING
    spawned_at_s: float = field(default_factory=time.monotonic)
    to_role: WorkerRole | None = None  # FLIPPING
    ping_ref: ray.ObjectRef | None = None
    generation: int = 0  # +1 whenever the role may change (a ping from before is stale)
    ping_generation: int = 0

    @property
    def counts_as(self) -> WorkerRole | None:
        """The role this worker counts toward (None: leaving)."""
        if self.state is WorkerState.FLIPPING:
            return self.to_role
        return None if self.state is WorkerState.DRAINING else self.role


class Controller:
    """Owns the worker actors; thread-safe. ``start`` spawns the initial pools."""

    def __init__(self, config: ControllerConfig, spawner: WorkerSpawner, store: PoolStore,
                 directory: WorkerDirectory) -> None:
        self.config = config
        self.spawner = spawner
        self.store = store
        self.directory = directory
        self._lock = threading.Lock()
        self._workers: dict[str, ManagedWorker] = {}
        self._seen_commands: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._last_ping_s = 0.0
        self.num_replaced = 0  # workers started because one died for good
        self.last_targets: PoolTargets | None = None  # as last read from etcd

    # -- lifecycle --------------------------------------------------------------------
    def start(self, initial: PoolTargets, timeout_s: float) -> dict[str, str]:
        """Write ``initial`` targets, start their workers, wait until every one serves
        (raises what a failed start raised), then reconcile in the background. Returns
        worker_id -> endpoint."""
        self.store.write_targets(initial)
        refs = {}
        for role, n in initial.as_dict().items():
            for _ in range(n):
                worker = self._spawn(role)
                refs[worker.worker_id] = worker.ready_ref
        endpoints = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
        with self._lock:
            for worker_id in refs:
                self._workers[worker_id].state = WorkerState.SERVING
                self._workers[worker_id].ready_ref = None
        self._thread.start()
        return endpoints

    def stop(self) -> None:
        """Stop reconciling and stop every worker (graceful, then killed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        try:
            ray.get([w.actor.stop.remote() for w in workers], timeout=20)
        except Exception as exc:  # a dead actor cannot stop; it is killed below anyway
            logger.warning("graceful stop incomplete: %s", exc)
        for w in workers:
            ray.kill(w.actor, no_restart=True)

    def handles(self) -> dict[str, ray.actor.ActorHandle]:
        with self._lock:
            return {w.worker_id: w.actor for w in self._workers.values()}

    def workers(self) -> list[dict[str, str]]:
        """worker_id, role, state (and to_role) of every managed worker."""
        with self._lock:
            return [{"worker_id": w.worker_id, "role": w.role.value, "state": w.state.value,
                     "to_role": w.to_role.value if w.to_role else ""}
                    for w in self._workers.values()]

    def pending(self, targets: PoolTargets) -> bool:
        """True while the pools differ from ``targets`` or a worker is starting, draining or
        flipping (the planner waits for a change to land before it makes another)."""
        with self._lock:
            workers = list(self._workers.values())
        if any(w.state is not WorkerState.SERVING for w in workers):
            return True
        counts = {role: 0 for role in WorkerRole}
        for w in workers:
            counts[w.role] += 1
        return any(counts[role] != targets.get(role) for role in WorkerRole)

    def kill_worker(self, worker_id: str) -> None:
        """Kill a worker for good (tests, faults): no drain, no restart, no replacement (its
        role's target is lowered by one)."""
        with self._lock:
            worker = self._workers.pop(worker_id)
        targets, revision = self.store.read_targets()
        if targets is not None and targets.get(worker.role) > 0:
            lowered = targets.with_role(worker.role, targets.get(worker.role) - 1)
            self.store.write_targets(lowered, revision)
        ray.kill(worker.actor, no_restart=True)

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.config.reconcile_interval_s):
            try:
                self.reconcile_once()
                failures = 0
            except ETCD_ERRORS as exc:  # etcd down: keep what runs, retry next tick
                failures += 1
                if failures == 1:
                    logger.warning("controller: etcd unavailable (%s)", describe_etcd_error(exc))
            except Exception:  # a bug must not stop reconciliation for good
                logger.exception("controller: reconcile failed")

    def reconcile_once(self) -> None:
        targets, _, commands = self.store.snapshot()
        self.last_targets = targets
        self._advance_started()
        self._check_liveness()
        for command in commands:
            if command.state is CommandState.PENDING and \
                    command.command_id not in self._seen_commands:
                self._begin_command(command)
        self._trim_commands(commands)
        if targets is not None:
            self._scale(targets)

    def _advance_started(self) -> None:
        with self._lock:
            starting = [w for w in self._workers.values() if w.state is WorkerState.STARTING]
        for w in starting:
            ready, _ = ray.wait([w.ready_ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(w.ready_ref)
                w.state, w.ready_ref = WorkerState.SERVING, None
                logger.info("worker %s serves", w.worker_id)
            except Exception as exc:  # failed to load: drop it; the next tick starts another
                logger.error("worker %s failed to start: %s", w.worker_id, exc)
                self._forget(w)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if now - self._last_ping_s < self.config.liveness_interval_s:
            return
        self._last_ping_s = now
        with self._lock:
            serving = [w for w in self._workers.values() if w.state is WorkerState.SERVING]
        for w in serving:
            if w.ping_ref is None:
                w.ping_ref, w.ping_generation = w.actor.ping.remote(), w.generation
                continue
            ready, _ = ray.wait([w.ping_ref], timeout=0)
            if not ready:
                continue
            ref, w.ping_ref = w.ping_ref, None
            try:
                role = ray.get(ref)
                if role and role != w.role.value and w.ping_generation == w.generation:
                    # Ray restarted it in its original role (a role flip's is stale)
                    logger.warning("worker %s came back as %s (was %s)", w.worker_id, role,
                                   w.role.value)
                    with self._lock:
                        w.role = WorkerRole(role)
            except ActorDiedError:  # restarts used up (a restarting one is "unavailable")
                logger.error("worker %s died for good; starting a replacement", w.worker_id)
                self._forget(w)
                self.num_replaced += 1
            except Exception as exc:  # restarting: Ray brings it back as a new incarnation
                logger.info("worker %s unavailable (%s)", w.worker_id, type(exc).__name__)

    def _scale(self, targets: PoolTargets) -> None:
        counts = {role: 0 for role in WorkerRole}
        with self._lock:  # flips change role/state under the lock
            workers = list(self._workers.values())
            for w in workers:
                if w.counts_as is not None:
                    counts[w.counts_as] += 1
        live = len(workers)
        for role in WorkerRole:
            missing = targets.get(role) - counts[role]
            for _ in range(max(missing, 0)):
                if self.config.max_workers is not None and live >= self.config.max_workers:
                    logger.debug("at max_workers=%d: %s waits", self.config.max_workers,
                                 role.value)
                    break
                self._spawn(role)
                live += 1
            if missing < 0:
                for w in self._scale_down_victims(workers, role, -missing):
                    self._start_leaving(w, None)

    def _scale_down_victims(self, workers: list[ManagedWorker], role: WorkerRole,
                            n: int) -> list[ManagedWorker]:
        """The ``n`` least loaded serving workers of ``role`` (youngest first on ties); a
        starting one goes first (nothing runs there yet)."""
        candidates = [w for w in workers if w.counts_as is role
                      and w.state in (WorkerState.STARTING, WorkerState.SERVING)]

        def load(w: ManagedWorker) -> tuple[int, int, float]:
            if w.state is WorkerState.STARTING:
                return (0, -1, -w.spawned_at_s)
            stats = self.directory.stats(w.worker_id)
            running = stats.num_running + stats.num_waiting if stats else 0
            return (1, running, -w.spawned_at_s)

        return sorted(candidates, key=load)[:n]

    # -- commands ------------------------------------------------------------------------
    def _begin_command(self, command: WorkerCommand) -> None:
        self._seen_commands.add(command.command_id)
        with self._lock:
            worker = self._workers.get(command.worker_id)
        problem = None
        if worker is None:
            problem = f"unknown worker {command.worker_id}"
        elif worker.state is not WorkerState.SERVING:
            problem = f"worker {command.worker_id} is {worker.state.value}"
        elif command.kind is CommandKind.FLIP and command.to_role is worker.role:
            problem = f"worker {command.worker_id} already has role {worker.role.value}"
        if problem is not None:
            self._finish_command(command, CommandState.FAILED, problem, 0.0)
            return
        assert worker is not None
        self._start_leaving(worker, command)

    def _start_leaving(self, worker: ManagedWorker, command: WorkerCommand | None) -> None:
        """Drain (and stop) or flip ``worker`` on a thread of its own."""
        flip = command is not None and command.kind is CommandKind.FLIP
        with self._lock:
            worker.state = WorkerState.FLIPPING if flip else WorkerState.DRAINING
            worker.to_role = command.to_role if flip and command else None
            worker.generation += 1
        if command is not None:
            self.store.put_command(_with(command, CommandState.RUNNING, "draining", 0.0))
        target = self._flip if flip else self._drain_and_stop
        threading.Thread(target=target, args=(worker, command), daemon=True,
                         name=f"leave-{worker.worker_id}").start()

    def _drain_and_stop(self, worker: ManagedWorker, command: WorkerCommand | None) -> None:
        t0 = time.monotonic()
        try:
            message = "stopped before it served"
            if worker.ready_ref is None:  # a starting worker has nothing to drain
                result = ray.get(worker.actor.drain.remote(self.config.drain_deadline_s))
                logger.info("drained %s: %s", worker.worker_id, result)
                message = (f"drained in {result['duration_s']:.2f}s ({result['num_evicted']} "
                           f"requests migrated, {result['num_released']} KV holds released) "
                           "and stopped")
            ray.get(worker.actor.stop.remote(), timeout=30)
            state = CommandState.DONE
        except Exception as exc:  # the worker died meanwhile: it is gone either way
            message, state = f"drain failed: {exc}", CommandState.FAILED
            logger.warning("drain of %s: %s", worker.worker_id, exc)
        ray.kill(worker.actor, no_restart=True)
        self._forget(worker)
        if command is not None:
            self._finish_command(command, state, message, time.monotonic() - t0)

    def _flip(self, worker: ManagedWorker, command: WorkerCommand | None) -> None:
        assert command is not None and worker.to_role is not None, "flip without a command"
        t0 = time.monotonic()
        try:
            result = ray.get(worker.actor.flip.remote(worker.to_role,
                                                      self.config.drain_deadline_s))
            with self._lock:
                worker.role, worker.to_role = worker.to_role, None
                worker.state = WorkerState.SERVING
                worker.generation += 1
            message = (f"flipped to {worker.role.value} in {result['duration_s']:.2f}s "
                       f"({result['num_evicted']} requests migrated)")
            self._finish_command(command, CommandState.DONE, message, time.monotonic() - t0)
        except Exception as exc:  # dead or failed mid-flip: stop it; the count replaces it
            logger.error("flip of %s failed: %s", worker.worker_id, exc)
            ray.kill(worker.actor, no_restart=True)
            self._forget(worker)
            self._finish_command(command, CommandState.FAILED, f"flip failed: {exc}",
                                 time.monotonic() - t0)

    def _finish_command(self, command: WorkerCommand, state: CommandState, message: str,
                        duration_s: float) -> None:
        try:
            self.store.put_command(_with(command, state, message, duration_s))
        except ETCD_ERRORS as exc:
            logger.warning("command %s: could not record %s (%s)", command.command_id,
                           state.value, describe_etcd_error(exc))

    def _trim_commands(self, commands: list[WorkerCommand]) -> None:
        finished = [c for c in commands if c.finished]
        for command in finished[:-MAX_FINISHED_COMMANDS_KEPT]:
            self.store.delete_command(command.command_id)

    # -- helpers ---------------------------------------------------------------------------
    def _spawn(self, role: WorkerRole) -> ManagedWorker:
        worker_id, actor, ref = self.spawner.spawn(role)
        worker = ManagedWorker(worker_id, role, actor, WorkerState.STARTING, ref)
        with self._lock:
            self._workers[worker_id] = worker
        return worker

    def _forget(self, worker: ManagedWorker) -> None:
        with self._lock:
            if self._workers.get(worker.worker_id) is worker:
                del self._workers[worker.worker_id]


def _with(command: WorkerCommand, state: CommandState, message: str,
          duration_s: float) -> WorkerCommand:
    return replace(command, state=state, message=message, duration_s=duration_s)
