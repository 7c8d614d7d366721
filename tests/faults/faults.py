"""Load and invariants shared by the fault scenarios (not collected: no test_ prefix)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
from serving_helpers import all_blocks_free, token_request, wait_until

from scission.cluster.client import GenerationResult, connect, generate
from scission.cluster.launcher import LocalCluster
from scission.registry.directory import WorkerDirectory

# What a request may fail with when a fault made it unavoidable; anything else (INTERNAL,
# UNKNOWN, a hang to the deadline) breaks the invariant.
CLEAR_FAILURES = ("UNAVAILABLE", "CANCELLED", "ABORTED", "RESOURCE_EXHAUSTED")
DEADLINE_S = 240.0
NEW_TOKENS = 48  # greedy tokens per request, EOS ignored


@dataclass
class Load:
    """Requests streaming through the router; ``tokens_seen[i]`` counts chunks as they come."""

    futures: list[Future] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)

    def results(self) -> list[tuple[GenerationResult, float]]:
        return [f.result(timeout=DEADLINE_S + 30) for f in self.futures]


def start_load(address: str, prompts: list[list[int]], max_tokens: int,
               pool: ThreadPoolExecutor) -> Load:
    stub = connect(address)
    load = Load(tokens_seen=[0] * len(prompts))

    def run(i: int) -> tuple[GenerationResult, float]:
        def on_text(_delta: str) -> None:
            load.tokens_seen[i] += 1
        start = time.monotonic()
        res = generate(stub, token_request(prompts[i], max_tokens), timeout_s=DEADLINE_S,
                       on_text=on_text)
        return res, time.monotonic() - start

    load.futures = [pool.submit(run, i) for i in range(len(prompts))]
    return load


def check_outcomes(results: list[tuple[GenerationResult, float]], reference: list[list[int]],
                   max_failed: int) -> dict[str, int]:
    """Each request completed with exactly its reference tokens, or failed clearly well within
    its deadline; at most ``max_failed`` failed. Returns counts by outcome."""
    counts: dict[str, int] = {"ok": 0}
    for i, (res, elapsed_s) in enumerate(results):
        assert elapsed_s < DEADLINE_S - 5, f"request {i} ran to its deadline: {res.error}"
        if res.error:
            code = res.error.split(":", 1)[0]
            assert code in CLEAR_FAILURES, f"request {i}: {res.error}"
            counts[code] = counts.get(code, 0) + 1
            continue
        assert res.token_ids == reference[i][:len(res.token_ids)], f"request {i} differs"
        assert len(res.token_ids) == len(reference[i]), f"request {i}: {len(res.token_ids)}"
        counts["ok"] += 1
    assert sum(counts.values()) - counts["ok"] <= max_failed, counts
    return counts



def wait_all_free(cluster: LocalCluster, directory: WorkerDirectory, timeout_s: float = 90):
    wait_until(lambda: all_blocks_free(cluster, directory), timeout_s, interval_s=0.5)


def worker_pid(cluster: LocalCluster, worker_id: str) -> int:
    return ray.get(cluster.workers[worker_id].pid.remote(), timeout=30)


@contextmanager
def stopped(pid: int):
    """SIGSTOP ``pid`` for the body; SIGCONT on the way out, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    try:
        return wait_until(pred, timeout_s, interval_s=0.05)
    except AssertionError:
        raise AssertionError(f"{what}: not within {timeout_s}s") from None

