"""KV-transfer benchmark (issue 13 part 1): NIXL READ of a prompt's KV between two processes
beside memcpy and TCP loopback, and the KV hand-off in a running cluster.

``python -m scission.bench.kv_transfer`` (= ``scission bench kv-transfer``):

1. Pairs (``kv_transfer_pair``, ``kv_transfer_reader``): per dtype, two spawned processes,
   each a real ``KVTransferAgent`` over a cache allocated like ``engine/kv_cache.py`` with the
   default model's KV geometry (``load_checkpoint``); per prompt length and block pattern,
   READ latency (median, p90; warm-up excluded), GB/s and descriptor count, beside memcpy
   (one piece, and the same pieces), torch ``copy_`` and a TCP-loopback copy of the same
   bytes, and NIXL's prepared lists. ``--tcp-transport`` adds a pair with ``UCX_TLS=tcp,self``
   (NIXL as between hosts without RDMA).
2. Hand-off (``kv_handoff``): a ``LocalCluster`` with 1 prefill + 1 decode worker; TTFT and
   its parts, each request alone. Needs Ray: run it from a checkout nobody edits meanwhile.

Writes ``bench/results/kv_transfer_<date>.json`` and a PNG of GB/s vs prompt length beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scission.bench.cli_main import bench_main, report
from scission.bench.kv_transfer_shapes import KV_LAYOUTS, PATTERNS, KVShape

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class KVTransferBenchConfig:
    prompt_tokens: tuple[int, ...] = (256, 1024, 4096, 16384)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    patterns: tuple[str, ...] = PATTERNS
    kv_layouts: tuple[str, ...] = ("layer_major",)  # KVShape.kv_layout, one pair each
    warmup: int = 2
    repeats: int = 20  # up to 1k tokens; fewer for longer prompts (repeats_for)
    min_repeats: int = 5
    threads: int = 1  # reader's torch threads (torch copy_ reference)
    tcp_transport: bool = True  # also a pair with UCX_TLS=tcp,self (NIXL READ only)
    handoff: bool = True
    handoff_tokens: tuple[int, ...] = (256, 1024, 4096)
    handoff_requests: int = 4
    handoff_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_tokens or min(self.prompt_tokens) < 1:
            raise ValueError(f"prompt_tokens must be positive: {self.prompt_tokens}")
        if set(self.kv_layouts) - set(KV_LAYOUTS) or not self.kv_layouts:
            raise ValueError(f"kv_layouts must be among {KV_LAYOUTS}: {self.kv_layouts}")
        if set(self.patterns) - set(PATTERNS):
            raise ValueError(f"patterns must be among {PATTERNS}: {self.patterns}")
        if self.warmup < 0 or self.min_repeats < 1 or self.repeats < self.min_repeats:
            raise ValueError("warmup >= 0 and repeats >= min_repeats >= 1 needed")


@functools.cache
def _default_model_kv() -> tuple[int, int, int, str]:
    from scission.engine.loader import load_checkpoint
    from scission.engine.tokenizer import default_model_path

    model, _ = load_checkpoint(default_model_path())  # the weights are dropped at once
    return model.num_layers, model.num_kv_heads, model.head_dim, model.model_id


def model_kv_shape(dtype: str, block_size: int = 16,
                   kv_layout: str = "layer_major") -> tuple[KVShape, str]:
    """The default model's KV geometry (from its checkpoint) and its model id."""
    num_layers, num_kv_heads, head_dim, model_id = _default_model_kv()
    return KVShape(num_layers, num_kv_heads, head_dim, block_size, dtype, kv_layout), model_id


def machine() -> dict[str, Any]:
    """What the numbers depend on: cores, load, memory, versions."""
    from importlib.metadata import version

    import torch

    mem = {k: v for k, v in (line.split(":", 1) for line in
                             Path("/proc/meminfo").read_text().splitlines()[:3])}
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "meminfo": {k: v.strip() for k, v in mem.items()}, "torch": torch.__version__,
            "nixl": version("nixl"), "python": sys.version.split()[0]}


