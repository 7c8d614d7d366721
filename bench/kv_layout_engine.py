"""The engine alone on both KV cache layouts (``CacheConfig.kv_layout``): does block-major
slow attention? (issue 13 part 2).

``python -m scission.bench.kv_layout_engine``: one ``LLMEngine`` per layout (default model,
float32, eager, no prefix caching, ``--threads`` torch threads), built side by side and
timed in interleaved rounds (a fresh random layout order each round, so load changes hit
both alike):

- *prefill*: one ``--prefill-tokens`` prompt to its first token (ms per prompt);
- *decode*: ``batch`` prompts of ``--decode-prompt-tokens``, ``--new-tokens`` greedy tokens
  each; the mean engine step once every request has its first token (ms per step: pure
  decode steps only, no prefill inside).

The block manager's allocation order evolves over the rounds as in serving (freed blocks
are reused), so decode contexts are contiguous at first and fragmented later, in both
layouts alike. Writes JSON (``--output``) and prints a table with block / layer ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scission.bench.cli_main import bench_main, report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayoutBenchConfig:
    threads: int = 1
    prefill_tokens: int = 512
    # (batch, prompt tokens) decode shapes
    decode_shapes: tuple[tuple[int, int], ...] = ((1, 512), (8, 256), (1, 2048))
    new_tokens: int = 32
    repeats: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.threads, self.prefill_tokens, self.repeats) < 1 or self.new_tokens < 3:
            raise ValueError("threads, prefill_tokens, repeats >= 1 and new_tokens >= 3 needed")


def _engine(layout: Any, cfg: LayoutBenchConfig) -> Any:
    from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from scission.engine.llm_engine import LLMEngine

    longest = max([cfg.prefill_tokens] + [b * n for b, n in cfg.decode_shapes])
    return LLMEngine(EngineConfig(
        num_threads=cfg.threads,
        cache=CacheConfig(enable_prefix_caching=False, kv_layout=layout),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(1024, longest))))


def _run(engine: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """``(ms to every request's first token, mean ms of the later steps)``."""
    from scission.engine.request import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", ids, params)
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(o.request_id for o in engine.step())
    t1 = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(steps, 1)


def run_bench(cfg: LayoutBenchConfig) -> dict[str, Any]:
    import torch

    from scission.engine.config import KVLayout

    torch.set_num_threads(cfg.threads)
    engines = {layout.value: _engine(layout, cfg) for layout in KVLayout}
    vocab = next(iter(engines.values())).model_config.vocab_size
    rng = random.Random(cfg.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    cases = [("prefill", 1, cfg.prefill_tokens)] + [("decode", b, n) for b, n in cfg.decode_shapes]
    samples: dict[str, dict[str, list[float]]] = {}
    load_before = os.getloadavg()[0]
    for phase, batch, tokens in cases:
        key = f"{phase} b{batch} x {tokens}"
        samples[key] = {name: [] for name in engines}
        for i in range(cfg.repeats + 1):  # round 0 = warm-up
            prompts = [prompt(tokens) for _ in range(batch)]  # same prompts for both layouts
            for name in rng.sample(list(engines), len(engines)):
                first_ms, step_ms = _run(engines[name], prompts, 2 if phase == "prefill"
                                         else cfg.new_tokens)
                if i > 0:
                    samples[key][name].append(first_ms if phase == "prefill" else step_ms)
        logger.info("%s: %s", key, {n: round(statistics.median(s), 2)
                                    for n, s in samples[key].items()})
    rows = []
    for key, by in samples.items():
        med = {n: statistics.median(s) for n, s in by.items()}
        rows.append({"case": key, "layer_major_ms": med["layer_major"],
                     "block_major_ms": med["block_major"],
                     "block_over_layer": med["block_major"] / med["layer_major"],
                     "samples_ms": by})
    return {"benchmark": "kv_layout_engine", "date": datetime.now(UTC).isoformat(),
            "config": asdict(cfg), "loadavg_1m": [load_before, os.getloadavg()[0]],
            "torch": torch.__version__, "rows": rows}


def format_table(doc: dict[str, Any]) -> str:
    lines = ["| case | layer-major ms | block-major ms | block / layer |", "|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['case']} | {r['layer_major_ms']:.2f} | {r['block_major_ms']:.2f} "
                     f"| {r['block_over_layer']:.3f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LayoutBenchConfig()
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", type=Path, required=True, help="JSON result")


def run(args: argparse.Namespace) -> int:
    cfg = LayoutBenchConfig(threads=args.threads, prefill_tokens=args.prefill_tokens,
                            new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed)
    doc = run_bench(cfg)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    return report(format_table(doc), args.output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.kv_layout_engine", __doc__.split("\n\n")[0],
                      add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
