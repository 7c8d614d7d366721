"""Tables, ratios and the PNG of the KV-transfer benchmark (from its result dict)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scission.bench.kv_transfer_shapes import KVShape


def _ms(cell: dict[str, Any], method: str, phase: str = "total") -> float | None:
    m = cell["methods"].get(method)
    return None if m is None else m[phase]["median_ms"]


def pair_rows(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per cell: medians, p90 of the READ, GB/s and the ratios to the references."""
    rows = []
    for cell in pair["cells"]:
        nixl = cell["methods"].get("nixl")
        row = {"dtype": pair["dtype"], "transport": pair["transport"],
               "kv_layout": pair.get("kv_layout", "layer_major"), "num_tokens": cell["num_tokens"], "pattern": cell["pattern"],
               "mib": cell["bytes"] / 2**20, "descriptors": cell["descriptors"]}
        for method in cell["methods"]:
            row[f"{method}_ms"] = _ms(cell, method)
            row[f"{method}_gbps"] = cell["methods"][method]["gb_per_s"]
        if nixl is not None:
            row["nixl_p90_ms"] = nixl["total"]["p90_ms"]
            row["notif_ms"] = nixl["notif"]["median_ms"]
            for ref in ("memcpy", "memcpy_layout", "torch_copy", "tcp"):
                if ref in cell["methods"]:
                    row[f"nixl_vs_{ref}"] = row["nixl_gbps"] / row[f"{ref}_gbps"]
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_pair_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| dtype | layout | transport | tokens | pattern | MiB | descs | NIXL READ p50 / p90 ms | NIXL GB/s "
            "| memcpy GB/s | memcpy same pieces GB/s | torch copy GB/s | TCP GB/s "
            "| NIXL / memcpy | NIXL / same pieces | NIXL / TCP | prepped ms | notif ms |")
    lines = [head, "|" + "---|" * 18]
    for r in rows:
        lines.append("| " + " | ".join([
            r["dtype"], r["kv_layout"], r["transport"], str(r["num_tokens"]), r["pattern"], f"{r['mib']:.1f}",
            str(r["descriptors"]),
            f"{_fmt(r.get('nixl_ms'), '.2f')} / {_fmt(r.get('nixl_p90_ms'), '.2f')}",
            _fmt(r.get("nixl_gbps"), ".2f"), _fmt(r.get("memcpy_gbps"), ".2f"),
            _fmt(r.get("memcpy_layout_gbps"), ".2f"), _fmt(r.get("torch_copy_gbps"), ".2f"),
            _fmt(r.get("tcp_gbps"), ".2f"), _fmt(r.get("nixl_vs_memcpy"), ".2f"),
            _fmt(r.get("nixl_vs_memcpy_layout"), ".2f"), _fmt(r.get("nixl_vs_tcp"), ".2f"),
            _fmt(r.get("nixl_prepped_ms"), ".2f"), _fmt(r.get("notif_ms"), ".2f")]) + " |")
    return "\n".join(lines)


