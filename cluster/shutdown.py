"""How a cluster started by ``scission up`` stops, on both sides.

``up`` (``StopSignal``, ``stop_cluster``): the first SIGTERM or SIGINT asks for a drain — the
router stops admitting (new requests get UNAVAILABLE), requests in flight get the grace period
``down`` asked for (``StopRequest``; 30 s without one, e.g. Ctrl-C) — a second one cuts the
grace short. Then the router, the controller and its workers, Ray and the embedded etcd stop,
every process this one started is checked to be gone (SIGKILL for a straggler) and the etcd
data dir to be removed; the outcome goes to a ``ShutdownReport``.

``down`` (``request_stop``): recognises an ``up`` that is no longer running at once (exited, or
a zombie nobody reaped), otherwise writes the ``StopRequest``, signals, waits for the process
to end and turns its report into an exit code: 0 only when everything stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scission.cluster.procs import descendants, end_processes, pid_alive, process_state
from scission.cluster.state import DEFAULT_STATE_FILE, ClusterState, ShutdownReport, StopRequest

if TYPE_CHECKING:
    from scission.cluster.launcher import LocalCluster

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
# After the grace period: stopping actors, Ray and etcd, and the check for stragglers.
STOP_BUDGET_S = 90.0
STRAGGLER_WAIT_S = 10.0  # a process of the cluster may take this long to exit by itself


class StopSignal:
    """``scission up``'s SIGINT/SIGTERM handlers. While the cluster starts (``serving`` not
    yet set) a signal aborts the start (``KeyboardInterrupt``; the start cleans up); then
    the first one sets ``requested`` and a second one ``now`` (cut the grace period short).
    Install them from the main thread."""

    def __init__(self) -> None:
        self.serving = False
        self.requested = threading.Event()
        self.now = threading.Event()

    def install(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.serving:
            raise KeyboardInterrupt(f"signal {signum} while starting")
        if self.requested.is_set():
            self.now.set()
        self.requested.set()


def stop_cluster(cluster: LocalCluster, grace_s: float,
                 cut_short: threading.Event | None = None) -> ShutdownReport:
    """Drain for up to ``grace_s``, stop everything, and check that every process this one
    started has ended and the embedded etcd's data dir is gone."""
    ours = descendants(os.getpid())
    etcd_root = cluster.etcd.root if cluster.etcd is not None else None
    requests_cut = cluster.drain(grace_s, cut_short)
    if requests_cut > 0:
        logger.warning("%d requests still running after the %.0f s grace period: cut",
                       requests_cut, grace_s)
    try:
        cluster.stop()
    finally:
        killed, survivors = end_processes(ours, STRAGGLER_WAIT_S)
    problems = [f"still running after SIGKILL: {_names(survivors)}"] if survivors else []
    if etcd_root is not None and etcd_root.exists():
        problems.append(f"the embedded etcd's data dir {etcd_root} is left")
    if killed:
        logger.warning("needed SIGKILL: %s", _names(killed))
    return ShutdownReport(os.getpid(), problems, max(requests_cut, 0),
                          [f"{name} ({pid})" for pid, name in killed.items()])


def _names(pids: dict[int, str]) -> str:
    return ", ".join(f"{name} ({pid})" for pid, name in sorted(pids.items()))


@dataclass(frozen=True)
class DownResult:
    ok: bool
    message: str


def request_stop(state: ClusterState, grace_s: float,
                 state_path: Path = DEFAULT_STATE_FILE) -> DownResult:
    """``scission down``: ask ``state.pid`` to drain for ``grace_s`` and stop, and wait for
    it (``grace_s`` + ``STOP_BUDGET_S`` at most)."""
    pid = state.pid
    if not pid_alive(pid):
        how = "a zombie (exited, not reaped)" if process_state(pid) == "Z" else "gone"
        state_path.unlink(missing_ok=True)
        return DownResult(False, f"`scission up` (pid {pid}) is not running ({how}) and did "
                                 f"not stop the cluster cleanly; removed its state file "
                                 f"{state_path}. Leftover processes may need `ray stop`.")
    ShutdownReport.take(pid, state_path)  # a stale one from an earlier attempt
    StopRequest(pid, grace_s).write(state_path)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + STOP_BUDGET_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        return DownResult(False, f"`scission up` (pid {pid}) is still running "
                                 f"{grace_s + STOP_BUDGET_S:.0f} s after the stop request; "
                                 f"see its output")
    report = ShutdownReport.take(pid, state_path)
    if report is None:
        return DownResult(False, f"`scission up` (pid {pid}) ended without reporting a clean "
                                 f"stop (killed or crashed?); processes of the cluster or the "
                                 f"etcd data dir may be left")
    return judge(report)


def judge(report: ShutdownReport) -> DownResult:
    """The report in one line; ok when everything stopped."""
    if not report.ok:
        return DownResult(False, "the cluster stopped with problems: " +
                          "; ".join(report.problems))
    notes = []
    if report.requests_cut:
        notes.append(f"{report.requests_cut} requests still running at the end of the grace "
                     f"period were cut")
    if report.killed:
        notes.append(f"needed SIGKILL: {', '.join(report.killed)}")
    return DownResult(True, "cluster stopped" + (f" ({'; '.join(notes)})" if notes else ""))
