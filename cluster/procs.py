"""Local processes as ``scission up`` / ``down`` see them, from /proc (Linux).

``os.kill(pid, 0)`` succeeds for a zombie (exited, not yet reaped by its parent), so liveness
reads the process state instead; elsewhere it falls back to ``os.kill``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_PROC = Path("/proc")
_GONE_STATES = ("Z", "X")  # zombie, dead


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``Z``...), None when there is no such
    process. Without /proc: ``"?"`` for a process ``os.kill(pid, 0)`` finds."""
    if not _PROC.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # exists, owned by someone else
            return "?"
        return "?"
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:  # no such pid (or it vanished while we read)
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the name in (...) may hold spaces


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs: it exists and is neither a zombie nor dead."""
    return pid > 0 and process_state(pid) not in (None, *_GONE_STATES)


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of every running descendant of ``root`` (children, theirs...)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        state, ppid = tail.split()[:2]
        if state in _GONE_STATES:
            continue
        names[int(entry.name)] = head.split("(", 1)[1]
        children.setdefault(int(ppid), []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found[pid] = names[pid]
        todo += children.get(pid, ())
    return found


def wait_gone(pids: dict[int, str], timeout_s: float, poll_s: float = 0.1) -> dict[int, str]:
    """Waits up to ``timeout_s`` for ``pids`` to end; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {pid: name for pid, name in pids.items() if pid_alive(pid)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def end_processes(pids: dict[int, str], timeout_s: float) -> tuple[dict[int, str], dict[int, str]]:
    """Waits ``timeout_s`` for ``pids`` to end by themselves, SIGKILLs the rest and waits for
    them too. Returns (killed, survivors): those that needed SIGKILL, and those still running
    after it."""
    left = wait_gone(pids, timeout_s)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # ended meanwhile, or not ours
            pass
    return left, wait_gone(left, 5.0)
