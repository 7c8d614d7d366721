"""Process helpers for tests that run ``scission up`` / ``down`` as real processes (not
collected: no test_ prefix). They read /proc directly, independently of the code under test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def pid_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, Z, ...), None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Running: exists and is not a zombie (Z) or dead (X)."""
    return pid_state(pid) not in (None, "Z", "X")


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        head, tail = stat.rsplit(")", 1)
        fields = tail.split()
        if fields[0] in ("Z", "X"):
            continue
        pid = int(entry.name)
        names[pid] = head.split("(", 1)[1]
        children.setdefault(int(fields[1]), []).append(pid)
    out: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = names[pid]
        todo += children.get(pid, [])
    return out


def wait_dead(pids, timeout_s: float) -> list[int]:
    """Waits until none of ``pids`` is alive; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def etcd_data_root(pid: int) -> Path:
    """The root dir (``--data-dir``'s parent) of the etcd process ``pid``."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return Path(args[args.index(b"--data-dir") + 1].decode()).parent