def phase_rows(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """Where the time of a READ goes: per-phase medians of the raw and prepared paths."""
    rows = []
    for cell in pair["cells"]:
        for method in ("nixl_phases", "nixl_prepped"):
            if method in cell["methods"]:
                m = cell["methods"][method]
                rows.append({"dtype": pair["dtype"], "transport": pair["transport"],
                             "kv_layout": pair.get("kv_layout", "layer_major"),
                             "num_tokens": cell["num_tokens"], "pattern": cell["pattern"],
                             "method": method, "descriptors": cell["descriptors"],
                             **{p: m[p]["median_ms"] for p in ("plan", "prep", "xfer", "release",
                                                               "total")}})
    return rows


def handoff_rows(handoff: dict[str, Any], shape: KVShape) -> list[dict[str, Any]]:
    """Per prompt length: medians of every measured part (see ``kv_handoff``)."""
    samples = handoff["samples"]
    reads = handoff["reads"][handoff["warmup_reads"]:]
    assert len(reads) == len(samples), f"{len(reads)} READ logs for {len(samples)} requests"
    for s, r in zip(samples, reads, strict=True):
        assert r["bytes"] == shape.transfer_bytes(s["num_tokens"]), (r, s)
        s.update(r)
    rows = []
    for n in sorted({s["num_tokens"] for s in samples}):
        rt = [s for s in samples if s["num_tokens"] == n and s["path"] == "router"]
        dr = [s for s in samples if s["num_tokens"] == n and s["path"] == "direct"]
        med = lambda rows_, k: statistics.median(r[k] for r in rows_)  # noqa: E731
        row = {"num_tokens": n, "n": len(rt), "ttft_ms": med(rt, "ttft_ms"),
               "t2_ms": med(rt, "t2_ms"), "router_step_ms": med(rt, "step_ms"),
               "prefill_ms": med(dr, "prefill_ms"), "decode_first_ms": med(dr, "decode_first_ms"),
               "step_ms": med(dr, "step_ms"), "read_ms": med(dr + rt, "read_ms"),
               "descriptors": med(dr + rt, "descriptors"),
               "descriptors_max": max(r["descriptors"] for r in dr + rt)}
        row["handoff_ms"] = row["decode_first_ms"] - row["step_ms"]
        row["other_ms"] = row["handoff_ms"] - row["read_ms"]
        row["router_gap_ms"] = row["t2_ms"] - row["ttft_ms"]
        row["handoff_per_step"] = row["handoff_ms"] / row["step_ms"]
        row["handoff_share_of_t2"] = row["handoff_ms"] / row["t2_ms"]
        rows.append(row)
    return rows


def format_handoff_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| tokens | TTFT (router) | 2nd token (router) | gap 1st->2nd | Prefill RPC | Decode -> "
            "1st chunk | decode step | hand-off = Decode 1st - step | of which READ | descs "
            "(max) | other | hand-off / step | hand-off / 2nd token |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["num_tokens"]), f"{r['ttft_ms']:.0f}", f"{r['t2_ms']:.0f}",
            f"{r['router_gap_ms']:.0f}", f"{r['prefill_ms']:.0f}", f"{r['decode_first_ms']:.1f}",
            f"{r['step_ms']:.1f}", f"{r['handoff_ms']:.1f}", f"{r['read_ms']:.2f}",
            f"{r['descriptors']:.0f} ({r['descriptors_max']})", f"{r['other_ms']:.1f}",
            f"{r['handoff_per_step']:.2f}", f"{r['handoff_share_of_t2']:.3f}"]) + " |")
    return "\n".join(lines)


def plot_bandwidth(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """GB/s vs prompt length: NIXL (solid), memcpy / same pieces / TCP (dashed, dotted),
    one panel per (dtype, KV layout, pattern)."""
    panels = sorted({(r["dtype"], r["kv_layout"], r["pattern"]) for r in rows})
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    series = [("nixl", "NIXL READ", "-o"), ("nixl_prepped", "NIXL prepped", "-^"),
              ("memcpy", "memcpy (1 piece)", "--s"), ("memcpy_layout", "memcpy (same pieces)", "--d"),
              ("torch_copy", "torch copy_", ":x"), ("tcp", "TCP loopback", ":v")]
    for i, (dtype, layout, pattern) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for transport in sorted({r["transport"] for r in rows}):
            sel = sorted((r for r in rows if (r["dtype"], r["kv_layout"], r["pattern"],
                                              r["transport"]) == (dtype, layout, pattern, transport)),
                         key=lambda r: r["num_tokens"])
            for key, label, style in series:
                pts = [(r["num_tokens"], r[f"{key}_gbps"]) for r in sel if f"{key}_gbps" in r]
                if not pts or (transport != "cma" and not key.startswith("nixl")):
                    continue
                name = label if transport == "cma" else f"{label} (UCX {transport})"
                ax.plot(*zip(*pts, strict=True), style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{dtype}, {layout}, {pattern} blocks", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
