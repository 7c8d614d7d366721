"""Pure logic of the KV-transfer benchmark: KV geometry, block patterns, repeats, statistics,
the READ log parser and the hand-off arithmetic (no NIXL, no processes)."""

from __future__ import annotations

import pytest

from scission.bench.kv_handoff import parse_read_logs
from scission.bench.kv_transfer_report import format_handoff_table, handoff_rows
from scission.bench.kv_transfer_shapes import (
    KVShape,
    block_ids,
    gb_per_s,
    latency_stats,
    repeats_for,
)
from scission.kv_transfer.descriptors import merge_block_runs

SMOLLM2 = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float32")


def test_smollm2_geometry() -> None:
    """SmolLM2-135M: 46,080 B of K+V per token in float32, half in bfloat16; a 1k-token
    READ moves 64 blocks x 60 tensors x 12,288 B; one run is 60 descriptors."""
    assert SMOLLM2.bytes_per_block == 16 * 3 * 64 * 4 == 12288
    assert SMOLLM2.bytes_per_token == 46080
    bf16 = KVShape(30, 3, 64, 16, "bfloat16")
    assert bf16.bytes_per_token == 23040
    assert SMOLLM2.num_blocks(1024) == 64 and SMOLLM2.num_blocks(1025) == 65
    assert SMOLLM2.transfer_bytes(1024) == 1024 * 46080 == 47_185_920
    assert SMOLLM2.transfer_bytes(1000) == 63 * 60 * 12288  # whole blocks
    assert SMOLLM2.num_descriptors(1) == 60 and SMOLLM2.num_descriptors(64) == 3840


def test_bad_shape_rejected() -> None:
    """An unknown dtype or a zero dimension is refused."""
    with pytest.raises(ValueError):
        KVShape(30, 3, 64, 16, "int8")
    with pytest.raises(ValueError):
        KVShape(30, 0, 64, 16, "float32")


@pytest.mark.parametrize("num_blocks", [1, 16, 64])
def test_block_patterns(num_blocks: int) -> None:
    """contiguous = one run on both sides; fragmented = every block its own run, ids in range,
    distinct, locals 0..n-1."""
    remote, local = block_ids("contiguous", num_blocks, 128)
    assert remote == local == list(range(num_blocks))
    assert len(merge_block_runs(remote, local)) == 1
    remote, local = block_ids("fragmented", num_blocks, 128, seed=3)
    assert local == list(range(num_blocks))
    assert len(set(remote)) == num_blocks and all(0 <= b < 128 for b in remote)
    assert len(merge_block_runs(remote, local)) == num_blocks
    assert remote == sorted(remote, reverse=True)


def test_block_patterns_bounds() -> None:
    """The whole cache may be used; more blocks than the cache, or an unknown pattern, fail."""
    remote, _ = block_ids("fragmented", 8, 8)
    assert remote == [7, 6, 5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError):
        block_ids("contiguous", 9, 8)
    with pytest.raises(ValueError):
        block_ids("striped", 4, 8)


def test_repeats_for() -> None:
    """Full repeats up to 1k tokens, proportionally fewer above, never below the minimum."""
    assert [repeats_for(n, 20, 5) for n in (256, 1024, 4096, 16384)] == [20, 20, 5, 5]
    assert repeats_for(2048, 20, 5) == 10


def test_latency_stats_and_bandwidth() -> None:
    """Median, p90 (linear interpolation) and min, in ms, from seconds; GB/s = 1e9 B/s."""
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats == {"n": 5, "median_ms": 3.0, "p90_ms": pytest.approx(7.6), "min_ms": 1.0}
    assert gb_per_s(2_000_000_000, 1000.0) == 2.0
    with pytest.raises(ValueError):
        latency_stats([])


def test_parse_read_logs() -> None:
    """The agent's DEBUG line gives descriptors, bytes and ms; other lines are ignored."""
    text = ("2026-11-30 10:00:00 INFO scission.worker: something else\n"
            "2026-11-30 10:00:01 DEBUG scission.kv_transfer.agent: READ 60 descriptors, "
            "47185920 bytes from prefill-0:12 in 9.512 ms (4.96 GB/s)\n")
    assert parse_read_logs(text) == [{"descriptors": 60, "bytes": 47185920, "read_ms": 9.512}]


def test_handoff_rows_arithmetic() -> None:
    """hand-off = Decode's first chunk - a decode step; other = hand-off - READ; READ logs are
    matched to requests in order after the warm-up ones, and their bytes checked."""
    n, nbytes = 1024, SMOLLM2.transfer_bytes(1024)
    samples = [{"path": "router", "num_tokens": n, "ttft_ms": 4000.0, "t2_ms": 4120.0,
                "step_ms": 60.0},
               {"path": "direct", "num_tokens": n, "prefill_ms": 3900.0,
                "decode_first_ms": 100.0, "step_ms": 60.0}]
    reads = [{"descriptors": 60, "bytes": 1, "read_ms": 50.0}] * 2 + \
            [{"descriptors": 60, "bytes": nbytes, "read_ms": 10.0},
             {"descriptors": 120, "bytes": nbytes, "read_ms": 12.0}]
    rows = handoff_rows({"samples": samples, "reads": reads, "warmup_reads": 2}, SMOLLM2)
    assert len(rows) == 1
    r = rows[0]
    assert (r["handoff_ms"], r["read_ms"], r["other_ms"]) == (40.0, 11.0, 29.0)
    assert r["router_gap_ms"] == 120.0 and r["descriptors_max"] == 120
    assert r["handoff_per_step"] == pytest.approx(40 / 60)
    assert "| 1024 |" in format_handoff_table(rows)
    with pytest.raises(AssertionError):  # a READ of the wrong size is not this request's
        bad = reads[:3] + [{"descriptors": 60, "bytes": 5, "read_ms": 1.0}]
        handoff_rows({"samples": samples, "reads": bad, "warmup_reads": 2}, SMOLLM2)
