"""deploy/k8s/etcd.yaml's etcd and raycluster.yaml's TLS proxy sidecar, run for real on this
machine: the manifests' own flags (addresses and file paths moved here, one member), the
certificates deploy/make_certs.py writes, and scission's own etcd client through the proxy."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from deploy_manifests import DEPLOY, REPO, container_named, head_template, make_certs, one

from scission.cluster.etcd_server import find_etcd_binary
from scission.registry.etcd_watch import WatchLoop
from scission.registry.workers import EtcdClientConfig, connect
from scission.worker.ports import find_free_port

MEMBER = "scission-etcd-0"
START_TIMEOUT_S = 30.0


def _local_etcd_args(certs: Path, data: Path, client: int, peer: int,
                     metrics: int) -> list[str]:
    """The StatefulSet's etcd flags for one member here: every URL flag moved to 127.0.0.1,
    the certificate paths to ``certs``; the TLS and auth flags unchanged."""
    template = one("StatefulSet", "scission-etcd")["spec"]["template"]
    moved = {
        "--data-dir": str(data),
        "--listen-client-urls": f"https://127.0.0.1:{client}",
        "--advertise-client-urls": f"https://127.0.0.1:{client}",
        "--listen-peer-urls": f"https://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls": f"https://127.0.0.1:{peer}",
        "--initial-cluster": f"{MEMBER}=https://127.0.0.1:{peer}",
        "--listen-metrics-urls": f"http://127.0.0.1:{metrics}",
    }
    args = []
    for arg in container_named(template, "etcd")["args"]:
        key = arg.split("=", 1)[0]
        arg = f"{key}={moved.pop(key)}" if key in moved else arg
        args.append(arg.replace("$(POD_NAME)", MEMBER).replace(
            "/etc/etcd/tls/", f"{certs}/scission-etcd-tls/"))
    assert not moved, f"the manifest lost flags: {sorted(moved)}"
    return args


def _sidecar() -> dict:
    return container_named(head_template(), "etcd-proxy")


def _local_proxy_argv(certs: Path, client: int, listen: int) -> list[str]:
    """The sidecar's command line here: this repository's script, the same flags but the
    addresses and the certificate folder."""
    sidecar = _sidecar()
    argv = [sys.executable, *(a.replace("/opt/scission/", f"{REPO}/")
                              for a in sidecar["command"][1:])]
    for arg in sidecar["args"]:
        if arg.startswith("--upstream="):
            arg = f"--upstream=localhost:{client}"  # a name on the certificate, as in-cluster
        elif arg.startswith("--listen="):
            arg = f"--listen=127.0.0.1:{listen}"
        argv.append(arg.replace("/etc/etcd-client/", f"{certs}/scission-etcd-client-tls/"))
    return argv


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"etcd exited: {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


def _etcdctl(*args: str) -> subprocess.CompletedProcess:
    etcdctl = str(Path(find_etcd_binary()).with_name("etcdctl"))
    return subprocess.run([etcdctl, *args], capture_output=True, text=True, timeout=30)


class Deployed:
    """etcd + proxy started from the manifests' flags; ports and the certificate folder."""

    def __init__(self, certs: Path, client: int, proxy: int) -> None:
        self.certs, self.client_port, self.proxy_port = certs, client, proxy


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Iterator[Deployed]:
    root = tmp_path_factory.mktemp("etcd-tls")
    certs = make_certs(root / "certs")
    client, peer, metrics, listen = (find_free_port() for _ in range(4))
    etcd_bin = find_etcd_binary()
    procs = [subprocess.Popen([etcd_bin, *_local_etcd_args(certs, root / "data", client, peer,
                                                           metrics)],
                              stdout=subprocess.DEVNULL, stderr=(root / "etcd.log").open("wb"))]
    try:
        _wait_healthy(f"http://127.0.0.1:{metrics}/health", procs[0])  # the probes' URL
        procs.append(subprocess.Popen(
            _local_proxy_argv(certs, client, listen),
            stdout=subprocess.DEVNULL, stderr=(root / "proxy.log").open("wb")))
        yield Deployed(certs, client, listen)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=10)


