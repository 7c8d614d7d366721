"""Microbenchmark of CPU weight-only matmul kernels on SmolLM2-135M's linear shapes.

For every linear shape of the model (``N x K`` = out x in features: qkv 960x576, o_proj
576x576, gate_up 3072x576, down 576x1536, lm_head 49152x576), every kernel scheme and every
row count ``M`` (1, 8, 32 = decode batch sizes), the time of one ``y = x @ W^T``:

- ``fp32`` / ``bf16``: ``F.linear`` with dense float32 / bfloat16 weights and activations;
- ``int8``: ``aten._weight_int8pack_mm`` (int8 weights, one scale per output row, bf16
  activations);
- ``int4-g{32,64}-t{1,2,8}``: ``aten._weight_int4pack_mm_for_cpu`` (4-bit groups of 32/64
  input channels with a bf16 scale and zero each, packed with ``inner_k_tiles`` 1/2/8; bf16
  activations);
- ``fbgemm-dyn-int8``: ``quantized.linear_dynamic`` (int8 weights, activations quantized to
  uint8 per call, float32 in and out: a different accuracy class, measured for reference);
- ``w8a8`` / ``w8a8-t1`` / ``w8a8-rot``: ``engine/quant_w8a8.py: w8a8_linear`` (int8 weights
  per row, float32 activations quantized per token to two / one / one int8 terms,
  ``torch._int_mm``, float32 out); ``w8a8-rot`` first rotates the activations by the block-64
  Hadamard (``rotate_blocks``). The ``"w8a8"`` mode = ``w8a8-rot`` decoder + ``w8a8`` LM head.
  Times include the per-call rotation, activation quantization and int32 -> float32 epilogue.
- ``w4a8``: ``torch.ops.scission.w4a8_mm`` (kernels/w4a8.py: Q4_1 weights, float32
  activations quantized to int8 per block of 32 inside the kernel, integer dot products;
  llama.cpp's Q4_1 x Q8_1), called through the op as the engine calls it.

Kernel times take activations already in the kernel's dtype; ``+cast`` rows add the float32
-> bf16 -> float32 conversions a float32 model pays per call. Each shape cycles through enough
distinct weight copies to exceed the 32 MiB L3 (a model's weights are read from DRAM once per
step; a single copy would be served from cache). GB/s = weight bytes / time.

The ``model`` section times one decode step's linears end to end (30 layers x 4 linears + the
LM head, distinct weights, as the model reads them) per scheme, which is the floor of a
decode step made of those kernels. ``bandwidth`` is a large float32 ``copy_`` (read + write
bytes / time) and a ``sum`` (read bytes / time) on the same threads: the DRAM roof.

    python -m scission.bench.quant_kernels --threads 2 --output bench/results/quant_kernels.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from scission.bench.cli_main import bench_main

logger = logging.getLogger(__name__)

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}  # name -> (N, K), SmolLM2-135M
NUM_LAYERS = 30
CACHE_DEFEAT_BYTES = 96 << 20  # > 32 MiB L3: each call reads its weights from DRAM
SCHEMES = ("fp32", "bf16", "int8", "int4-g32-t1", "int4-g32-t2", "int4-g32-t8", "int4-g64-t2",
           "fbgemm-dyn-int8", "w8a8", "w8a8-t1", "w8a8-rot", "w4a8")

Matmul = Callable[[torch.Tensor], torch.Tensor]


def make_matmul(scheme: str, n: int, k: int, gen: torch.Generator) -> tuple[Matmul, int, torch.dtype]:
    """A random ``[n, k]`` weight in ``scheme``: ``(fn(x [M, k]) -> [M, n], weight bytes,
    activation dtype fn expects)``. Values are random: kernel time does not depend on them."""
    if scheme in ("fp32", "bf16"):
        dt = torch.float32 if scheme == "fp32" else torch.bfloat16
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dt)
        return (lambda x: F.linear(x, w)), w.numel() * w.element_size(), dt
    if scheme == "int8":
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = torch.rand(n, generator=gen).to(torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s)), n * k + 2 * n, \
            torch.bfloat16
    if scheme.startswith("int4"):
        _, g, t = scheme.split("-")
        group, tiles = int(g[1:]), int(t[1:])
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)
        sz = torch.rand(k // group, n, 2, generator=gen).to(torch.bfloat16)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)

        return fn, packed.numel() * packed.element_size() + sz.numel() * 2, torch.bfloat16
    if scheme == "fbgemm-dyn-int8":
        w = torch.randn(n, k, generator=gen) * 0.02
        qw = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(n, dtype=torch.long),
                                        0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return (lambda x: torch.ops.quantized.linear_dynamic(x, packed)), n * k + 8 * n, \
            torch.float32
    if scheme in ("w8a8", "w8a8-t1", "w8a8-rot"):
        from scission.engine import quant_w8a8 as qw

        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = torch.rand(n, generator=gen) * 1e-3
        f = qw.residual_factor_for(k) if scheme == "w8a8" else 0
        if scheme == "w8a8-rot":
            signs, h = qw.block_hadamard(k)
            return (lambda x: qw.w8a8_linear(qw.rotate_blocks(x, signs, h), w, s, None, 0)), \
                n * k + 4 * n + 4 * k + h.numel() * 4, torch.float32
        return (lambda x: qw.w8a8_linear(x, w, s, None, f)), n * k + 4 * n, torch.float32
    if scheme == "w4a8":
        from scission.kernels import w4a8

        blocks = w4a8.pack_q4_1(torch.randint(0, 16, (n, k), generator=gen),
                                torch.rand(n, k // 32, generator=gen) * 1e-2,
                                -torch.rand(n, k // 32, generator=gen) * 1e-1)
        return (lambda x: torch.ops.scission.w4a8_mm(x, blocks, n)), blocks.numel(), \
            torch.float32
    raise ValueError(f"unknown scheme {scheme!r}")


def time_calls_us(calls: list[Callable[[], object]], min_s: float) -> float:
    """Median-free mean µs per call, cycling through ``calls`` (warmed once) for >= ``min_s``."""
    for c in calls:
        c()
    rounds, start = 0, time.perf_counter()
    while True:
        for c in calls:
            c()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / (rounds * len(calls)) * 1e6


def bench_shape(scheme: str, name: str, rows: tuple[int, ...], min_s: float) -> list[dict]:
    """One scheme on one shape at every row count: kernel-only and with float32 casts."""
    n, k = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    fn, nbytes, dt = make_matmul(scheme, n, k, gen)
    fns = [fn] + [make_matmul(scheme, n, k, gen)[0]
                  for _ in range(max(0, -(-CACHE_DEFEAT_BYTES // nbytes) - 1))]
    out = []
    for m in rows:
        x32 = torch.randn(m, k, generator=gen)
        x = x32.to(dt)
        kernel_us = time_calls_us([lambda f=f, x=x: f(x) for f in fns], min_s)
        cast_us = time_calls_us([lambda f=f, x=x32: f(x.to(dt)).float() for f in fns], min_s)
        out.append({"scheme": scheme, "shape": name, "n": n, "k": k, "rows": m,
                    "weight_bytes": nbytes, "kernel_us": kernel_us, "with_cast_us": cast_us,
                    "weight_gb_per_s": nbytes / kernel_us / 1e3})
        logger.info("%s %s M=%d: %.1f us (%.1f with casts), %.1f GB/s", scheme, name, m,
                    kernel_us, cast_us, nbytes / kernel_us / 1e3)
    return out


def bench_model(scheme: str, head_scheme: str, rows: tuple[int, ...], min_s: float) -> list[dict]:
    """One decode step's linears (30 layers x qkv/o_proj/gate_up/down + LM head), distinct
    weights, activations kept in the kernel dtype. Returns per-row-count ms per step."""
    gen = torch.Generator().manual_seed(1)
    layer_fns, total = [], 0
    for _ in range(NUM_LAYERS):
        for name in ("qkv", "o_proj", "gate_up", "down"):
            fn, nbytes, dt = make_matmul(scheme, *SHAPES[name], gen)
            layer_fns.append((fn, SHAPES[name][1]))
            total += nbytes
    head, head_bytes, head_dt = make_matmul(head_scheme, *SHAPES["lm_head"], gen)
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=gen).to(dt) for k in (576, 1536)}
        xh = torch.randn(m, 576, generator=gen).to(head_dt)

        def step(layer_fns=layer_fns, xs=xs, xh=xh) -> None:
            for fn, k in layer_fns:
                fn(xs[k])
            head(xh)

        step_ms = time_calls_us([step], min_s) / 1e3
        out.append({"scheme": scheme, "head_scheme": head_scheme, "rows": m,
                    "weight_bytes": total + head_bytes, "step_ms": step_ms,
                    "weight_gb_per_s": (total + head_bytes) / step_ms / 1e6})
        logger.info("model %s + head %s M=%d: %.2f ms/step, %.1f GB/s", scheme, head_scheme, m,
                    step_ms, (total + head_bytes) / step_ms / 1e6)
    return out


def bench_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> dict:
    """DRAM bandwidth on the current threads: best of ``repeats`` float32 copies and sums."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = sum_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        src.sum()
        t2 = time.perf_counter()
        copy_s, sum_s = min(copy_s, t1 - t0), min(sum_s, t2 - t1)
    return {"bytes": nbytes, "copy_read_write_gb_per_s": 2 * nbytes / copy_s / 1e9,
            "sum_read_gb_per_s": nbytes / sum_s / 1e9}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--rows", default="1,8,32", help="comma list of activation rows (M)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma list of schemes")
    parser.add_argument("--model-schemes", default="fp32:fp32,int8:int8,int4-g32-t2:int8,"
                        "int4-g32-t2:int4-g32-t2,int4-g64-t2:int4-g64-t2",
                        help="comma list of decoder:head schemes for the whole-step sweep")
    parser.add_argument("--min-s", type=float, default=0.2, help="seconds timed per case")
    parser.add_argument("--output", type=Path, default=Path("bench/results/quant_kernels.json"))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    rows = tuple(int(r) for r in args.rows.split(","))
    doc: dict = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "command": " ".join(["python -m scission.bench.quant_kernels", *sys.argv[1:]]),
                 "machine": {"torch": torch.__version__, "python": platform.python_version(),
                             "threads": args.threads, "cpu": torch.backends.cpu.get_cpu_capability()},
                 "loadavg_1m_start": os.getloadavg()[0]}
    doc["bandwidth"] = bench_bandwidth()
    logger.info("bandwidth: %s", doc["bandwidth"])
    with torch.inference_mode():
        doc["shapes"] = [r for s in args.schemes.split(",") for name in SHAPES
                         for r in bench_shape(s, name, rows, args.min_s)]
        doc["model"] = [r for pair in args.model_schemes.split(",") if pair
                        for r in bench_model(*pair.split(":"), rows, args.min_s)]
    doc["loadavg_1m_end"] = os.getloadavg()[0]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    sys.stdout.write(format_table(doc) + "\n")
    return 0


def format_table(doc: dict) -> str:
    """µs per call (kernel only) by shape x scheme at each M, then the whole-step sweep."""
    lines = [f"bandwidth: copy {doc['bandwidth']['copy_read_write_gb_per_s']:.1f} GB/s (r+w), "
             f"sum {doc['bandwidth']['sum_read_gb_per_s']:.1f} GB/s (read)"]
    for r in doc["shapes"]:
        lines.append(f"{r['scheme']:>16} {r['shape']:>8} M={r['rows']:<3} {r['kernel_us']:9.1f} us"
                     f" {r['with_cast_us']:9.1f} us+cast {r['weight_gb_per_s']:6.1f} GB/s")
    for r in doc["model"]:
        lines.append(f"step {r['scheme']:>12} head {r['head_scheme']:>12} M={r['rows']:<3} "
                     f"{r['step_ms']:7.2f} ms {r['weight_bytes'] / 1e6:6.1f} MB "
                     f"{r['weight_gb_per_s']:6.1f} GB/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.quant_kernels", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
