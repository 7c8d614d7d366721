"""A worker's Prometheus exposition and published stats record (worker/metrics.py), built
from a StepRecorder and a stats function, without a runtime."""

from __future__ import annotations

import urllib.request

import msgpack

from scission.engine.step_metrics import StepRecorder, StepShape
from scission.proto.scission.internal.v1 import worker_pb2 as pb
from scission.registry.workers import WorkerStatsRecord
from scission.worker.metrics import MAX_PUBLISHED_STEPS, WorkerMetrics, stats_record


def sample(text: str, name: str) -> float:
    """Value of the sample line ``name`` (labels sorted by name) in an exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in exposition")


def make_stats() -> pb.WorkerStats:
    return pb.WorkerStats(worker_id="w0", role="decode", num_blocks=64, num_free_blocks=48,
                          num_running=3, num_waiting=2, num_held=1, queued_prefill_tokens=77,
                          kv_usage=0.25)


def test_exposition_has_the_steps_and_load():
    """Counters are the recorder's totals; the histograms hold every step recorded before a
    scrape (a second scrape adds only the new ones); the gauges are the stats function's."""
    recorder = StepRecorder()
    for shape, ms in ((StepShape(256, 0, 0), 40.0), (StepShape(0, 4, 400), 8.0),
                      (StepShape(16, 3, 300), 20.0)):
        recorder.record(shape, ms)
    metrics = WorkerMetrics("w0", recorder, make_stats)
    text = metrics.render().decode()
    assert sample(text, "scission_worker_steps_total") == 3
    assert sample(text, "scission_worker_step_busy_seconds_total") == 0.068
    assert sample(text, "scission_worker_prefill_tokens_total") == 272
    assert sample(text, "scission_worker_decode_tokens_total") == 7
    assert sample(text, "scission_worker_step_seconds_count") == 3
    assert sample(text, 'scission_worker_step_seconds_bucket{le="0.01"}') == 1
    assert sample(text, 'scission_worker_step_seconds_bucket{le="0.025"}') == 2
    assert sample(text, 'scission_worker_step_decode_requests_bucket{le="0.0"}') == 1
    assert sample(text, 'scission_worker_step_decode_requests_bucket{le="4.0"}') == 3
    assert sample(text, "scission_worker_step_decode_requests_sum") == 7
    assert sample(text, 'scission_worker_step_prefill_tokens_bucket{le="16.0"}') == 2
    assert sample(text, "scission_worker_step_prefill_tokens_sum") == 272
    assert sample(text, 'scission_worker_info{role="decode",worker_id="w0"}') == 1
    assert sample(text, "scission_worker_running_requests") == 3
    assert sample(text, "scission_worker_waiting_requests") == 2
    assert sample(text, "scission_worker_held_requests") == 1
    assert sample(text, "scission_worker_queued_prefill_tokens") == 77
    assert sample(text, "scission_worker_free_blocks") == 48
    assert sample(text, "scission_worker_kv_usage") == 0.25
    recorder.record(StepShape(0, 1, 50), 2.0)
    text = metrics.render().decode()
    assert sample(text, "scission_worker_step_seconds_count") == 4
    assert sample(text, "scission_worker_step_decode_requests_sum") == 8


def test_served_over_http(free_port):
    """/metrics on the given port serves the exposition; close() frees the port."""
    metrics = WorkerMetrics("w0", StepRecorder(), make_stats)
    port = metrics.serve("127.0.0.1", free_port)
    try:
        assert port == free_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert sample(text, "scission_worker_steps_total") == 0
        assert sample(text, "scission_worker_kv_usage") == 0.25
    finally:
        metrics.close()
    again = WorkerMetrics("w0", StepRecorder(), make_stats)
    assert again.serve("127.0.0.1", free_port) == free_port
    again.close()


def test_stats_record_keeps_the_newest_steps():
    """70 steps since the last publish: step_ms_mean is over all 70, ``steps`` the newest 64
    as [end_wall_s, prefill tokens, decode rows, context tokens, step_ms]; the record
    round-trips, and one without the new fields (an older worker) decodes with defaults."""
    recorder = StepRecorder()
    for i in range(70):
        recorder.record(StepShape(i, 2, 100 + i), step_ms=float(i), end_wall_s=1000.0 + i)
    steps, _ = recorder.since(0)
    stats = make_stats()
    stats.num_steps_total = 70
    record = stats_record(stats, steps, now_s=2000.0)
    assert (record.kv_usage, record.num_steps_total, record.step_ms_mean) == (0.25, 70, 34.5)
    assert len(record.steps) == MAX_PUBLISHED_STEPS == 64
    assert record.steps[0] == [1006.0, 6.0, 2.0, 106.0, 6.0]
    assert record.steps[-1] == [1069.0, 69.0, 2.0, 169.0, 69.0]
    assert (record.num_free_blocks, record.num_running, record.num_waiting,
            record.queued_prefill_tokens, record.updated_at_s) == (48, 3, 2, 77, 2000.0)
    assert WorkerStatsRecord.from_bytes(record.to_bytes()) == record
    assert stats_record(stats, [], now_s=1.0).step_ms_mean == 0.0
    old = msgpack.packb({"kind": "worker_stats", "version": 1, "num_free_blocks": 1,
                         "num_running": 0, "num_waiting": 0, "queued_prefill_tokens": 0,
                         "updated_at_s": 5.0})
    decoded = WorkerStatsRecord.from_bytes(old)
    assert (decoded.kv_usage, decoded.num_steps_total, decoded.step_ms_mean, decoded.steps) == \
        (0.0, 0, 0.0, [])
