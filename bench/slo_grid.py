"""Goodput of each deployment under a grid of SLOs, from a saved side-by-side result.

``python -m scission.bench.slo_grid bench/results/side_by_side.json --ttft-slo-ms 8000,15000
--tpot-slo-ms 60,80,100`` re-scores the per-request records of every run (same requests, no
new measurement) with each (TTFT, TPOT) objective pair, and prints per deployment the SLO
attainment at each rate and the goodput (highest rate with attainment ≥ the target, as in
``metrics.sweep_goodput``). Useful because which deployment wins depends on the objective:
disaggregation protects TPOT from prefill interference and pays in TTFT (DistServe, §2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scission.bench.cli_main import bench_main
from scission.bench.metrics import RequestRecord, SloConfig, meets_slo, sweep_goodput

_RECORD_FIELDS = set(RequestRecord.__dataclass_fields__)


def load_records(doc: dict) -> dict[str, dict[float, list[RequestRecord]]]:
    """deployment -> offered rate -> records, from a ``side_by_side.json`` document."""
    out: dict[str, dict[float, list[RequestRecord]]] = {}
    for name, dep in doc["deployments"].items():
        out[name] = {}
        for run in dep["runs"]:
            records = []
            for r in run["records"]:
                fields = {k: v for k, v in r.items() if k in _RECORD_FIELDS}
                fields["chunk_times_s"] = tuple(fields.get("chunk_times_s", ()))
                fields["chunk_tokens"] = tuple(fields.get("chunk_tokens", ()))
                records.append(RequestRecord(**fields))
            out[name][float(run["offered_rate_rps"])] = records
    return out


def score(records: dict[str, dict[float, list[RequestRecord]]], slos: list[SloConfig],
          target: float) -> list[dict[str, object]]:
    """One row per (SLO, deployment): attainment per rate and goodput."""
    rows = []
    for slo in slos:
        for name, by_rate in records.items():
            attain = {rate: sum(meets_slo(r, slo) for r in recs) / len(recs) if recs else 0.0
                      for rate, recs in by_rate.items()}
            goodput = sweep_goodput(attain.__getitem__, list(attain), target).goodput_rps
            rows.append({"ttft_slo_ms": slo.ttft_slo_ms, "tpot_slo_ms": slo.tpot_slo_ms,
                         "deployment": name, "attainment": attain, "goodput_rps": goodput})
    return rows


def format_rows(rows: list[dict[str, object]]) -> str:
    rates = sorted({rate for row in rows for rate in row["attainment"]})
    head = ["TTFT SLO ms", "TPOT SLO ms", "deployment", *[f"@{r:g} rps" for r in rates],
            "goodput rps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['ttft_slo_ms']:,.0f}", f"{row['tpot_slo_ms']:,.0f}", row["deployment"],
                 *[f"{row['attainment'].get(r, 0.0):.2f}" for r in rates],
                 "-" if row["goodput_rps"] is None else f"{row['goodput_rps']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", type=Path, help="a side_by_side.json written by the side-by-side run")
    p.add_argument("--ttft-slo-ms", type=_floats, default=[8000.0], help="comma list")
    p.add_argument("--tpot-slo-ms", type=_floats, default=[100.0], help="comma list")
    p.add_argument("--attainment-target", type=float, default=0.9)


def _run(args: argparse.Namespace) -> int:
    records = load_records(json.loads(args.result.read_text()))
    slos = [SloConfig(t, p) for t in args.ttft_slo_ms for p in args.tpot_slo_ms]
    print(format_rows(score(records, slos, args.attainment_target)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m scission.bench.slo_grid", __doc__.split("\n\n")[0],
                      _add_arguments, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
