"""Profile scission's engine decode step (``python -m scission.bench.engine_profile``).

Fills a batch of ``--batch`` requests (``--prompt-tokens`` each, real corpus text), runs their
prefill, then profiles ``--steps`` pure decode steps (``LLMEngine.step``) with
``torch.profiler`` and prints the ops by self CPU time. With ``--loop-s`` it instead just runs
decode steps for that long (refilling the batch as requests finish), for a sampling profiler::

    py-spy record -r 200 -f raw -o decode.txt -- python -m scission.bench.engine_profile \\
        --batch 32 --loop-s 20
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time

import torch

from scission.bench.prompts import PromptBuilder, load_tokenizer
from scission.engine.config import (
    WEIGHT_QUANTIZATION_CHOICES,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
)
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams

logger = logging.getLogger(__name__)


def make_engine(args: argparse.Namespace) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            dtype=args.dtype,
            num_threads=args.threads,
            enforce_eager=not args.graph,
            weight_quantization=args.weight_quantization,
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(
                max_num_seqs=max(64, args.batch),
                max_num_batched_tokens=max(1024, args.batch * args.prompt_tokens),
            ),
        )
    )


def fill(engine: LLMEngine, builder: PromptBuilder, args: argparse.Namespace, ids) -> None:
    """Add requests until the batch is full, then step until none is still in prefill."""
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    while len(engine.requests) < args.batch:
        i = next(ids)
        engine.add_request(f"p-{i}", builder.prompt(args.prompt_tokens, i), params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()


def profile_steps(engine: LLMEngine, args: argparse.Namespace) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    averages = prof.key_averages(group_by_input_shape=args.by_shape)
    table = averages.table(sort_by="self_cpu_time_total", row_limit=args.top)
    return (
        f"{args.steps} decode steps at batch {args.batch}: {wall_ms:.1f} ms/step wall "
        f"(under the profiler)\n{table}"
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    engine = make_engine(args)
    builder = PromptBuilder.from_tokenizer(load_tokenizer())
    ids = itertools.count()
    fill(engine, builder, args, ids)
    for _ in range(3):  # warm-up
        engine.step()
    if args.loop_s:
        deadline, steps = time.perf_counter() + args.loop_s, 0
        while time.perf_counter() < deadline:
            engine.step()
            steps += 1
            if len(engine.requests) < args.batch:
                fill(engine, builder, args, ids)
        sys.stdout.write(f"{steps} steps in {args.loop_s:g} s (incl. refill prefills)\n")
        return 0
    assert args.steps < args.new_tokens - 3, "--steps must stay within one request's decode"
    sys.stdout.write(profile_steps(engine, args) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scission.bench.engine_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=1, help="decode batch size (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    parser.add_argument("--new-tokens", type=int, default=128, help="max tokens per request")
    parser.add_argument("--steps", type=int, default=50, help="profiled decode steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--weight-quantization", default="none", choices=WEIGHT_QUANTIZATION_CHOICES,
                        help="EngineConfig.weight_quantization (default none)")
    parser.add_argument("--graph", action="store_true",
                        help="graph mode (EngineConfig.enforce_eager=False, engine/compile.py)")
    parser.add_argument("--top", type=int, default=25, help="rows of the op table")
    parser.add_argument(
        "--by-shape",
        action="store_true",
        help="one row per (op, input shapes): tells the matmuls apart",
    )
    parser.add_argument(
        "--loop-s",
        type=float,
        default=0.0,
        help="instead of torch.profiler: run decode steps this long (py-spy)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
