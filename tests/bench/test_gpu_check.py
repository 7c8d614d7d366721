"""bench/gpu_check.sh and its Python parts, on a machine without a GPU (what CI has).

The script's GPU path cannot run here; ``GPU_CHECK_FAKE_GPU=1`` walks its flow (setup shim,
parts, summary) with the CPU torch, where each benchmark reports that it has no GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
EIGHT_MINUTES_S = 480


def run_script(*args: str, env: dict[str, str] | None = None, timeout_s: float = 240):
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"} | (env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout_s, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_exits_zero_and_says_so(tmp_path):
    """Without a GPU: exit 0, "no GPU" on stdout, a summary saying so, nothing else run."""
    res = run_script(env={"OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
                          "GPU_CHECK_STATE": str(tmp_path / "state")})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no GPU" in res.stdout
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "gpu": False, "note": "no GPU", "parts": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_dry_run_timeouts_fit_in_eight_minutes():
    """Every part has its own timeout and together they stay inside the 8-minute budget."""
    res = run_script("--dry-run")
    assert res.returncode == 0, res.stderr
    parts = dict(re.findall(r"^part (\w+) timeout (\d+)s$", res.stdout, re.M))
    assert set(parts) == {"setup", "tests_kernels", "tests_engine", "bench_kernels",
                          "bench_engine", "bench_flashinfer"}
    total = sum(int(v) for v in parts.values())
    budget = int(re.search(r"budget (\d+)s", res.stdout).group(1))
    assert total <= budget <= EIGHT_MINUTES_S


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a GPU on a CPU machine")
def test_flow_with_a_faked_gpu(tmp_path):
    """The GPU path's flow: setup (offline, shim), one bench part, the summary JSON; parts
    not asked for do not appear; the results folder holds the log and the setup record."""
    out = tmp_path / "out"
    res = run_script("--only", "bench_kernels", timeout_s=300, env={
        "OUT": str(out), "GPU_CHECK_FAKE_GPU": "1", "GPU_CHECK_OFFLINE": "1",
        "GPU_CHECK_STATE": str(tmp_path / "state"), "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gpu"] is True
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [
        ("setup", "passed"), ("bench_kernels", "passed")]
    setup = json.loads((out / "setup.json").read_text())
    assert setup["packages"]["flashinfer-python"]["state"] != "installed"  # offline
    assert (tmp_path / "state" / "shim" / "scission" / "engine").resolve() == REPO / "engine"
    assert "gpu_check summary" in (out / "gpu_check.log").read_text()


def test_engine_gpu_bench_harness_on_cpu(tmp_path):
    """engine_gpu on the CPU with a tiny random model: one row per batch size, tok/s =
    B * (N - 1) / median decode time, and the CUDA-graph mode noted when unavailable."""
    from scission.bench.engine_gpu import graphs_supported, main
    from scission.bench.synthetic_model import write_synthetic_checkpoint

    model = write_synthetic_checkpoint(tmp_path / "tiny", "tiny")
    out = tmp_path / "engine.json"
    rc = main(["--device", "cpu", "--model", model, "--dtype", "float32", "--batch-sizes",
               "1,3", "--new-tokens", "16", "--prompt-tokens", "8", "--repeats", "2",
               "--modes", "eager", "--threads", "2", "--output", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["errors"] == [] and doc["model_kind"] == "given"
    rows = doc["results"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:  # (a loaded CPU can make time(N) - time(1) <= 0: then no rate)
        assert len(r["samples_s"]) == 2 and r["median_s"] == sum(r["samples_s"]) / 2
        rate = r["batch_size"] * 15 / r["median_s"] if r["median_s"] > 0 else None
        assert r["tokens_per_s"] == (None if rate is None else pytest.approx(rate))
        assert r["tpot_ms"] == pytest.approx(1e3 * r["median_s"] / 15)
    assert (doc["notes"] == []) == graphs_supported()


def test_speedup_tables():
    """graphs/eager and ms-over-Triton ratios from measured rows (shapes missing a peer are
    left out)."""
    from scission.bench.engine_gpu import speedups
    from scission.bench.kernels import decode_speedups

    rows = [{"mode": "eager", "batch_size": 1, "tokens_per_s": 100.0},
            {"mode": "cuda_graphs", "batch_size": 1, "tokens_per_s": 250.0},
            {"mode": "eager", "batch_size": 8, "tokens_per_s": 400.0}]
    assert speedups(rows) == {"b1": 2.5}
    p = {"num_reqs": 1, "context": 1024}
    kernel_rows = [{"kernel": "decode_attention", "impl": "triton_splits1", "params": p, "ms": 0.02},
                   {"kernel": "decode_attention", "impl": "triton_splits2", "params": p, "ms": 0.01},
                   {"kernel": "decode_attention", "impl": "sdpa_contiguous", "params": p, "ms": 0.03},
                   {"kernel": "rms_norm", "impl": "triton", "params": {}, "ms": 1.0}]
    [row] = decode_speedups(kernel_rows)
    assert row["triton_best_ms"] == 0.01
    assert row["ms_over_triton"] == pytest.approx(
        {"triton_splits1": 2.0, "triton_splits2": 1.0, "sdpa_contiguous": 3.0})


def test_kernel_bench_smoke_decode_checked_against_sdpa(caplog):
    """The kernel bench's decode cases run (interpreter) and agree with SDPA (bf16)."""
    import logging

    from scission.bench.kernels import main

    caplog.set_level(logging.INFO, logger="scission.bench.kernels")
    assert main(["--smoke", "--kernels", "decode_attention", "--impls", "triton", "sdpa"]) == 0
    errs = [float(m) for m in re.findall(r"rel_err_vs_sdpa=(\S+)", caplog.text)]
    assert len(errs) == 3 and max(errs) < 2e-2  # two Triton split settings, SDPA itself