def _startup_probe(port: int) -> subprocess.CompletedProcess:
    """The sidecar's startup probe command, run until it passes or START_TIMEOUT_S."""
    command = _sidecar()["startupProbe"]["exec"]["command"]
    assert command[0] == "python"
    argv = [sys.executable, *(a.replace("/opt/scission/", f"{REPO}/").replace(
        "127.0.0.1:2379", f"127.0.0.1:{port}") for a in command[1:])]
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_sidecar_startup_probe_passes_through_the_proxy(deployed):
    """The sidecar's startup probe (an etcd status call through the proxy) succeeds, and
    fails where no proxy listens."""
    result = _startup_probe(deployed.proxy_port)
    assert result.returncode == 0, result.stderr
    nothing = subprocess.run([sys.executable, str(DEPLOY / "etcd_tls_proxy.py"), "--probe",
                              f"127.0.0.1:{find_free_port()}", "--timeout-s", "1"],
                             capture_output=True, timeout=30)
    assert nothing.returncode == 1


def test_scission_client_leases_and_watches_through_the_proxy(deployed):
    """scission's etcd client, given the proxy as --etcd-endpoints is, puts and reads under a
    lease, keeps the lease alive (python-etcd3's one-request keep-alive stream) and follows
    a prefix with the registry's own watch loop: what registration and discovery need."""
    assert _startup_probe(deployed.proxy_port).returncode == 0
    client = connect(EtcdClientConfig(endpoints=(f"127.0.0.1:{deployed.proxy_port}",)))
    seen: queue.SimpleQueue = queue.SimpleQueue()
    prefix = "/scission-deploy-test/"
    loop = WatchLoop(client, [prefix], lambda: client.get_prefix_response(prefix).header.revision,
                     lambda events, revision: [seen.put(e.kv.value) for e in events],
                     retry_interval_s=0.1, name="deploy-test")
    try:
        loop.start()
        lease = client.lease(ttl=5)
        client.put("/scission-deploy-test/worker", b"registered", lease=lease)
        assert client.get("/scission-deploy-test/worker")[0] == b"registered"
        for _ in range(3):
            assert list(client.refresh_lease(lease.id))[-1].TTL > 0
        assert seen.get(timeout=10) == b"registered"
        lease.revoke()
        assert client.get("/scission-deploy-test/worker")[0] is None
    finally:
        loop.close()
        client.close()


def test_etcd_refuses_clients_without_a_certificate(deployed):
    """Client-certificate auth: TLS with the right CA but no client certificate is refused,
    and plaintext gets nothing; the client certificate of the Secret gets in."""
    ca = deployed.certs / "scission-etcd-client-tls" / "ca.crt"
    endpoint = f"--endpoints=https://localhost:{deployed.client_port}"
    quick = ("--dial-timeout=1s", "--command-timeout=1s", "endpoint", "health")
    no_cert = _etcdctl(endpoint, f"--cacert={ca}", *quick)
    assert no_cert.returncode != 0
    plaintext = _etcdctl(f"--endpoints=http://127.0.0.1:{deployed.client_port}", *quick)
    assert plaintext.returncode != 0
    tls = deployed.certs / "scission-etcd-client-tls"
    with_cert = _etcdctl(endpoint, f"--cacert={ca}", f"--cert={tls / 'tls.crt'}",
                         f"--key={tls / 'tls.key'}", "--command-timeout=3s", "endpoint", "health")
    assert with_cert.returncode == 0, with_cert.stderr


def test_etcd_certificate_names_every_address_dialed_in_the_cluster(tmp_path):
    """The member certificate make_certs.py writes carries the client Service name the
    sidecar dials and each member's peer name in --initial-cluster, and both usages."""
    certs = make_certs(tmp_path / "certs")
    cert = x509.load_pem_x509_certificate(
        (certs / "scission-etcd-tls" / "tls.crt").read_bytes())
    names = set(cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    proxy_host = next(a for a in _sidecar()["args"]
                      if a.startswith("--upstream="))[len("--upstream="):].rsplit(":", 1)[0]
    assert proxy_host in names
    args = container_named(one("StatefulSet", "scission-etcd")["spec"]["template"],
                           "etcd")["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    for member in cluster.split("=", 1)[1].split(","):
        host = member.split("=", 1)[1].removeprefix("https://").rsplit(":", 1)[0]
        assert host in names, host
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH} <= usages
