"""Helpers for the KV-index tests (not collected: no test_ prefix)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgpack

from scission.engine.kv_events import KVEvent, KVEventKind
from scission.registry.workers import WorkerInfo, WorkerRole


def make_info(worker_id: str, role: WorkerRole = WorkerRole.PREFILL) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, role=role, endpoint="127.0.0.1:1", agent_name=f"nixl-{worker_id}",
        agent_metadata=b"md", kv_layout=msgpack.packb({"num_layers": 2}), num_blocks=128,
        block_size=16, model_id="tiny-llama", started_at_s=1700000000.0,
    )


def stored(event_id: int, hashes: Iterable[int]) -> KVEvent:
    return KVEvent(event_id, KVEventKind.STORED, tuple(hashes))


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0,
               interval_s: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; AssertionError after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - start