def run_pairs(cfg: KVTransferBenchConfig) -> list[dict[str, Any]]:
    from scission.bench.kv_transfer_pair import PairConfig, run_pair
    from scission.bench.kv_transfer_reader import METHODS

    pairs = []
    jobs = [(d, lay, "cma", None, METHODS) for d in cfg.dtypes for lay in cfg.kv_layouts]
    if cfg.tcp_transport:  # NIXL over UCX tcp only (the references do not depend on UCX)
        jobs += [(cfg.dtypes[0], lay, "tcp", "tcp,self", ("nixl",)) for lay in cfg.kv_layouts]
    for dtype, layout, transport, tls, methods in jobs:
        shape, model_id = model_kv_shape(dtype, kv_layout=layout)
        pcfg = PairConfig(shape=shape, prompt_tokens=cfg.prompt_tokens, patterns=cfg.patterns,
                          methods=methods, warmup=cfg.warmup, repeats=cfg.repeats,
                          min_repeats=cfg.min_repeats, threads=cfg.threads, ucx_tls=tls,
                          seed=cfg.seed)
        logger.info("pair %s over UCX %s: %s", dtype, transport, shape)
        load_before, t0 = os.getloadavg()[0], time.monotonic()
        result = run_pair(pcfg)
        pairs.append({"dtype": dtype, "kv_layout": layout, "transport": transport,
                      "model_id": model_id,
                      "shape": asdict(shape), "duration_s": time.monotonic() - t0,
                      "loadavg_1m": [load_before, os.getloadavg()[0]], **result})
    return pairs


def run_bench(cfg: KVTransferBenchConfig, output: Path) -> dict[str, Any]:
    from scission.bench.kv_transfer_report import (
        format_handoff_table,
        format_pair_table,
        handoff_rows,
        pair_rows,
        phase_rows,
        plot_bandwidth,
    )

    doc: dict[str, Any] = {"benchmark": "kv_transfer", "date": datetime.now(UTC).isoformat(),
                           "config": asdict(cfg), "machine_before": machine()}
    doc["pairs"] = run_pairs(cfg)
    doc["table"] = [row for p in doc["pairs"] for row in pair_rows(p)]
    doc["phases"] = [row for p in doc["pairs"] for row in phase_rows(p)]
    tables = [format_pair_table(doc["table"])]
    if cfg.handoff:
        from scission.bench.kv_handoff import HandoffConfig, run_handoff

        hcfg = HandoffConfig(prompt_tokens=cfg.handoff_tokens, requests=cfg.handoff_requests,
                             dtype=cfg.handoff_dtype, seed=cfg.seed)
        load_before = os.getloadavg()[0]
        doc["handoff"] = {"config": asdict(hcfg), **run_handoff(hcfg)}
        doc["handoff"]["loadavg_1m"] = [load_before, os.getloadavg()[0]]
        doc["handoff_table"] = handoff_rows(doc["handoff"], model_kv_shape(cfg.handoff_dtype)[0])
        tables.append(format_handoff_table(doc["handoff_table"]))
    doc["machine_after"] = machine()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=1) + "\n")
    doc["png"] = str(plot_bandwidth(doc["table"], output.with_suffix(".png")))
    doc["text"] = "\n\n".join(tables)
    return doc


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = KVTransferBenchConfig()
    p.add_argument("--prompt-tokens", type=_ints, default=d.prompt_tokens)
    p.add_argument("--dtype", type=lambda s: tuple(s.split(",")), default=d.dtypes,
                   help="KV dtypes of the pairs (comma-separated)")
    p.add_argument("--patterns", type=lambda s: tuple(s.split(",")), default=d.patterns)
    p.add_argument("--kv-layouts", type=lambda s: tuple(s.split(",")), default=d.kv_layouts,
                   help=f"comma-separated, among {KV_LAYOUTS}: one pair per layout")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--min-repeats", type=int, default=d.min_repeats)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-tcp-transport", dest="tcp_transport", action="store_false")
    p.add_argument("--no-handoff", dest="handoff", action="store_false",
                   help="skip the cluster hand-off (no Ray)")
    p.add_argument("--handoff-tokens", type=_ints, default=d.handoff_tokens)
    p.add_argument("--handoff-requests", type=int, default=d.handoff_requests)
    p.add_argument("--handoff-dtype", default=d.handoff_dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", type=Path, default=None,
                   help="JSON result (default bench/results/kv_transfer_<date>.json)")


def run(args: argparse.Namespace) -> int:
    cfg = KVTransferBenchConfig(
        prompt_tokens=args.prompt_tokens, dtypes=args.dtype, patterns=args.patterns,
        kv_layouts=args.kv_layouts,
        warmup=args.warmup, repeats=args.repeats, min_repeats=args.min_repeats,
        threads=args.threads, tcp_transport=args.tcp_transport, handoff=args.handoff,
        handoff_tokens=args.handoff_tokens, handoff_requests=args.handoff_requests,
        handoff_dtype=args.handoff_dtype, seed=args.seed)
    output = args.output or RESULTS_DIR / f"kv_transfer_{datetime.now(UTC):%Y-%m-%d}.json"
    return report(run_bench(cfg, output)["text"], output)


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.kv_transfer", __doc__.split("\n\n")[0],
                      add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
