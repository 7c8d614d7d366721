"""Fit the planner's step-latency model (``cluster.planner.perf_model``) on the real engine.

``python -m scission.bench.perf_fit`` runs ``LLMEngine`` (default model, ``--threads`` torch
threads, prefix caching off) in this process and times every ``engine.step()``:

- prefill-only steps: one prompt of ``t`` tokens per step (``max_tokens=1``, so the step that
  runs the prompt is the whole request), for every ``t`` in ``--prefill-tokens``, each
  ``--repeats`` times after one warm-up step of the same size;
- decode-only steps: ``B`` prompts of ``L`` tokens, all run to their first token in one step
  (not recorded), then ``--decode-steps`` steps in which every row decodes one token, for each
  ``(B, L)`` of ``--decode-batches`` x ``--decode-prompt-tokens`` with ``B·L <= 4096``. The
  context of a row is the tokens it holds when the step runs (prompt + outputs so far), so it
  grows by one per step.

Each step becomes a ``ForwardSample`` (random token ids: the content does not change the time);
``PerformanceModel.fit`` fits them, and the JSON (``--output``) records the coefficients, the
samples, the fit's relative error per phase (p50/p90 of ``|model - measured| / measured``),
the command line, the date, threads and dtype.

Clock (``--clock``): ``thread`` (default) times a step by the CPU time of the thread that runs
it (``time.thread_time``; with one torch thread the whole forward runs there), so time the
engine spends descheduled on a shared machine does not count; a dedicated core's wall time is
close to it. ``wall`` uses ``time.perf_counter``. Both are recorded per step, and the model fitted
on wall time is in the JSON too (``model_wall_clock``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from scission.bench.cli_main import bench_main, report
from scission.cluster.planner.perf_model import PerformanceModel
from scission.cluster.planner.types import ForwardSample
from scission.registry.workers import WorkerRole

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "perf_model_smollm2_cpu.json"
WORKER_ID = "perf-fit"


class Timed(NamedTuple):
    sample: ForwardSample  # step_ms on the configured clock
    wall_ms: float


@dataclass(frozen=True)
class PerfFitConfig:
    threads: int = 1
    dtype: str = "float32"
    prefill_tokens: tuple[int, ...] = (32, 64, 128, 256, 384, 512, 768, 1024)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_prompt_tokens: tuple[int, ...] = (32, 256)
    decode_steps: int = 8
    repeats: int = 2
    max_context_tokens_per_run: int = 4096  # skip (B, L) whose B * L is larger
    clock: str = "thread"  # "thread": CPU time of the engine's thread; "wall": perf_counter
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.threads, self.repeats, self.decode_steps) < 1:
            raise ValueError("threads, repeats and decode_steps must be >= 1")
        if min(self.prefill_tokens + self.decode_batches + self.decode_prompt_tokens) < 1:
            raise ValueError("token counts and batch sizes must be >= 1")
        if self.clock not in ("thread", "wall"):
            raise ValueError(f"clock must be thread or wall, got {self.clock!r}")

    @property
    def decode_shapes(self) -> list[tuple[int, int]]:
        """(batch, prompt tokens) pairs that are measured."""
        return [(b, n) for n in self.decode_prompt_tokens for b in self.decode_batches
                if b * n <= self.max_context_tokens_per_run]


class StepTimer:
    """One engine (prefix caching off, budgets large enough for every shape) and its steps."""

    def __init__(self, cfg: PerfFitConfig) -> None:
        from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
        from scission.engine.llm_engine import LLMEngine

        max_batch = max(cfg.decode_batches)
        # Every shape's prompts run in one step, so all rows start decoding together.
        max_step = max(1024, *cfg.prefill_tokens, *(b * n for b, n in cfg.decode_shapes))
        self.engine = LLMEngine(EngineConfig(
            dtype=cfg.dtype, num_threads=cfg.threads,
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=max(64, max_batch),
                                      max_num_batched_tokens=max_step)))
        self.rng = np.random.default_rng(cfg.seed)
        self._next_id = 0
        self.t0 = time.perf_counter()
        self.clock = time.thread_time if cfg.clock == "thread" else time.perf_counter

    def _add(self, num_tokens: int, max_tokens: int) -> str:
        from scission.engine.request import SamplingParams

        self._next_id += 1
        request_id = f"fit-{self._next_id}"
        prompt = self.rng.integers(100, 49_000, num_tokens).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(request_id, prompt, params)
        return request_id

    def _timed_step(self) -> tuple[float, float]:
        """(ms on the configured clock, wall ms) of one ``engine.step()``."""
        wall, start = time.perf_counter(), self.clock()
        self.engine.step()
        return (self.clock() - start) * 1e3, (time.perf_counter() - wall) * 1e3

    def prefill(self, num_tokens: int) -> Timed:
        """One step that runs one whole ``num_tokens`` prompt (and samples its token)."""
        self._add(num_tokens, max_tokens=1)
        step_ms, wall_ms = self._timed_step()
        assert not self.engine.has_unfinished(), "the prompt did not fit in one step"
        return Timed(self._sample(num_tokens, 0, 0, step_ms), wall_ms)

    def decode(self, batch: int, prompt_tokens: int, num_steps: int) -> list[Timed]:
        """``num_steps`` decode-only steps of ``batch`` rows after their prompts ran."""
        ids = [self._add(prompt_tokens, max_tokens=num_steps + 1) for _ in range(batch)]
        reqs = [self.engine.requests[i] for i in ids]
        self.engine.step()  # all the prompts, in one step: not recorded
        assert all(r.num_output_tokens == 1 for r in reqs), "prompts did not run in one step"
        out = []
        for _ in range(num_steps):
            context = sum(r.num_tokens for r in reqs)  # KV held after this step's token
            step_ms, wall_ms = self._timed_step()
            out.append(Timed(self._sample(0, batch, context, step_ms), wall_ms))
        assert not self.engine.has_unfinished(), "decode rows did not finish as planned"
        return out

    def _sample(self, prefill_tokens: int, batch: int, context: int,
                step_ms: float) -> ForwardSample:
        role = WorkerRole.PREFILL if prefill_tokens else WorkerRole.DECODE
        return ForwardSample(WORKER_ID, role, time.perf_counter() - self.t0, prefill_tokens,
                             batch, context, step_ms)


def collect(cfg: PerfFitConfig) -> list[Timed]:
    """Prefill sizes (one warm-up step each), then decode shapes (one warm-up run in all);
    warm-ups are not recorded."""
    timer = StepTimer(cfg)
    out: list[Timed] = []
    for t in cfg.prefill_tokens:
        timer.prefill(t)  # warm-up
        out.extend(timer.prefill(t) for _ in range(cfg.repeats))
        logger.info("prefill %d tokens: %.1f ms (wall %.1f ms)", t, out[-1].sample.step_ms,
                    out[-1].wall_ms)
    timer.decode(4, 32, 2)  # warm-up of the decode path
    for batch, prompt_tokens in cfg.decode_shapes:
        steps = timer.decode(batch, prompt_tokens, cfg.decode_steps)
        out.extend(steps)
        logger.info("decode batch %d, prompts %d: %.1f ms/step (median; wall %.1f)", batch,
                    prompt_tokens, float(np.median([s.sample.step_ms for s in steps])),
                    float(np.median([s.wall_ms for s in steps])))
    return out


def relative_errors(model: PerformanceModel, samples: Sequence[ForwardSample]) -> dict:
    """p50/p90/max of ``|predicted - measured| / measured`` per phase."""
    out = {}
    for phase in ("prefill", "decode"):
        errs = []
        for s in samples:
            if phase == "prefill" and s.num_decode_requests == 0:
                pred = model.prefill.step_ms(s.num_prefill_tokens)
            elif phase == "decode" and s.num_prefill_tokens == 0:
                pred = model.decode.step_ms(s.num_decode_requests, s.num_context_tokens)
            else:
                continue
            errs.append(abs(pred - s.step_ms) / s.step_ms)
        out[phase] = {"num_samples": len(errs), "p50": float(np.percentile(errs, 50)),
                      "p90": float(np.percentile(errs, 90)), "max": float(max(errs))}
    return out


def format_table(model: PerformanceModel, errors: dict) -> str:
    p, d = model.prefill, model.decode
    return "\n".join([
        "| phase | a_ms | b | c | samples | rel. error p50 / p90 |",
        "|---|---|---|---|---|---|",
        f"| prefill | {p.a_ms:.2f} | {p.b_ms_per_token:.4f} ms/token | "
        f"{p.c_ms_per_token2:.3g} ms/token^2 | {errors['prefill']['num_samples']} | "
        f"{errors['prefill']['p50']:.3f} / {errors['prefill']['p90']:.3f} |",
        f"| decode | {d.a_ms:.2f} | {d.b_ms_per_request:.4f} ms/request | "
        f"{d.c_ms_per_context_token:.3g} ms/context token | {errors['decode']['num_samples']} | "
        f"{errors['decode']['p50']:.3f} / {errors['decode']['p90']:.3f} |",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PerfFitConfig()
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--prefill-tokens", type=ints, default=d.prefill_tokens)
    parser.add_argument("--decode-batches", type=ints, default=d.decode_batches)
    parser.add_argument("--decode-prompt-tokens", type=ints, default=d.decode_prompt_tokens)
    parser.add_argument("--decode-steps", type=int, default=d.decode_steps)
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--clock", choices=("thread", "wall"), default=d.clock,
                        help="step time = CPU time of the engine's thread, or wall time")
    parser.add_argument("--output", type=Path, default=RESULTS)


def run(args: argparse.Namespace) -> int:
    cfg = PerfFitConfig(threads=args.threads, dtype=args.dtype,
                        prefill_tokens=args.prefill_tokens, decode_batches=args.decode_batches,
                        decode_prompt_tokens=args.decode_prompt_tokens,
                        decode_steps=args.decode_steps, repeats=args.repeats,
                        clock=args.clock)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    timed = collect(cfg)
    samples = [t.sample for t in timed]
    wall_samples = [replace(t.sample, step_ms=t.wall_ms) for t in timed]
    model = PerformanceModel.fit(samples)
    wall_model = PerformanceModel.fit(wall_samples)
    assert model is not None and wall_model is not None, "too few distinct steps to fit"
    errors = relative_errors(model, samples)
    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m scission.bench.perf_fit " + " ".join(sys.argv[1:]),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "loadavg_1m": {"start": load_before, "end": os.getloadavg()[0]}},
        "threads": cfg.threads, "dtype": cfg.dtype, "clock": cfg.clock, "config": asdict(cfg),
        "model": model.to_dict(), "num_samples": len(samples), "fit_relative_error": errors,
        "model_wall_clock": wall_model.to_dict(),
        "fit_relative_error_wall_clock": relative_errors(wall_model, wall_samples),
        "wall_s": time.perf_counter() - start,
        "samples": [asdict(t.sample) | {"role": t.sample.role.value, "wall_ms": t.wall_ms}
                    for t in timed],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    return report(format_table(model, errors), args.output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.perf_fit", __doc__.splitlines()[0],
                      add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
