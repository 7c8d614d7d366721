"""Helpers for the pools CLI tests (not collected: no test_ prefix)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import msgpack

from scission.registry.metrics import SloWindow
from scission.registry.pools import CommandState, PoolStore, PoolTargets
from scission.registry.workers import WorkerInfo, WorkerRole


def make_info(worker_id: str, role: WorkerRole, num_blocks: int = 100) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, role=role, endpoint="127.0.0.1:1", agent_name=f"nixl-{worker_id}",
        agent_metadata=b"md", kv_layout=msgpack.packb({"num_layers": 2}), num_blocks=num_blocks,
        block_size=16, model_id="tiny-llama", started_at_s=1700000000.0)


def make_window(scope: str, **overrides: float) -> SloWindow:
    fields = dict(
        router_id="router-a", scope=scope, window_s=30.0, updated_at_s=1700000000.0,
        slo_ttft_ms=2000.0, slo_tpot_ms=150.0, num_arrivals=60, num_finished=57, num_failed=1,
        arrival_rps=2.0, mean_prompt_tokens=400.0, mean_output_tokens=100.0, queue_p90_ms=12.0,
        ttft_p50_ms=310.0, ttft_p90_ms=820.0, tpot_p50_ms=41.0, tpot_p90_ms=66.0,
        itl_p90_ms=70.0, e2e_p90_ms=7000.0, ttft_attainment=0.95, tpot_attainment=1.0,
        attainment=0.95, goodput_rps=1.8)
    return SloWindow(**{**fields, **overrides})


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` (an etcd read) until it holds; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        time.sleep(0.02)


class RacingStore(PoolStore):
    """A PoolStore whose target writes each lose a race: before each of the first ``races``
    compare-and-swaps, a rival (the planner) writes ``rival`` unconditionally."""

    def __init__(self, client, config, rival: PoolTargets, races: int) -> None:
        super().__init__(client, config)
        self.rival, self.races, self.num_writes = rival, races, 0

    def write_targets(self, targets, expected_revision=None) -> bool:
        self.num_writes += 1
        if self.num_writes <= self.races:
            super().write_targets(replace(self.rival, written_at_s=time.time()))
        return super().write_targets(targets, expected_revision)


def fake_controller(store: PoolStore, final: CommandState, message: str) -> threading.Thread:
    """Takes the first command it sees: marks it RUNNING, then ``final`` (duration_s 1.5)."""
    def run() -> None:
        wait_until(store.commands)
        (command,) = store.commands()
        store.put_command(replace(command, state=CommandState.RUNNING, message="draining"))
        store.put_command(replace(command, state=final, message=message, duration_s=1.5))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
