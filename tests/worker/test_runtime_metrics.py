"""A real WorkerRuntime (tiny random-weight model, real etcd and NIXL agent): its published
stats record carries the engine steps, and its /metrics endpoint is bound and closed."""

from __future__ import annotations

import urllib.request

from worker_helpers import tiny_worker_config, wait_for

from scission.engine.request import SamplingParams
from scission.registry.workers import WorkerStatsRecord as Stats
from scission.worker.runtime import BaseWorkerServicer, WorkerRuntime


def test_runtime_publishes_steps_and_serves_metrics(tmp_path, tokenizer, etcd_server,
                                                    etcd_client, etcd_prefix):
    """A 20-token prompt generating 3 tokens (budget 24: one prefill step, two decode steps)
    shows up in the published WorkerStatsRecords as 3 step rows [end, 20, 0, 0, ms],
    [end, 0, 1, 21, ms], [end, 0, 1, 22, ms]; GetStats and /metrics count the same 3 steps;
    stop() closes the port."""
    cfg = tiny_worker_config(tmp_path, tokenizer, etcd_server, etcd_prefix, "c0",
                             metrics_port=0, stats_interval_s=1.0)
    runtime = WorkerRuntime(cfg, lambda role: BaseWorkerServicer)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    runtime.engine.add_request("r", list(range(100, 120)), params)  # runs once started
    runtime.start()
    try:
        assert runtime.metrics_port
        key = f"{etcd_prefix}/stats/c0"
        seen: dict[float, Stats] = {}  # every published record, by updated_at_s

        def all_steps_seen() -> bool:
            value, _ = etcd_client.get(key)
            if value:
                r = Stats.from_bytes(value)
                seen[r.updated_at_s] = r
            return sum(len(r.steps) for r in seen.values()) >= 3

        wait_for(all_steps_seen)
        rows = [row for _, r in sorted(seen.items()) for row in r.steps]
        assert max(r.num_steps_total for r in seen.values()) == 3
        assert [row[1:4] for row in rows] == [[20.0, 0.0, 0.0], [0.0, 1.0, 21.0], [0.0, 1.0, 22.0]]
        assert all(row[4] > 0 for row in rows)
        stats = runtime.stats()
        assert (stats.num_steps_total, stats.num_prefill_tokens_total,
                stats.num_decode_tokens_total, stats.last_num_decode_requests) == (3, 20, 2, 1)
        assert stats.kv_usage == 0.0  # finished: every block is free (or cached-free)
        url = f"http://127.0.0.1:{runtime.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        assert "scission_worker_steps_total 3.0" in text
        assert "scission_worker_step_seconds_count 3.0" in text
        assert 'scission_worker_info{role="colocated",worker_id="c0"} 1.0' in text
    finally:
        runtime.stop()
    try:
        urllib.request.urlopen(url, timeout=2)
        raise AssertionError("metrics endpoint still up after stop()")
    except OSError:
        pass


def test_stats_publisher_survives_a_failing_read(tmp_path, tokenizer, etcd_server, etcd_client,
                                                 etcd_prefix):
    """The first two stats() calls of the publisher raise (as a racing read of engine state
    could): the thread logs them and keeps publishing; a record with the finished request's
    3 steps still reaches etcd."""
    cfg = tiny_worker_config(tmp_path, tokenizer, etcd_server, etcd_prefix, "c1",
                             stats_interval_s=0.2)
    runtime = WorkerRuntime(cfg, lambda role: BaseWorkerServicer)
    real_stats, failures = runtime.stats, []

    def flaky_stats():
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("deque mutated during iteration")
        return real_stats()

    runtime.stats = flaky_stats
    runtime.engine.add_request("r", list(range(100, 120)),
                               SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    runtime.start()
    try:
        def published() -> bool:
            value, _ = etcd_client.get(f"{etcd_prefix}/stats/c1")
            return bool(value) and Stats.from_bytes(value).num_steps_total == 3

        wait_for(published)
        assert len(failures) == 2
    finally:
        runtime.stop()
