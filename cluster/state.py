"""The state file ``scission up`` writes so ``down``, ``generate`` and ``status`` find it, and
the two small files ``down`` and ``up`` exchange beside it while the cluster stops:

- ``<state>.stop``: written by ``down`` before it signals ``up``: how long in-flight requests
  may run (``StopRequest``);
- ``<state>.report``: written by ``up`` once everything stopped, read by ``down`` for its exit
  code (``ShutdownReport``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scission.cluster.procs import pid_alive
from scission.registry.etcd_client import EtcdClientConfig, etcd_config_from_files

DEFAULT_STATE_FILE = Path(os.environ.get("SCISSION_STATE_FILE",
                                         Path.home() / ".scission" / "cluster.json"))


@dataclass(frozen=True)
class ClusterState:
    pid: int
    router_address: str
    etcd_endpoints: list[str]
    registry_prefix: str
    max_workers: int | None = None  # the worker budget (`up --max-workers` or its default)
    # etcd's TLS files [ca, cert, key] for later commands on this host: an external etcd's
    # (`up --etcd-cacert/--etcd-cert/--etcd-key`) or the embedded one's client certificate
    # (`up --embedded-etcd-tls`); [] = plaintext.
    etcd_tls_files: list[str] = field(default_factory=list)
    # `up --etcd-user` and the path of its --etcd-password-file ("" = $SCISSION_ETCD_PASSWORD);
    # never the password itself.
    etcd_user: str = ""
    etcd_password_file: str = ""

    def write(self, path: Path = DEFAULT_STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path = DEFAULT_STATE_FILE) -> ClusterState | None:
        """The file's contents whether or not its process still runs; None without a file."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def read(cls, path: Path = DEFAULT_STATE_FILE) -> ClusterState | None:
        """The state of a running cluster, or None (no file, or its process is gone: exited,
        or a zombie nobody reaped)."""
        state = cls.load(path)
        return state if state is not None and pid_alive(state.pid) else None


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@dataclass(frozen=True)
class StopRequest:
    """What ``scission down`` asks of ``up``: in-flight requests get ``grace_s`` to finish."""

    pid: int  # the `up` process it is meant for
    grace_s: float

    def write(self, state_path: Path = DEFAULT_STATE_FILE) -> None:
        _sibling(state_path, ".stop").write_text(json.dumps(asdict(self)))

    @classmethod
    def take(cls, pid: int, state_path: Path = DEFAULT_STATE_FILE) -> StopRequest | None:
        """The request for ``pid`` (the file is removed), None if there is none."""
        path = _sibling(state_path, ".stop")
        try:
            request = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        path.unlink(missing_ok=True)
        return request if request.pid == pid else None


@dataclass(frozen=True)
class ShutdownReport:
    """How the stop of ``pid`` went: ``problems`` empty = every process of the cluster ended
    and the embedded etcd's data dir is gone."""

    pid: int
    problems: list[str] = field(default_factory=list)
    requests_cut: int = 0  # still running when the grace period ended
    killed: list[str] = field(default_factory=list)  # "name (pid)" that needed SIGKILL

    @property
    def ok(self) -> bool:
        return not self.problems

    def write(self, state_path: Path = DEFAULT_STATE_FILE) -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        _sibling(state_path, ".report").write_text(json.dumps(asdict(self)))

    @classmethod
    def take(cls, pid: int, state_path: Path = DEFAULT_STATE_FILE) -> ShutdownReport | None:
        """The report of ``pid`` (the file is removed), None if it wrote none."""
        path = _sibling(state_path, ".report")
        try:
            report = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if report.pid != pid:
            return None
        path.unlink(missing_ok=True)
        return report


def etcd_tls_files(args) -> list[str]:
    """[ca, cert, key] from --etcd-cacert/--etcd-cert/--etcd-key ([] when none is given)."""
    files = [getattr(args, n, None) or "" for n in ("etcd_cacert", "etcd_cert", "etcd_key")]
    return [os.path.abspath(f) if f else "" for f in files] if any(files) else []


def etcd_client_config(args, endpoints, state: ClusterState | None) -> EtcdClientConfig:
    """The etcd client config of a CLI command: TLS files and user from the flags, else from
    the state file of ``scission up``; the password from --etcd-password-file (or the state's
    file), else ``$SCISSION_ETCD_PASSWORD``.

    Raises:
        ValueError: a file cannot be read, a user without a password, ...
    """
    tls = etcd_tls_files(args) or (state.etcd_tls_files if state else [])
    user = getattr(args, "etcd_user", None) or (state.etcd_user if state else "")
    password_file = getattr(args, "etcd_password_file", None) or (
        state.etcd_password_file if state and user == state.etcd_user else "")
    return etcd_config_from_files(endpoints, *tls, user=user or "",
                                  password_file=password_file or None)
