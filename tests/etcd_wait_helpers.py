"""Helpers for the tests of components that start while etcd is away (not collected)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from scission.cluster.etcd_server import EmbeddedEtcdConfig
from scission.worker.ports import find_free_port


def etcd_not_started(tmp_path: Path) -> tuple[EmbeddedEtcdConfig, str]:
    """The config of an embedded etcd on free ports that nothing has started yet, and its
    client endpoint ``host:port``."""
    cfg = EmbeddedEtcdConfig(data_dir=str(tmp_path / "etcd"), client_port=find_free_port(),
                             peer_port=find_free_port(), unsafe_no_fsync=True)
    return cfg, f"127.0.0.1:{cfg.client_port}"


def start_in_background(start: Callable[[], object]) -> tuple[threading.Thread,
                                                               list[BaseException]]:
    """Run ``start()`` on a thread; what it raises lands in the returned list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start()
        except BaseException as e:  # reported by the caller's assertions
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def wait_for(predicate: Callable[[], object], timeout_s: float) -> bool:
    """True once ``predicate()`` holds, False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
