"""Forward-pass metrics (engine/step_metrics.py): what each engine step scheduled."""

from __future__ import annotations

from test_tiny_models import make_engine, save_tiny

from scission.engine.config import AttentionBackendKind
from scission.engine.request import SamplingParams
from scission.engine.step_metrics import StepRecorder, StepShape, StepTotals


def test_step_samples_equal_what_was_scheduled(tmp_path, tokenizer):
    """Budget 24 tokens, block 16: A (40-token prompt) and B (10) each generate 3 tokens.
    Step 1 prefills 24 of A; step 2 the last 16 of A + 8 of B; step 3 decodes A (context 41)
    and prefills B's last 2; step 4 decodes A (42) and B (11); step 5 decodes B (12). Each
    sample's prefill tokens, decode rows and context tokens equal this schedule; the totals
    add up; KV usage and queue depth are measured after the step."""
    engine = make_engine(save_tiny(tmp_path, "llama"), tokenizer, AttentionBackendKind.TORCH)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request("A", list(range(100, 140)), params)
    engine.add_request("B", list(range(200, 210)), params)
    while engine.has_unfinished():
        engine.step()
    samples, cursor = engine.step_metrics.since(0)
    shapes = [(s.num_prefill_tokens, s.num_decode_requests, s.num_context_tokens)
              for s in samples]
    assert shapes == [(24, 0, 0), (24, 0, 0), (2, 1, 41), (0, 2, 53), (0, 1, 12)]
    assert [(s.num_running, s.num_waiting) for s in samples] == \
        [(1, 1), (2, 0), (2, 0), (1, 0), (0, 0)]
    # A holds ceil(24 / 16) = 2 of 64 blocks after step 1; all are free (some cached) at the end
    assert samples[0].kv_usage == 2 / 64 and samples[-1].kv_usage == 0.0
    assert all(s.step_ms > 0 for s in samples)
    assert [s.end_wall_s for s in samples] == sorted(s.end_wall_s for s in samples)
    totals = engine.step_metrics.totals
    assert (cursor, totals.num_steps, totals.num_prefill_tokens, totals.num_decode_tokens) == \
        (5, 5, 50, 4)
    assert totals.step_ms == sum(s.step_ms for s in samples)
    assert engine.step_metrics.since(cursor) == ([], 5)
    assert samples[2].as_row() == [samples[2].end_wall_s, 2.0, 1.0, 41.0, samples[2].step_ms]


def test_recorder_ring_keeps_the_newest_and_cursors_are_per_reader():
    """With a ring of 2, three records leave the last two for a reader at cursor 0; a reader
    at cursor 2 gets only the third; totals count all three."""
    recorder = StepRecorder(ring_steps=2)
    for i in range(3):
        recorder.record(StepShape(10 * i, i, 5 * i), step_ms=float(i + 1), end_wall_s=100.0 + i)
    samples, cursor = recorder.since(0)
    assert [s.num_prefill_tokens for s in samples] == [10, 20] and cursor == 3
    assert [s.end_wall_s for s in recorder.since(2)[0]] == [102.0]
    assert recorder.totals == StepTotals(3, 6.0, 30, 3)
    assert recorder.last is not None and recorder.last.step_ms == 3.0
