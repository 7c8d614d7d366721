"""deploy/k8s/etcd.yaml's etcd and the head's etcd flags (raycluster.yaml), run for real on
this machine: etcd with the StatefulSet's own flags (addresses and file paths moved here, one
member), the certificates deploy/make_certs.py writes, and scission's etcd client config
built by ``etcd_config_from_files`` from the head's ``--etcd-cacert/--etcd-cert/--etcd-key``
(the files moved to where make_certs.py wrote the Secret's keys)."""

from __future__ import annotations

import dataclasses
import queue
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import etcd3
import pytest
from cryptography import x509
from deploy_manifests import (
    container_named,
    head_container,
    head_template,
    make_certs,
    one,
    scission_argvs,
    scission_up_argv,
)

from scission.cluster.cli import build_parser
from scission.cluster.commands import status
from scission.cluster.etcd_server import find_etcd_binary
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.workers import (
    EtcdClientConfig,
    RegistryConfig,
    WorkerInfo,
    WorkerRegistration,
    WorkerRole,
    connect,
    etcd_config_from_files,
)
from scission.worker.ports import find_free_port

MEMBER = "scission-etcd-0"
START_TIMEOUT_S = 30.0
LEASE_TTL_S = 2  # etcd's minimum with its default heartbeat and election timeout
REFUSED = ETCD_ERRORS + (etcd3.exceptions.Etcd3Exception,)


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


def _local_argv(argv: list[str], certs: Path, client: int) -> list[str]:
    """A head `scission` command line here: each mounted Secret's folder becomes the folder
    make_certs.py wrote for that Secret (its files are named by the Secret's keys, as the
    mounts' items are), and --etcd-endpoints becomes this etcd (``localhost``: a name on the
    member certificate, as the Service name is in the cluster)."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in head_template()["spec"]["volumes"]}
    folders = {m["mountPath"].rstrip("/") + "/": f"{certs / secrets[m['name']]}/"
               for m in head_container()["volumeMounts"]}
    local = []
    for i, word in enumerate(argv):
        if i > 0 and argv[i - 1] == "--etcd-endpoints":
            word = f"localhost:{client}"
        for mounted, folder in folders.items():
            word = word.replace(mounted, folder)
        local.append(word)
    return local


def _head_etcd_config(deployed: Deployed) -> EtcdClientConfig:
    """What `scission up` builds from the head's etcd flags and hands to every actor."""
    args = build_parser().parse_args(
        _local_argv(scission_up_argv(), deployed.certs, deployed.client_port))
    return etcd_config_from_files(args.etcd_endpoints.split(","), args.etcd_cacert,
                                  args.etcd_cert, args.etcd_key)


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


@dataclasses.dataclass(frozen=True)
class Deployed:
    """etcd started from the manifest's flags: its client port and the certificate folder."""

    certs: Path
    client_port: int


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Iterator[Deployed]:
    root = tmp_path_factory.mktemp("etcd-tls")
    certs = make_certs(root / "certs")
    client, peer, metrics = (find_free_port() for _ in range(3))
    proc = subprocess.Popen(
        [find_etcd_binary(), *_local_etcd_args(certs, root / "data", client, peer, metrics)],
        stdout=subprocess.DEVNULL, stderr=(root / "etcd.log").open("wb"))
    try:
        _wait_healthy(f"http://127.0.0.1:{metrics}/health", proc)  # the probes' URL
        yield Deployed(certs, client)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.PREFILL, endpoint="10.0.0.5:50061",
                      agent_name=f"nixl-{worker_id}", agent_metadata=b"md", kv_layout=b"",
                      num_blocks=64, block_size=16, model_id="m", started_at_s=time.time())


