"""Trace readers against the real files in ../shared/traces, and the scaling rule."""

from __future__ import annotations

import math

import pytest

from scission.bench.traces import (
    TraceKind,
    TraceRequest,
    TraceScaling,
    auto_length_scale,
    default_trace_dir,
    read_trace,
    scale_trace,
)


@pytest.fixture(scope="module")
def azure() -> list[TraceRequest]:
    return read_trace(TraceKind.AZURE_CONV)


@pytest.fixture(scope="module")
def mooncake_conv() -> list[TraceRequest]:
    return read_trace(TraceKind.MOONCAKE_CONV)


def test_default_trace_dir_is_shared() -> None:
    """The default trace folder is <checkout>/../shared/traces and holds all three files."""
    trace_dir = default_trace_dir()
    assert trace_dir.parts[-2:] == ("shared", "traces")
    for kind in TraceKind:
        assert (trace_dir / kind.file_name).is_file()


def test_azure_conv(azure: list[TraceRequest]) -> None:
    """19,366 rows; timestamps relative to the first row, exact to 100 ns; first rows as in the
    file (2023-11-16 18:15:46.6805900,374,44 / 18:15:50.9951690,396,109)."""
    assert len(azure) == 19_366
    assert azure[0] == TraceRequest(arrival_s=0.0, input_tokens=374, output_tokens=44)
    assert azure[1] == TraceRequest(arrival_s=4.314579, input_tokens=396, output_tokens=109)
    assert azure[-1].arrival_s == pytest.approx(3501.721937, abs=1e-9)  # 19:14:08.4025270
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(azure, azure[1:], strict=False))
    assert min(r.input_tokens for r in azure) == 2 and max(r.input_tokens for r in azure) == 14_050
    assert min(r.output_tokens for r in azure) == 7
    assert max(r.output_tokens for r in azure) == 1_000
    assert all(r.prefix_hash_ids == () for r in azure)


def test_mooncake_conv(mooncake_conv: list[TraceRequest]) -> None:
    """12,031 rows; ms -> s; first row 6758/500 with hash ids 0..13 (512-token blocks); the
    second row shares only block 0 with it; len(hash_ids) == ceil(input / 512) everywhere."""
    rows = mooncake_conv
    assert len(rows) == 12_031
    assert rows[0] == TraceRequest(0.0, 6758, 500, tuple(range(14)), 512)
    assert rows[1].input_tokens == 7322 and rows[1].output_tokens == 490
    assert rows[1].prefix_hash_ids[:2] == (0, 14)
    assert rows[-1].arrival_s == pytest.approx(3536.999)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(rows, rows[1:], strict=False))
    assert all(len(r.prefix_hash_ids) == math.ceil(r.input_tokens / 512) for r in rows)
    # Prefix sharing is common: many requests start with an id another request also starts with.
    first_ids = [r.prefix_hash_ids[0] for r in rows]
    assert len(set(first_ids)) < len(first_ids) // 2


def test_mooncake_synthetic() -> None:
    """3,993 rows; first row 40160/6 with hash ids 0..78; last arrival 1022.025 s."""
    rows = read_trace(TraceKind.MOONCAKE_SYNTHETIC)
    assert len(rows) == 3_993
    assert rows[0] == TraceRequest(0.0, 40_160, 6, tuple(range(79)), 512)
    assert rows[-1].arrival_s == pytest.approx(1022.025)


def test_max_requests_limit() -> None:
    """max_requests keeps the first N rows in file order."""
    rows = read_trace(TraceKind.AZURE_CONV, max_requests=3)
    assert [r.input_tokens for r in rows] == [374, 396, 879]


def test_scaling_clips_input_keeps_output() -> None:
    """Clip rule: output = min(output, C - 1), input = min(input, C - output); hash ids are cut
    to the blocks the prompt still covers; arrivals are multiplied by time_scale."""
    request = TraceRequest(10.0, 14_050, 100, tuple(range(28)), 512)
    (scaled,) = scale_trace([request], TraceScaling(max_context_tokens=8192, time_scale=0.5))
    assert scaled == TraceRequest(5.0, 8092, 100, tuple(range(16)), 512)  # ceil(8092/512) = 16
    (long_out,) = scale_trace([TraceRequest(0.0, 50, 9000)], TraceScaling(max_context_tokens=4096))
    assert (long_out.input_tokens, long_out.output_tokens) == (1, 4095)


def test_length_scale_and_auto() -> None:
    """length_scale multiplies input, output and block size (rounded, >= 1); 'auto' (None) picks
    C / max(input + output) so nothing is clipped."""
    requests = [
        TraceRequest(0.0, 1000, 24, (1, 2), 512),
        TraceRequest(1.0, 16_000, 384, (1, 3), 512),
    ]
    half = scale_trace(requests, TraceScaling(max_context_tokens=8192, length_scale=0.5))
    assert half[0] == TraceRequest(0.0, 500, 12, (1, 2), 256)
    assert auto_length_scale(requests, 8192) == 0.5
    auto = scale_trace(requests, TraceScaling(max_context_tokens=8192, length_scale=None))
    assert auto[1] == TraceRequest(1.0, 8000, 192, (1, 3), 256)
    assert all(r.input_tokens + r.output_tokens <= 8192 for r in auto)


def test_scaled_real_trace_fits_context(mooncake_conv: list[TraceRequest]) -> None:
    """After scaling, every request fits the context window and keeps >= 1 token each way."""
    scaled = scale_trace(mooncake_conv, TraceScaling(max_context_tokens=2048, length_scale=None))
    assert all(1 <= r.input_tokens and 1 <= r.output_tokens for r in scaled)
    assert all(r.input_tokens + r.output_tokens <= 2048 for r in scaled)
    assert all(
        len(r.prefix_hash_ids) <= math.ceil(r.input_tokens / r.hash_block_tokens) for r in scaled
    )
