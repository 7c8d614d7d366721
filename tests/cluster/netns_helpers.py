"""Two "machines" on one host for multi-node tests (not collected: no test_ prefix).

Topology (``NetnsNodes``): two network namespaces, ``sc-head-<tag>`` and ``sc-node-<tag>``,
each with its own loopback and one interface ``scnet0`` (a veth) holding its own address
``10.A.B.1`` / ``10.A.B.2``; the veths' other ends hang on a bridge ``scbr<tag>`` in the
test's namespace, which holds ``10.A.B.254``, so the test process reaches both nodes and the
nodes reach each other::

    root ns (test, 10.A.B.254 on scbr<tag>)
      |-- sch<tag> ==veth== scnet0 10.A.B.1   sc-head-<tag>: etcd, Ray head, router, workers
      `-- scn<tag> ==veth== scnet0 10.A.B.2   sc-node-<tag>: Ray worker node, workers

Every process of a node runs inside its namespace (``ip netns exec``), so ``ip netns pids``
names exactly the processes to kill: ``kill_node`` is a node crash, ``destroy`` leaves
nothing behind. (``ray stop`` is never used: it kills every Ray process of the host, other
tests' included.) Needs root (CAP_NET_ADMIN) and iproute2; ``netns_unavailable`` says why not.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

IFACE = "scnet0"  # the node's interface, same name in both namespaces (UCX_NET_DEVICES)


def _ip_binary() -> str | None:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """None when network namespaces with veths can be made here, else why not: the probe's
    own error (no iproute2, not root: "Operation not permitted", ...)."""
    ip = _ip_binary()
    if ip is None:
        return "no `ip` command (iproute2) on this host"
    name = f"sc-probe-{os.getpid()}-{random.randrange(1 << 16)}"
    res = _run(ip, "netns", "add", name)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip() or res.returncode}"
    try:
        res = _run(ip, "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        if res.returncode != 0:
            return f"`ip link add ... type veth` failed: {res.stderr.strip()}"
    finally:
        _run(ip, "netns", "del", name)
    return None


def _free_subnet() -> str:
    """``10.A.B`` not routed on this host yet."""
    routes = _run(_ip_binary() or "ip", "-4", "route").stdout
    for _ in range(100):
        subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        if f"{subnet}." not in routes:
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet")


@dataclass
class NetnsNodes:
    """The two namespaces and their network; ``create()`` then ``destroy()`` (always)."""

    tag: str = field(default_factory=lambda: f"{random.randrange(1 << 24):06x}")
    subnet: str = field(default_factory=_free_subnet)
    ip: str = field(default_factory=lambda: _ip_binary() or "ip")

    @property
    def head(self) -> str:
        return f"sc-head-{self.tag}"

    @property
    def node(self) -> str:
        return f"sc-node-{self.tag}"

    @property
    def bridge(self) -> str:
        return f"scbr{self.tag}"

    def address(self, ns: str) -> str:
        """The node's own address (on ``scnet0``)."""
        return f"{self.subnet}.1" if ns == self.head else f"{self.subnet}.2"

    def create(self) -> NetnsNodes:
        """Raises RuntimeError with iproute2's message on any failed step."""
        self._must("link", "add", self.bridge, "type", "bridge")
        self._must("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        self._must("link", "set", self.bridge, "up")
        for ns, host_end in ((self.head, f"sch{self.tag}"), (self.node, f"scn{self.tag}")):
            self._must("netns", "add", ns)
            self._must("link", "add", host_end, "type", "veth", "peer", "name", IFACE,
                       "netns", ns)
            self._must("link", "set", host_end, "master", self.bridge, "up")
            self._must("-n", ns, "link", "set", "lo", "up")
            self._must("-n", ns, "addr", "add", f"{self.address(ns)}/24", "dev", IFACE)
            self._must("-n", ns, "link", "set", IFACE, "up")
        return self

    def popen(self, ns: str, args: list[str], log: Path, env: dict[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``args`` inside ``ns`` (its own session), stdout and stderr to ``log``."""
        with open(log, "ab") as out:
            return subprocess.Popen([self.ip, "netns", "exec", ns, *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    **kwargs)

    def listen_addresses(self, ns: str, port: int) -> list[str]:
        """The local addresses TCP sockets in ``ns`` listen on at ``port`` (``ss -ltn``),
        IPv4-mapped IPv6 ones (``[::ffff:a.b.c.d]``, how gRPC binds) as IPv4."""
        res = _run(self.ip, "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}")
        hosts = (line.split()[3].rsplit(":", 1)[0] for line in res.stdout.splitlines()
                 if line.strip())
        return sorted(h.removeprefix("[::ffff:").removesuffix("]") if h.startswith("[::ffff:")
                      else h for h in hosts)

    def pids(self, ns: str) -> list[int]:
        """Every process living in ``ns`` now."""
        res = _run(self.ip, "netns", "pids", ns)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def kill_node(self, ns: str, timeout_s: float = 30.0) -> int:
        """SIGKILL every process in ``ns`` (again until none is left: a dying Ray may still
        fork); returns how many were killed. Raises TimeoutError if some survive."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while pids := self.pids(ns):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes left in {ns}: {pids}")
            time.sleep(0.1)
        return len(killed)

    def destroy(self) -> None:
        """Kill everything in both namespaces, delete them and the bridge (idempotent); every
        step is tried, then a TimeoutError of ``kill_node`` (processes left) is raised."""
        errors: list[TimeoutError] = []
        for ns in (self.head, self.node):
            try:
                self.kill_node(ns)
            except TimeoutError as e:
                errors.append(e)
            _run(self.ip, "netns", "del", ns)
        _run(self.ip, "link", "del", self.bridge)
        if errors:
            raise errors[0]

    def _must(self, *args: str) -> None:
        res = _run(self.ip, *args)
        if res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