def test_registry_leases_keepalives_and_watch_with_the_head_flags(deployed):
    """With the config the head's flags give (what workers and the router receive through
    Ray), a worker registration grants a lease and its keep-alive thread holds it past two
    TTLs (same incarnation, no re-registration), and the router's WorkerDirectory sees the
    registration and the deregistration as watch events."""
    config = _head_etcd_config(deployed)
    assert config.endpoints == (f"localhost:{deployed.client_port}",)
    assert config.ca_pem and config.cert_pem and config.key_pem
    registry = RegistryConfig(prefix="/scission-deploy-test")
    added: queue.SimpleQueue = queue.SimpleQueue()
    removed: queue.SimpleQueue = queue.SimpleQueue()
    router_client, worker_client = connect(config), connect(config)
    directory = WorkerDirectory(router_client, registry, on_added=added.put,
                                on_removed=removed.put)
    registration = WorkerRegistration(worker_client, registry)
    try:
        directory.start()
        info = registration.register(make_info("prefill-0"), ttl_s=LEASE_TTL_S)
        assert info.incarnation > 0
        assert added.get(timeout=10) == info
        time.sleep(2.25 * LEASE_TTL_S)  # refreshed every ttl/3; lost without keep-alives
        assert worker_client.get_lease_info(info.incarnation).TTL > 0
        assert directory.get("prefill-0") == info and added.empty()
        assert registration.info == info
        registration.deregister()
        assert removed.get(timeout=10) == "prefill-0"
        assert directory.workers() == []
    finally:
        registration.deregister()
        directory.close()
        router_client.close()
        worker_client.close()


@pytest.mark.parametrize("who", ["no client certificate", "plaintext"])
def test_etcd_refuses_a_client_without_the_certificate(deployed, who):
    """Client-certificate auth: scission's client with the CA but no client certificate, or
    in plaintext, reads nothing; the same client with the head's files reads the key."""
    good = connect(_head_etcd_config(deployed))
    try:
        good.put("/scission-deploy-test/secret", b"v")
        assert good.get("/scission-deploy-test/secret")[0] == b"v"
    finally:
        good.close()
    head = _head_etcd_config(deployed)
    ca = head.ca_pem if who == "no client certificate" else b""
    client = connect(EtcdClientConfig(endpoints=head.endpoints, timeout_s=2.0, ca_pem=ca))
    try:
        with pytest.raises(REFUSED):
            client.get("/scission-deploy-test/secret")
    finally:
        client.close()


def test_head_waits_for_etcd_with_scission_status(deployed, capsys):
    """The head's wait line (`scission status` with the head's etcd flags) exits 0 once etcd
    answers, so `scission up` starts; the same line without the client files exits 1."""
    wait = next(argv for argv in scission_argvs() if argv[0] == "status")
    local = _local_argv(wait, deployed.certs, deployed.client_port)
    assert status(build_parser().parse_args(local)) == 0
    endpoint = local[local.index("--etcd-endpoints") + 1]
    assert status(build_parser().parse_args(["status", "--etcd-endpoints", endpoint])) == 1
    assert "etcd unreachable" in capsys.readouterr().err


def test_etcd_certificate_names_every_address_dialed_in_the_cluster(tmp_path):
    """The member certificate make_certs.py writes carries the client Service name `scission
    up` dials and each member's peer name in --initial-cluster, and both usages."""
    certs = make_certs(tmp_path / "certs")
    cert = x509.load_pem_x509_certificate(
        (certs / "scission-etcd-tls" / "tls.crt").read_bytes())
    names = set(cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    args = build_parser().parse_args(scission_up_argv())
    for endpoint in args.etcd_endpoints.split(","):
        assert endpoint.rsplit(":", 1)[0] in names, endpoint
    etcd_args = container_named(one("StatefulSet", "scission-etcd")["spec"]["template"],
                                "etcd")["args"]
    cluster = next(a for a in etcd_args if a.startswith("--initial-cluster="))
    for member in cluster.split("=", 1)[1].split(","):
        host = member.split("=", 1)[1].removeprefix("https://").rsplit(":", 1)[0]
        assert host in names, host
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH} <= usages
