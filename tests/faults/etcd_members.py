"""A 3-member etcd cluster on free loopback ports for the leader-loss tests (not collected).

``cluster.etcd_server.EmbeddedEtcd`` runs one member; this starts ``n`` of the same binary
with ``--initial-cluster`` naming all of them, can SIGKILL one and restart it on its ports
and data dir (it rejoins from its own WAL), and finds the leader through the maintenance
API (``Status``: the responding member's id and the leader's id), which it can also hand to
a chosen member (``MoveLeader``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import etcd3
from etcd3 import etcdrpc

from scission.cluster.etcd_server import _die_with_parent_preexec, find_etcd_binary
from scission.registry.workers import EtcdClientConfig, connect
from scission.worker.ports import find_free_port

HOST = "127.0.0.1"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"


class EtcdMembers:
    """``n`` etcd members forming one cluster; ``stop()`` kills them and removes their data."""

    def __init__(self, n: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="scission-etcd3-"))
        self.binary = find_etcd_binary()
        self.members = [Member(f"m{i}", find_free_port(HOST), find_free_port(HOST),
                               self.root / f"m{i}") for i in range(n)]
        self.initial_cluster = ",".join(f"{m.name}=http://{HOST}:{m.peer_port}"
                                        for m in self.members)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def start(self, timeout_s: float = 30.0) -> EtcdMembers:
        for m in self.members:
            self._launch(m, "new")
        for m in self.members:
            self.wait_serving(m, timeout_s)
        return self

    def _launch(self, m: Member, state: str) -> None:
        client_url, peer_url = f"http://{m.endpoint}", f"http://{HOST}:{m.peer_port}"
        m.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(m.data_dir / "etcd.log", "ab")  # noqa: SIM115 (the child keeps it)
        m.proc = subprocess.Popen(
            [self.binary, "--name", m.name, "--data-dir", str(m.data_dir / "data"),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", self.initial_cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", "scission-faults", "--log-level", "warn",
             "--unsafe-no-fsync"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent_preexec())  # no member outlives the test
        log.close()

    def status(self, m: Member) -> etcdrpc.StatusResponse | None:
        """The member's own status (its id, the leader it knows, raft index); None if it
        does not answer."""
        client = connect(EtcdClientConfig(endpoints=(m.endpoint,), timeout_s=1.0))
        try:
            return client.maintenancestub.Status(etcdrpc.StatusRequest(), 1.0)
        except Exception:  # noqa: BLE001 (any failure = not answering; callers poll)
            return None
        finally:
            client.close()

    def wait_serving(self, m: Member, timeout_s: float) -> etcdrpc.StatusResponse:
        """Wait until ``m`` answers and knows a leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = self.status(m)
            if s is not None and s.leader:
                return s
            time.sleep(0.1)
        raise AssertionError(f"etcd member {m.name} not serving within {timeout_s}s: "
                             f"{(m.data_dir / 'etcd.log').read_text()[-2000:]}")

    def leader(self, among: list[Member] | None = None) -> Member | None:
        """The member the others agree is leader (None while there is none)."""
        ids = {}
        for m in among or self.members:
            s = self.status(m)
            if s is not None and s.leader:
                ids[m.name] = (s.header.member_id, s.leader)
        leaders = {lead for _, lead in ids.values()}
        if len(leaders) != 1:
            return None
        (lead,) = leaders
        return next((m for m in self.members if ids.get(m.name, (None,))[0] == lead), None)

    def num_clients(self, m: Member) -> int:
        """Established TCP connections to ``m``'s client port from this host (client side,
        ``/proc/net/tcp{,6}``), etcd's own left out: how many etcd clients use ``m`` now."""
        port = f":{m.client_port:04X}"
        rows = [line.split() for table in ("/proc/net/tcp", "/proc/net/tcp6")  # v4-mapped
                for line in Path(table).read_text().splitlines()[1:]]
        own = self._socket_inodes()  # etcd's gateway dials its own client port: not a client
        return sum(1 for r in rows if r[2].endswith(port) and r[3] == "01" and r[9] not in own)

    def _socket_inodes(self) -> set[str]:
        inodes = set()
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            fds = Path(f"/proc/{m.proc.pid}/fd")
            for fd in fds.iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:  # closed meanwhile
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        return inodes

    def move_leader(self, to: Member, timeout_s: float = 30.0) -> None:
        """Hand leadership to ``to`` (etcd's MoveLeader, sent to the current leader)."""
        leader = self.leader()
        assert leader is not None, "no leader"
        if leader is to:
            return
        target = self.status(to)
        assert target is not None, f"{to.name} does not answer"
        client = self.client(leader)
        try:
            client.maintenancestub.MoveLeader(
                etcdrpc.MoveLeaderRequest(targetID=target.header.member_id), timeout_s)
        finally:
            client.close()
        deadline = time.monotonic() + timeout_s
        while self.leader() is not to:
            assert time.monotonic() < deadline, f"{to.name} did not become leader"
            time.sleep(0.1)

    def kill(self, m: Member) -> None:
        assert m.proc is not None, f"{m.name} is not running"
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)

    def restart(self, m: Member, timeout_s: float = 30.0) -> None:
        """Start ``m`` again on its ports and data dir: it rejoins from its own WAL."""
        self._launch(m, "existing")
        self.wait_serving(m, timeout_s)

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self, m: Member) -> etcd3.MultiEndpointEtcd3Client:
        return connect(EtcdClientConfig(endpoints=(m.endpoint,)))
