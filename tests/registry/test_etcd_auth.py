"""etcd user/password auth against a real etcd with `auth enable` (plaintext, as python3-etcd3's
own auth cannot do): the right password reads, writes and keeps a lease alive as
WorkerRegistration does; a wrong password or no user is refused with a clear error; a token
that etcd expired (``--auth-token-ttl 1``) or forgot (restart) is replaced by a new one."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import etcd3
import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from scission.cluster.etcd_server import find_etcd_binary
from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_auth import EtcdAuthError, EtcdTokenAuth
from scission.registry.etcd_client import EtcdClientConfig, connect, etcd_config_from_files
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.workers import RegistryConfig, WorkerInfo, WorkerRegistration, WorkerRole
from scission.worker.ports import find_free_port

USER, PASSWORD = "scission", "s3cret pw"
TOKEN_TTL_S = 1


class AuthEtcd:
    """An etcd on free ports with a user that may read and write /scission-auth/."""

    def __init__(self, tmp: Path) -> None:
        self.data_dir = tmp / "data"
        self.endpoint = f"127.0.0.1:{find_free_port('127.0.0.1')}"
        self.peer = f"http://127.0.0.1:{find_free_port('127.0.0.1')}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        url = f"http://{self.endpoint}"
        self.proc = subprocess.Popen(
            [find_etcd_binary(), "--data-dir", str(self.data_dir), "--name", "auth",
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
             "--initial-cluster", f"auth={self.peer}", "--unsafe-no-fsync",
             "--auth-token-ttl", str(TOKEN_TTL_S)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        channel = grpc.insecure_channel(self.endpoint)
        grpc.channel_ready_future(channel).result(timeout=30)
        self.auth = rpc_grpc.AuthStub(channel)

    def enable_auth(self) -> None:
        """root (needed to enable auth) and USER with readwrite on /scission-auth/."""
        a = self.auth
        a.UserAdd(rpc.AuthUserAddRequest(name="root", password="rootpw"), timeout=30)
        a.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        a.RoleAdd(rpc.AuthRoleAddRequest(name="rw"))
        perm = rpc.auth__pb2.Permission(permType=rpc.auth__pb2.Permission.READWRITE,
                                        key=b"/scission-auth/", range_end=b"/scission-auth0")
        a.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="rw", perm=perm))
        a.UserAdd(rpc.AuthUserAddRequest(name=USER, password=PASSWORD))
        a.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=USER, role="rw"))
        a.AuthEnable(rpc.AuthEnableRequest())

    def stop(self, graceful: bool = False) -> None:
        """SIGKILL, or SIGTERM (etcd commits its state: nothing of auth is lost)."""
        if self.proc is not None:
            self.proc.terminate() if graceful else self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def auth_etcd():
    with tempfile.TemporaryDirectory() as tmp:
        server = AuthEtcd(Path(tmp))
        try:
            server.start()
            server.enable_auth()
            yield server
        finally:
            server.stop()


def _config(server: AuthEtcd, user: str = USER, password: str = PASSWORD) -> EtcdClientConfig:
    return EtcdClientConfig(endpoints=(server.endpoint,), timeout_s=5.0, user=user,
                            password=password)


def test_the_right_password_reads_writes_and_keeps_a_lease(auth_etcd):
    client = connect(_config(auth_etcd))
    try:
        client.put("/scission-auth/k", b"v")
        assert client.get("/scission-auth/k")[0] == b"v"
        lease = client.lease(5)  # as WorkerRegistration: grant, put under it, keep alive
        client.put("/scission-auth/leased", b"w", lease=lease)
        assert [r.TTL for r in client.refresh_lease(lease.id)] == [5]
        with pytest.raises(grpc.RpcError, match="permission denied"):  # the role's limit
            client.put("/elsewhere", b"x")
    finally:
        client.close()


def test_wrong_password_and_no_user_are_refused(auth_etcd):
    wrong = connect(_config(auth_etcd, password="not it"))
    with pytest.raises(EtcdAuthError, match="refused user 'scission'.*invalid user ID or "
                                            "password"):
        wrong.get("/scission-auth/k")
    wrong.close()
    anonymous = connect(EtcdClientConfig(endpoints=(auth_etcd.endpoint,), timeout_s=5.0))
    with pytest.raises(grpc.RpcError, match="user name is empty"):
        anonymous.get("/scission-auth/k")
    anonymous.close()


def test_the_password_is_never_shown_and_comes_from_a_file_or_env(tmp_path, monkeypatch):
    cfg = _config_from(tmp_path, monkeypatch)
    assert cfg.user == USER and cfg.password == PASSWORD and PASSWORD not in repr(cfg)
    with pytest.raises(ValueError, match="both a user and a password"):
        EtcdClientConfig(user=USER)
    with pytest.raises(ValueError, match="needs --etcd-user"):
        etcd_config_from_files(["127.0.0.1:2379"], password_file=str(tmp_path / "pw"))


def _config_from(tmp_path: Path, monkeypatch) -> EtcdClientConfig:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    from_file = etcd_config_from_files(["127.0.0.1:2379"], user=USER,
                                       password_file=str(tmp_path / "pw"))
    monkeypatch.setenv("SCISSION_ETCD_PASSWORD", PASSWORD)
    from_env = etcd_config_from_files(["127.0.0.1:2379"], user=USER)
    assert from_env == from_file
    return from_file


def _token_expired(server: AuthEtcd, token: str) -> bool:
    kv = rpc_grpc.KVStub(grpc.insecure_channel(server.endpoint))
    try:
        kv.Range(rpc.RangeRequest(key=b"/scission-auth/k"), metadata=(("token", token),),
                 timeout=5)
        return False
    except grpc.RpcError as exc:
        assert "invalid auth token" in (exc.details() or ""), exc
        return True


def test_an_expired_token_is_replaced(auth_etcd):
    """etcd drops a token unused for --auth-token-ttl: the next call authenticates again and
    succeeds (with python3-etcd3's own auth every call would fail from then on)."""
    channel = grpc.insecure_channel(auth_etcd.endpoint)
    auth = EtcdTokenAuth(channel, USER, PASSWORD, timeout_s=5.0)
    kv = rpc_grpc.KVStub(grpc.intercept_channel(channel, auth))
    kv.Put(rpc.PutRequest(key=b"/scission-auth/t", value=b"1"), timeout=5)
    first = auth.token()
    assert auth.num_authentications == 1
    # A token unused for the TTL is gone; its TTL restarts at each use, so look at it only
    # after the TTL (etcd checks expiry about once a second).
    deadline = time.monotonic() + 30
    while True:
        time.sleep(TOKEN_TTL_S + 1.5)
        if _token_expired(auth_etcd, first) or time.monotonic() > deadline:
            break
    assert _token_expired(auth_etcd, first)
    assert kv.Range(rpc.RangeRequest(key=b"/scission-auth/t"), timeout=5).kvs[0].value == b"1"
    assert auth.num_authentications == 2 and auth.token() != first


def _auth_enforced(server: AuthEtcd) -> bool:
    """etcd is up and refuses a call without a token."""
    kv = rpc_grpc.KVStub(grpc.insecure_channel(server.endpoint))
    try:
        kv.Range(rpc.RangeRequest(key=b"/scission-auth/r"), timeout=2)
    except grpc.RpcError as exc:
        return "user name is empty" in (exc.details() or "")
    return False


def test_a_restarted_etcd_forgets_tokens_and_the_client_carries_on(auth_etcd):
    client = connect(_config(auth_etcd))
    try:
        client.put("/scission-auth/r", b"1")
        auth_etcd.stop(graceful=True)
        auth_etcd.start()  # same data dir: users and keys kept, simple tokens gone
        deadline = time.monotonic() + 30
        while not _auth_enforced(auth_etcd):
            assert time.monotonic() < deadline, "etcd did not come back with auth on"
            time.sleep(0.1)
        while True:  # the old token is refused first: only a re-authenticated get passes
            try:
                assert client.get("/scission-auth/r")[0] == b"1"
                break
            except (etcd3.exceptions.ConnectionFailedError,
                    etcd3.exceptions.NoServerAvailableError):  # our channel still reconnecting
                assert time.monotonic() < deadline, "the client did not reconnect"
                time.sleep(0.1)
    finally:
        client.close()


def _info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.DECODE, endpoint="127.0.0.1:1",
                      agent_name=worker_id, agent_metadata=b"", kv_layout=b"", num_blocks=8,
                      block_size=16, model_id="m", started_at_s=0.0)


