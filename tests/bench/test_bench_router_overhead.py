"""Router-overhead arithmetic: paired differences against the direct path, by hand."""

from __future__ import annotations

import pytest

from scission.bench.router_overhead import RouterOverheadConfig, Sample, summarize


def test_overhead_is_the_median_paired_difference():
    cfg = RouterOverheadConfig(num_requests=3, max_tokens=5)
    direct = [(100.0, 500.0), (110.0, 520.0), (90.0, 480.0)]
    ids = [(101.0, 504.0), (113.0, 530.0), (90.5, 481.0)]  # diffs ttft 1, 3, 0.5; e2e 4, 10, 1
    chat = [(102.0, 502.0), (112.0, 522.0), (92.0, 482.0)]  # diffs ttft 2, 2, 2; e2e 2, 2, 2
    samples = [Sample(path, t, e, 5) for path, rows in
               (("direct", direct), ("router_ids", ids), ("router_chat", chat))
               for t, e in rows]
    doc = summarize(samples, cfg)
    assert doc["paths"]["direct"]["ttft_ms"]["p50"] == 100.0
    assert doc["paths"]["router_ids"]["e2e_ms"]["p50"] == 504.0
    ov = doc["overhead_vs_direct"]["router_ids"]
    assert ov["ttft_ms_p50"] == 1.0 and ov["e2e_ms_p50"] == 4.0
    assert ov["per_token_ms"] == pytest.approx((4.0 - 1.0) / 4)
    assert ov["ttft_ms_iqr"] == pytest.approx([0.75, 2.0])  # numpy linear: 0.5..1 .. 1..3
    chat_ov = doc["overhead_vs_direct"]["router_chat"]
    assert chat_ov["ttft_ms_p50"] == 2.0 and chat_ov["per_token_ms"] == 0.0
    assert "direct" not in doc["overhead_vs_direct"]


def test_config_rejects_a_single_output_token():
    with pytest.raises(ValueError):
        RouterOverheadConfig(max_tokens=1)
