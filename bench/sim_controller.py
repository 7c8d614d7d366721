"""The simulated controller: reconciles simulated workers with the pool targets, as
``cluster/controller.py`` does with Ray actors, on the simulator's clock.

Same rules as the real controller: a worker counts toward its role while starting or serving,
toward its new role while flipping, and not at all while draining. A role below target gets new
workers (serving ``start_delay_s`` later: model load), never more live workers than the budget
(a start waits for a drained worker to leave). A role above target drains its starting workers
first, then the least loaded serving ones (youngest first on ties). A drained worker takes no
new request and leaves once idle; ``SimConfig.drain_deadline_s`` after the drain began, what
still runs there migrates (``ClusterSim._drain_deadline``). A flip drains the worker, then
after ``flip_delay_s`` it serves as the new role (same id and start time, the role aged from
the flip; no model load). ``pending`` is the real controller's: a worker not serving, or
counts != targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgpack

from scission.bench.sim_serving import ServingWorker
from scission.bench.sim_workers import PrefillWorker, SimWorker, WorkerState
from scission.registry.workers import WorkerInfo, WorkerRole

if TYPE_CHECKING:
    from scission.bench.sim_cluster import ClusterSim

WARM_START_S = -1000.0  # started_at_s of the initial workers: long before the run


def make_info(worker_id: str, role: WorkerRole, num_blocks: int, block_size: int,
              started_at_s: float) -> WorkerInfo:
    """A registration record for a simulated worker (no endpoint or NIXL agent behind it)."""
    return WorkerInfo(worker_id=worker_id, role=role, endpoint="sim:0", agent_name="",
                      agent_metadata=b"", kv_layout=msgpack.packb({}), num_blocks=num_blocks,
                      block_size=block_size, model_id="sim", started_at_s=started_at_s)


class SimController:
    def __init__(self, sim: ClusterSim, budget: int) -> None:
        self.sim = sim
        self.budget = budget
        self.workers: dict[str, SimWorker] = {}  # live (not gone), by id
        self.targets: dict[WorkerRole, int] = {}
        self.max_live = 0  # most live workers at any time (budget check)
        self._next_id = 0

    # -- views -------------------------------------------------------------------------------
    @staticmethod
    def counts_as(w: SimWorker) -> WorkerRole | None:
        if w.state is WorkerState.FLIPPING:
            return w.to_role
        return None if w.state is WorkerState.DRAINING else w.role

    def routable(self, role: WorkerRole) -> list[WorkerInfo]:
        return [w.info for w in self.workers.values()
                if w.role is role and w.state is WorkerState.SERVING]

    def count(self, role: WorkerRole, state: WorkerState) -> int:
        return sum(w.role is role and w.state is state for w in self.workers.values())

    def pending(self) -> bool:
        if any(w.state is not WorkerState.SERVING for w in self.workers.values()):
            return True
        return any(sum(w.role is role for w in self.workers.values()) != self.targets.get(role, 0)
                   for role in WorkerRole)

    # -- verbs -------------------------------------------------------------------------------
    def start_initial(self, targets: dict[WorkerRole, int]) -> None:
        """The initial pools, serving at t = 0 (loaded long before)."""
        self.targets = dict(targets)
        for role, n in targets.items():
            for _ in range(n):
                self._spawn(role, WARM_START_S).state = WorkerState.SERVING
        self.max_live = len(self.workers)
        self.sim.refresh_pool()

    def apply(self, targets: dict[WorkerRole, int], flip_worker_ids: tuple[str, ...] = (),
              flip_to_role: WorkerRole | None = None) -> None:
        """New targets (and flip commands, one per worker), then reconcile."""
        self.targets = dict(targets)
        for worker_id in flip_worker_ids:
            w = self.workers.get(worker_id)
            assert flip_to_role is not None, "a flip needs a role"
            if w is not None and w.state is WorkerState.SERVING and w.role is not flip_to_role:
                w.state, w.to_role = WorkerState.FLIPPING, flip_to_role
                self._after_leave_started(w)
        self.reconcile()

    def reconcile(self) -> None:
        counts = {role: 0 for role in WorkerRole}
        for w in self.workers.values():
            role = self.counts_as(w)
            if role is not None:
                counts[role] += 1
        live = len(self.workers)
        for role in WorkerRole:
            missing = self.targets.get(role, 0) - counts[role]
            for _ in range(max(missing, 0)):
                if live >= self.budget:
                    break
                w = self._spawn(role, self.sim.now)
                self.sim.schedule_ready(self.sim.now + self.sim.cfg.start_delay_s, w)
                live += 1
            if missing < 0:
                for w in self._victims(role, -missing):
                    self._drain(w)
        self.max_live = max(self.max_live, len(self.workers))

    def _victims(self, role: WorkerRole, n: int) -> list[SimWorker]:
        found = [w for w in self.workers.values() if self.counts_as(w) is role
                 and w.state in (WorkerState.STARTING, WorkerState.SERVING)]

        def load(w: SimWorker) -> tuple[int, int, float]:
            if w.state is WorkerState.STARTING:
                return (0, -1, -w.spawned_at_s)
            lo = w.load()
            return (1, lo.num_running, -w.spawned_at_s)

        return sorted(found, key=load)[:n]

    def _spawn(self, role: WorkerRole, at_s: float) -> SimWorker:
        cfg = self.sim.cfg
        worker_id = f"{role.value}-{self._next_id}"
        self._next_id += 1
        w = self._make(make_info(worker_id, role, cfg.num_blocks, cfg.block_size, at_s), at_s)
        self.workers[worker_id] = w
        return w

    def _make(self, info: WorkerInfo, spawned_at_s: float) -> SimWorker:
        cls = PrefillWorker if info.role is WorkerRole.PREFILL else ServingWorker
        return cls(self.sim, info, spawned_at_s)

    def _drain(self, w: SimWorker) -> None:
        if w.state is WorkerState.STARTING:  # nothing runs there yet
            self._leave(w)
            return
        w.state = WorkerState.DRAINING
        self._after_leave_started(w)

    def _after_leave_started(self, w: SimWorker) -> None:
        self.sim.refresh_pool()
        deadline_s = self.sim.cfg.drain_deadline_s
        if deadline_s is not None:
            self.sim.schedule_drain_deadline(self.sim.now + deadline_s, w)
        if w.is_idle():
            self.on_idle(w)

    def _leave(self, w: SimWorker) -> None:
        w.state = WorkerState.GONE
        del self.workers[w.worker_id]
        self.sim.refresh_pool()
        self.reconcile()  # a start may have waited for this slot

    # -- events ------------------------------------------------------------------------------
    def on_ready(self, w: SimWorker) -> None:
        if w.state is WorkerState.STARTING:
            w.state = WorkerState.SERVING
            self.sim.refresh_pool()

    def on_idle(self, w: SimWorker) -> None:
        if w.state is WorkerState.DRAINING:
            self._leave(w)
        elif w.state is WorkerState.FLIPPING and not w.flip_scheduled:
            w.flip_scheduled = True
            self.sim.schedule_flip(self.sim.now + self.sim.cfg.flip_delay_s, w)

    def on_flip_done(self, w: SimWorker) -> None:
        """The drained worker serves as its new role (a fresh object of the new kind)."""
        assert w.to_role is not None and w.state is WorkerState.FLIPPING, "not flipping"
        info = make_info(w.worker_id, w.to_role, w.num_blocks, w.block_size, w.spawned_at_s)
        new = self._make(info, w.spawned_at_s)
        new.role_since_s = self.sim.now  # the planner ages the role from the flip
        new.state = WorkerState.SERVING
        w.state = WorkerState.GONE
        self.workers[w.worker_id] = new
        self.sim.refresh_pool()
        self.reconcile()
