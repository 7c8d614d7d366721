"""``scission bench serve`` end to end against the fake router, and the plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_fakes import FakeRouter

from scission.bench import serve
from scission.bench.metrics import RequestRecord
from scission.bench.plots import plot_attainment_vs_rate, plot_latency_cdfs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every option of the command with its default."""
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--router", "--workload", "--trace-dir", "--arrival", "--rate", "--burstiness",
        "--concurrency", "--time-scale", "--num-requests", "--max-requests", "--input-len",
        "--output-len", "--input-len-dist", "--output-len-dist", "--max-context-tokens",
        "--ttft-slo-ms", "--tpot-slo-ms", "--attainment-target", "--sweep-rates",
        "--goodput-search", "--seed", "--output-dir", "--label", "--request-timeout-s",
    ):  # fmt: skip
        assert option in text, option
    assert "(default: 127.0.0.1:50051)" in text


def test_sweep_end_to_end(
    fake_router: FakeRouter,
    prompt_builder,  # warms the process-wide tokenizer cache that serve.run uses
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 2-rate sweep of 3 synthetic requests writes bench_serve_<label>.json (config, one run
    per rate with 3 records of exact prompt/output lengths, goodput = the higher rate since the
    fake meets the SLO) and both PNGs, and prints the table; rc 0."""
    args = parse([
        "--router", fake_router.address, "--num-requests", "3", "--input-len", "40",
        "--output-len", "3", "--sweep-rates", "20,40", "--output-dir", str(tmp_path),
        "--label", "e2e", "--no-progress", "--ttft-slo-ms", "5000", "--tpot-slo-ms", "5000",
    ])  # fmt: skip
    assert serve.run(args) == 0

    document = json.loads((tmp_path / "bench_serve_e2e.json").read_text())
    assert document["config"]["sweep_rates"] == [20.0, 40.0]
    assert [run["offered_rate_rps"] for run in document["runs"]] == [20.0, 40.0]
    assert document["goodput"]["goodput_rps"] == 40.0
    for run in document["runs"]:
        assert run["summary"]["num_succeeded"] == 3
        records = [RequestRecord.from_dict(r) for r in run["records"]]
        assert [(r.prompt_tokens, r.output_tokens) for r in records] == [(40, 3)] * 3
    for name in ("bench_serve_e2e_cdf.png", "bench_serve_e2e_attainment.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "e2e @ 20 rps" in out and "goodput (highest rate with attainment >= 0.9): 40 rps" in out
    assert len(fake_router.servicer.received) == 6


def test_invalid_configuration_returns_2(tmp_path: Path) -> None:
    """A rate sweep with trace arrivals is rejected before anything is sent (rc 2)."""
    args = parse(
        ["--workload", "azure-conv", "--sweep-rates", "1,2", "--output-dir", str(tmp_path)]
    )
    assert serve.run(args) == 2
    assert not list(tmp_path.iterdir())


def test_plots_written(tmp_path: Path) -> None:
    """Both plot functions write PNG files, also when a run has no succeeded request."""
    ok = RequestRecord("a", 5, 3, 0.0, (0.1, 0.2, 0.3), (1, 1, 1), end_s=0.3)
    failed = RequestRecord("b", 5, 0, 0.0, end_s=0.1, error="INTERNAL")
    cdf = plot_latency_cdfs({"x": [ok], "y": [failed]}, tmp_path / "cdf.png", {"ttft_ms": 150.0})
    curve = plot_attainment_vs_rate({"x": [(2.0, 0.5), (1.0, 1.0)]}, tmp_path / "att.png", 0.9)
    assert cdf.read_bytes()[:8] == PNG_MAGIC and curve.read_bytes()[:8] == PNG_MAGIC
