"""``scission down`` against ``up`` processes that are not clusters: a zombie is recognised at
once, an ``up`` that ends without its shutdown report or with problems in it is a failure,
a clean report a success. (A real cluster: test_shutdown.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from proc_helpers import pid_state
from serving_helpers import wait_until

from scission.cluster.shutdown import DownResult, request_stop
from scission.cluster.state import ClusterState

SCISSION = str(Path(sys.executable).parent / "scission")


def _state(path: Path, pid: int) -> None:
    ClusterState(pid, "127.0.0.1:1", ["127.0.0.1:2"], "/scission").write(path)


def _down(path: Path, *argv: str, timeout_s: float = 60) -> tuple[subprocess.CompletedProcess,
                                                                    float]:
    start = time.monotonic()
    res = subprocess.run([SCISSION, "down", *argv], capture_output=True, text=True,
                         timeout=timeout_s, env={**os.environ, "SCISSION_STATE_FILE": str(path)})
    return res, time.monotonic() - start


def test_a_zombie_up_is_recognised_at_once(tmp_path):
    """The state file names a process that exited but was never reaped (a zombie, which
    ``kill(pid, 0)`` still finds): ``read()`` sees no cluster, and ``down`` says so within
    seconds (it used to wait 90 s), exits 1 and removes the stale state file."""
    path = tmp_path / "cluster.json"
    child = subprocess.Popen(["true"])  # not waited for until the end: a zombie meanwhile
    try:
        wait_until(lambda: pid_state(child.pid) == "Z", 10, 0.02)
        _state(path, child.pid)
        assert ClusterState.read(path) is None and ClusterState.load(path).pid == child.pid
        res, elapsed_s = _down(path, timeout_s=30)
        assert res.returncode == 1, res
        assert f"(pid {child.pid}) is not running (a zombie" in res.stderr
        assert elapsed_s < 15 and not path.exists()
    finally:
        child.wait()


# A stand-in for `scission up`: on SIGTERM it takes down's stop request and writes the
# shutdown report given as argv[1] (or none: "-"), echoing the grace it was asked for.
_FAKE_UP = textwrap.dedent("""
    import json, os, signal, sys, threading
    from scission.cluster.state import ShutdownReport, StopRequest
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    request = StopRequest.take(os.getpid())
    print(f"grace {request.grace_s}", flush=True)
    if sys.argv[1] != "-":
        ShutdownReport(os.getpid(), **json.loads(sys.argv[1])).write()
""")


def _run_fake_up(tmp_path: Path, report: str) -> tuple[DownResult, str]:
    path = tmp_path / "cluster.json"
    env = {**os.environ, "SCISSION_STATE_FILE": str(path)}
    fake = subprocess.Popen([sys.executable, "-c", _FAKE_UP, report], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline() == "ready\n"
        _state(path, fake.pid)
        result = request_stop(ClusterState.load(path), 7.0, path)
        out, _ = fake.communicate(timeout=10)
    finally:
        if fake.poll() is None:
            fake.kill()
            fake.wait()
    return result, out


def test_down_result_follows_the_shutdown_report(tmp_path):
    """``down --grace-s 7`` hands 7 s to ``up``; a clean report is success ("cluster
    stopped", naming the requests cut), problems are a failure naming them, and no report at
    all (``up`` killed or crashed) is a failure too."""
    result, out = _run_fake_up(tmp_path, '{"requests_cut": 2}')
    assert "grace 7.0" in out
    assert result == DownResult(True, "cluster stopped (2 requests still running at the end "
                                      "of the grace period were cut)")
    result, _ = _run_fake_up(tmp_path, '{"problems": ["etcd data dir /x is left"]}')
    assert result == DownResult(False, "the cluster stopped with problems: etcd data dir /x "
                                       "is left")
    result, _ = _run_fake_up(tmp_path, "-")
    assert not result.ok and "ended without reporting a clean stop" in result.message