def _wait(pred, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_the_registry_outlives_an_etcd_restart_with_auth(auth_etcd):
    """A worker's registration (lease + keep-alive) and the router's directory (watch) on an
    etcd with auth: after a restart (every token gone) the watch follows a worker registered
    after it, and the one registered before is kept alive past two TTLs."""
    registry = RegistryConfig(prefix="/scission-auth/reg")
    before = WorkerRegistration(connect(_config(auth_etcd)), registry)
    before.register(_info("w-before"), ttl_s=2)
    directory = WorkerDirectory(connect(_config(auth_etcd)), registry).start()
    after = WorkerRegistration(connect(_config(auth_etcd)), registry)
    try:
        _wait(lambda: [w.worker_id for w in directory.workers()] == ["w-before"])
        auth_etcd.stop(graceful=True)
        auth_etcd.start()
        _wait(lambda: _auth_enforced(auth_etcd))
        while True:  # etcd just came back: the first calls may find no connection yet
            try:
                after.register(_info("w-after"), ttl_s=2)
                break
            except ETCD_ERRORS as exc:
                assert "auth" not in str(exc), exc
                time.sleep(0.1)
        _wait(lambda: [w.worker_id for w in directory.workers()] == ["w-after", "w-before"])
        time.sleep(2 * 2)  # two TTLs: "w-before" is kept alive, not expired
        assert [w.worker_id for w in directory.workers()] == ["w-after", "w-before"]
    finally:
        after.deregister()
        before.deregister()
        directory.close()


def test_cli_carries_the_user_to_the_cluster_and_status(auth_etcd, tmp_path, capsys,
                                                        monkeypatch):
    """`up --etcd-user --etcd-password-file` puts user and password in the cluster's etcd
    config (refused without --etcd-endpoints); `status` with them reads etcd, and with the
    user from the state file of `up` too; with a wrong password it fails (exit 1)."""
    from scission.cluster.cli import build_parser
    from scission.cluster.commands import cluster_config, status
    from scission.cluster.state import ClusterState, etcd_client_config

    monkeypatch.delenv("SCISSION_ETCD_PASSWORD", raising=False)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    auth = ["--etcd-user", USER, "--etcd-password-file", str(tmp_path / "pw")]
    parse = build_parser().parse_args
    cfg = cluster_config(parse(["up", "--etcd-endpoints", auth_etcd.endpoint, *auth]))
    assert (cfg.etcd_tls.user, cfg.etcd_tls.password) == (USER, PASSWORD)
    with pytest.raises(ValueError, match="pass --etcd-endpoints too"):
        cluster_config(parse(["up", *auth]))
    with pytest.raises(ValueError, match="--embedded-etcd-tls is for the embedded etcd"):
        cluster_config(parse(["up", "--etcd-endpoints", auth_etcd.endpoint,
                              "--embedded-etcd-tls"]))
    args = parse(["status", "--etcd-endpoints", auth_etcd.endpoint, "--prefix",
                  "/scission-auth", *auth])
    assert status(args) == 0 and "pools: none" in capsys.readouterr().out
    state = ClusterState(1, "127.0.0.1:1", [auth_etcd.endpoint], "/scission-auth",
                         etcd_user=USER, etcd_password_file=str(tmp_path / "pw"))
    from_state = etcd_client_config(parse(["status"]), [auth_etcd.endpoint], state)
    assert (from_state.user, from_state.password) == (USER, PASSWORD)
    (tmp_path / "bad").write_text("wrong\n")
    args = parse(["status", "--etcd-endpoints", auth_etcd.endpoint, "--prefix",
                  "/scission-auth", "--etcd-user", USER, "--etcd-password-file",
                  str(tmp_path / "bad")])
    assert status(args) == 1 and "invalid user ID or password" in capsys.readouterr().err
