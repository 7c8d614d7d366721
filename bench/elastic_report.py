"""The pure parts of ``elastic.py``: phase schedule, scores, result document, table, plot.

Schedule: a piecewise Poisson process over phases of prefill-heavy or decode-heavy requests.
A request counts in the phase its send was *scheduled* in (``RequestRecord.scheduled_s``) and
meets the SLO as ``metrics.meets_slo`` says (failed requests miss). Per window (a phase, or
``"all"``): goodput = requests meeting the SLO / window duration (req/s); attainment = their
fraction of the window's requests; TTFT/TPOT p90 over its succeeded requests. A *change* is an
applied planner decision; an *oscillation* reverses one made at most ``oscillation_window_s``
before (``sim_report.reversals``). Ratios: goodput over the best single static contender's (by
goodput over the run), per window; per-window best static in hindsight (``sim_report``).
The document keeps each contender's raw data, so ``analyze`` recomputes every score from it.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scission.bench.metrics import RequestRecord, SloConfig, latency_stats, meets_slo
from scission.bench.prompts import PromptBuilder
from scission.bench.side_by_side_report import _jsonable
from scission.bench.sim_cluster import Decision
from scission.bench.sim_report import hindsight, reversals
from scission.bench.sim_workload import Phase
from scission.bench.workload import LengthConfig, LengthDist, Workload, WorkloadRequest

logger = logging.getLogger(__name__)

ALL = "all"


# -- the phase schedule ---------------------------------------------------------------------


class PhaseKind(enum.Enum):
    PREFILL_HEAVY = "prefill"  # long prompts, short outputs
    DECODE_HEAVY = "decode"  # short prompts, long outputs


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: its request shape, Poisson rate (0 = no requests) and length."""

    kind: PhaseKind
    rate_rps: float
    duration_s: float

    def __post_init__(self) -> None:
        if self.rate_rps < 0 or self.duration_s <= 0:
            raise ValueError(f"need rate >= 0 and duration > 0: {self}")

    @classmethod
    def parse(cls, text: str) -> PhaseSpec:
        """``kind:rate_rps:duration_s``, e.g. ``prefill:0.4:120`` (kind also ``P``/``D``)."""
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"phase {text!r} is not kind:rate:duration")
        kind = {"p": "prefill", "d": "decode"}.get(parts[0].lower(), parts[0].lower())
        return cls(PhaseKind(kind), float(parts[1]), float(parts[2]))

    @property
    def label(self) -> str:
        return f"{self.kind.value} {self.rate_rps:g} rps"


@dataclass(frozen=True)
class PhaseShapes:
    """Prompt and output lengths of each phase kind."""

    prefill_prompt: LengthConfig = LengthConfig(896, LengthDist.UNIFORM, 128)  # 768-1024
    prefill_output: LengthConfig = LengthConfig(8, LengthDist.UNIFORM, 2)  # 6-10
    decode_prompt: LengthConfig = LengthConfig(48, LengthDist.UNIFORM, 16)  # 32-64
    decode_output: LengthConfig = LengthConfig(112, LengthDist.UNIFORM, 16)  # 96-128

    def lengths(self, kind: PhaseKind) -> tuple[LengthConfig, LengthConfig]:
        """(prompt, output) length distributions of ``kind``."""
        if kind is PhaseKind.PREFILL_HEAVY:
            return self.prefill_prompt, self.prefill_output
        return self.decode_prompt, self.decode_output


@dataclass(frozen=True, slots=True)
class PhaseRequest:
    arrival_s: float  # from the start of the first phase
    prompt_tokens: int
    output_tokens: int
    phase: int  # index into the phases


def phase_windows(phases: Sequence[PhaseSpec]) -> list[Phase]:
    """Consecutive ``[start_s, end_s)`` windows, named ``<index>:<kind> <rate> rps``."""
    out, start = [], 0.0
    for k, p in enumerate(phases):
        out.append(Phase(f"{k}:{p.label}", start, start + p.duration_s))
        start += p.duration_s
    return out


def phase_schedule(phases: Sequence[PhaseSpec], shapes: PhaseShapes,
                   seed: int = 0) -> tuple[list[PhaseRequest], list[Phase]]:
    """A piecewise Poisson process: in phase k, exponential gaps of mean ``1 / rate_k`` from the
    phase's start, arrivals before its end; lengths drawn from the phase kind's shapes. The first
    arrival of the whole schedule is moved to 0 (the run starts with a request, as
    ``arrivals.poisson_arrivals``; trace replay sends relative to the first arrival).
    Reproducible per ``seed``."""
    rng = np.random.default_rng(seed)
    windows = phase_windows(phases)
    out: list[PhaseRequest] = []
    for k, (spec, window) in enumerate(zip(phases, windows, strict=True)):
        times: list[float] = []
        t = window.start_s
        while spec.rate_rps > 0:
            t += float(rng.exponential(1.0 / spec.rate_rps))
            if t >= window.end_s:
                break
            times.append(t)
        prompt_len, output_len = shapes.lengths(spec.kind)
        prompts, outputs = prompt_len.sample(len(times), rng), output_len.sample(len(times), rng)
        out += [PhaseRequest(t, p, o, k) for t, p, o in zip(times, prompts, outputs, strict=True)]
    if out:
        first = out[0]
        out[0] = PhaseRequest(0.0, first.prompt_tokens, first.output_tokens, first.phase)
    return out, windows


def build_phase_workload(schedule: Sequence[PhaseRequest], builder: PromptBuilder) -> Workload:
    """Real-text prompts of the scheduled lengths; request ids ``el<phase>-<index>``."""
    requests = tuple(
        WorkloadRequest(f"el{r.phase}-{i}", tuple(builder.prompt(r.prompt_tokens, i)),
                        r.output_tokens, r.arrival_s)
        for i, r in enumerate(schedule))
    return Workload(name="elastic", requests=requests)


# -- scores ---------------------------------------------------------------------------------


def score_window(records: Sequence[RequestRecord], start_s: float, end_s: float,
                 slo: SloConfig) -> dict:
    """Requests scheduled in ``[start_s, end_s)``: counts, attainment, goodput, p90s."""
    rs = [r for r in records if r.scheduled_s is not None and start_s <= r.scheduled_s < end_s]
    ok = [r for r in rs if r.succeeded]
    met = sum(meets_slo(r, slo) for r in rs)
    ttft = latency_stats([r.ttft_ms for r in ok if r.ttft_ms is not None])
    tpot = latency_stats([r.tpot_ms for r in ok if r.tpot_ms is not None])
    return {"num_requests": len(rs), "num_met": met, "num_failed": len(rs) - len(ok),
            "attainment": met / len(rs) if rs else None,
            "goodput_rps": met / (end_s - start_s), "ttft_p90_ms": ttft.p90,
            "tpot_p90_ms": tpot.p90}


def decision_objects(decisions: Sequence[Mapping]) -> list[Decision]:
    """Applied planner decisions (``PlannerDecision`` dicts with ``t_s``) in time order."""
    applied = sorted((d for d in decisions if d["applied"]), key=lambda d: d["t_s"])
    return [Decision(d["t_s"], d["action"], d["loop"],
                     {"prefill": d["prefill"], "decode": d["decode"]}, d["reason"],
                     d.get("flip_worker_id") or None) for d in applied]


def score_contender(records: Sequence[RequestRecord], decisions: Sequence[Mapping],
                    initial: Mapping[str, int], phases: Sequence[Phase], slo: SloConfig,
                    oscillation_window_s: float) -> dict[str, dict]:
    """Per phase name and ``"all"``: ``score_window`` + ``num_changes``/``num_oscillations``."""
    changes = decision_objects(decisions)
    osc = {changes[j].at_s for j in reversals(changes, initial, oscillation_window_s)}
    windows = [(p.name, p.start_s, p.end_s) for p in phases]
    windows.append((ALL, phases[0].start_s, phases[-1].end_s))
    out = {}
    for name, start, end in windows:
        # The last window also holds what happened after the last phase (requests finishing).
        last = end == phases[-1].end_s
        row = score_window(records, start, end, slo)
        row["num_changes"] = sum(start <= c.at_s and (c.at_s < end or last) for c in changes)
        row["num_oscillations"] = sum(start <= t and (t < end or last) for t in osc)
        out[name] = row
    return out


def latency_bins(records: Sequence[RequestRecord], end_s: float, bin_s: float,
                 slo: SloConfig) -> list[dict]:
    """``score_window`` of consecutive ``bin_s`` windows from 0 to ``end_s``, with ``t_s``."""
    bins, start = [], 0.0
    while start < end_s:
        row = score_window(records, start, min(start + bin_s, end_s), slo)
        bins.append({"t_s": start, **row})
        start += bin_s
    return bins


# -- the result document --------------------------------------------------------------------


def contender_entry(label: str, spec: Mapping, records: Sequence[RequestRecord],
                    num_not_sent: int, timeline: list[dict], decisions: list[dict],
                    wall_t0_s: float) -> dict:
    """One contender's raw data as stored in the document."""
    return {"label": label, "spec": dict(spec), "wall_t0_s": wall_t0_s,
            "num_not_sent": num_not_sent, "records": [r.to_dict() for r in records],
            "timeline": timeline, "decisions": decisions}


def analyze(doc: dict, bin_s: float = 10.0, oscillation_window_s: float = 60.0) -> dict:
    """Fill in ``scores``/``bins`` of each contender and the ``comparison`` (in place)."""
    slo = SloConfig(**doc["config"]["slo"])
    phases = [Phase(**p) for p in doc["phases"]]
    for entry in doc["contenders"].values():
        records = [RequestRecord.from_dict(r) for r in entry["records"]]
        spec = entry["spec"]
        initial = {"prefill": spec["prefill"], "decode": spec["decode"]}
        entry["scores"] = score_contender(records, entry["decisions"], initial, phases, slo,
                                          oscillation_window_s)
        entry["bins"] = latency_bins(records, phases[-1].end_s, bin_s, slo)
        load = [(row["t_s"], row["loadavg_1m"]) for row in entry["timeline"] if "loadavg_1m" in row]
        for p in [*phases, Phase(ALL, 0.0, phases[-1].end_s)]:  # machine load, shared cores
            values = [v for t, v in load if p.start_s <= t < p.end_s]
            entry["scores"][p.name]["loadavg_mean"] = float(np.mean(values)) if values else None
    statics = [k for k, e in doc["contenders"].items() if not e["spec"]["planner"]]
    doc["comparison"] = compare({k: e["scores"] for k, e in doc["contenders"].items()},
                                statics, [p.name for p in phases])
    return doc


def compare(scores: Mapping[str, Mapping[str, dict]], statics: Sequence[str],
            phase_names: Sequence[str]) -> dict:
    """Best single static contender over the run, every contender's goodput ratio to it per
    window, and the per-window best static in hindsight. Empty without a static contender."""
    if not statics:
        return {}
    windows = [*phase_names, ALL]
    best = max(statics, key=lambda c: scores[c][ALL]["goodput_rps"])
    base = {w: scores[best][w]["goodput_rps"] for w in windows}
    ratios = {c: {w: s[w]["goodput_rps"] / base[w] if base[w] > 0 else None for w in windows}
              for c, s in scores.items()}
    return {"best_static": best, "best_static_goodput_rps": scores[best][ALL]["goodput_rps"],
            "vs_best_static": ratios, "hindsight": hindsight(scores, statics, windows)}


def merge_documents(old: dict, new: dict) -> dict:
    """``new`` plus the contenders of ``old`` it does not have; raises ValueError unless both
    ran the same workload (phases, shapes, SLOs, seed)."""
    for key in ("phases", "shapes", "slo", "seed", "max_workers"):
        if old["config"].get(key) != new["config"].get(key):
            raise ValueError(f"cannot merge: {key} differs ({old['config'].get(key)} vs "
                             f"{new['config'].get(key)})")
    merged = dict(new)
    merged["contenders"] = {**old["contenders"], **new["contenders"]}
    merged["runs"] = [*old.get("runs", []), *new.get("runs", [])]
    return merged


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(doc)) + "\n")
    logger.info("wrote %s", path)
    return path


def new_document(header: dict, config: dict, phases: Sequence[Phase]) -> dict:
    return {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), **header,
            "config": config, "phases": [{"name": p.name, "start_s": p.start_s,
                                          "end_s": p.end_s} for p in phases],
            "contenders": {}}


# -- table ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(doc: dict) -> str:
    """Markdown: per window and contender the scores and the ratio to the best static."""
    comp = doc.get("comparison", {})
    ratios = comp.get("vs_best_static", {})
    lines = ["| window | contender | requests | failed | attainment | goodput req/s | "
             "vs best static | TTFT p90 ms | TPOT p90 ms | changes | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    windows = [p["name"] for p in doc["phases"]] + [ALL]
    for w in windows:
        for label, entry in doc["contenders"].items():
            s = entry["scores"][w]
            lines.append(
                f"| {w} | {label} | {s['num_requests']} | {s['num_failed']} | "
                f"{_f(s['attainment'], 2)} | {s['goodput_rps']:.3f} | "
                f"{_f(ratios.get(label, {}).get(w), 2)} | {_f(s['ttft_p90_ms'])} | "
                f"{_f(s['tpot_p90_ms'])} | {s['num_changes']} | "
                f"{_f(s.get('loadavg_mean'), 1)} |")
    slo = doc["config"]["slo"]
    lines.append(f"\nSLO: TTFT <= {slo['ttft_slo_ms']:g} ms and TPOT <= {slo['tpot_slo_ms']:g} ms")
    if comp:
        lines.append(f"best single static over the run: {comp['best_static']} "
                     f"({comp['best_static_goodput_rps']:.3f} req/s)")
        for label in doc["contenders"]:
            lines.append(f"{label} / {comp['best_static']} goodput over the run: "
                         f"{_f(ratios[label][ALL], 2)}x")
    lines.append("load: mean 1-min load average of the machine (2 cores, shared) in the window")
    for label, entry in doc["contenders"].items():
        if entry["num_not_sent"]:
            lines.append(f"{label}: {entry['num_not_sent']} requests not sent")
    return "\n".join(lines)


def format_decisions(doc: dict) -> str:
    """One line per planner decision: time on the schedule's clock, action, targets, reason."""
    lines = []
    for label, entry in doc["contenders"].items():
        for d in entry["decisions"]:
            lines.append(f"{label} t={d['t_s']:.0f}s {d['action']} -> {d['prefill']}P:"
                         f"{d['decode']}D{'' if d['applied'] else ' (not applied)'}: "
                         f"{d['reason']}")
    return "\n".join(lines)


# -- timeline plot --------------------------------------------------------------------------


def plot_timeline(doc: dict, path: Path) -> Path:
    """Pool sizes of the planner runs (serving solid, targets dashed) with the machine's load
    average; TTFT p90, TPOT p90 and attainment per bin of every contender against the SLOs;
    phases shaded and named; applied decisions as dotted lines."""
    fig = Figure(figsize=(13, 12), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True, height_ratios=(1.1, 1, 1, 0.7))
    for i, p in enumerate(doc["phases"]):
        for ax in axes:
            ax.axvspan(p["start_s"], p["end_s"], color="0.92" if i % 2 == 0 else "white",
                       zorder=0)
        axes[0].text((p["start_s"] + p["end_s"]) / 2, 1.02, p["name"], ha="center",
                     fontsize=9, transform=axes[0].get_xaxis_transform())
    for entry in doc["contenders"].values():
        if entry["spec"]["planner"]:
            _plot_pools(axes[0], entry)
    slo = doc["config"]["slo"]
    for k, (label, entry) in enumerate(doc["contenders"].items()):
        t = [b["t_s"] + 5.0 for b in entry["bins"]]
        style = {"marker": ".", "label": label, "color": f"C{k}",
                 "linewidth": 2.4 if entry["spec"]["planner"] else 1.2}
        for ax, key, scale in ((axes[1], "ttft_p90_ms", 1e-3), (axes[2], "tpot_p90_ms", 1.0),
                               (axes[3], "attainment", 1.0)):
            ax.plot(t, [np.nan if b[key] is None else b[key] * scale for b in entry["bins"]],
                    **style)
        for b in entry["bins"]:  # failed requests per bin, in the contender's colour
            if b["num_failed"]:
                axes[3].annotate(f"{b['num_failed']}x", (b["t_s"] + 5.0, 0.12 + 0.2 * k),
                                 color=f"C{k}", fontsize=8, ha="center", weight="bold")
    axes[1].axhline(slo["ttft_slo_ms"] / 1e3, color="red", linestyle="--", label="SLO")
    axes[2].axhline(slo["tpot_slo_ms"], color="red", linestyle="--", label="SLO")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    for ax, ylabel in zip(axes, ("workers", "TTFT p90 (s, log) per 10 s bin",
                                 "TPOT p90 (ms, log) per 10 s bin",
                                 "SLO attainment per bin\n(Nx: N failed)"),
                          strict=True):
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left", ncol=5)
    axes[3].set_ylim(-0.05, 1.05)
    axes[3].set_xlabel("seconds since the first request (requests binned by scheduled send "
                       "time); dotted: applied planner decisions")
    fig.suptitle(f"Elastic pools, {doc['config']['max_workers']} workers: "
                 f"{', '.join(doc['contenders'])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    logger.info("wrote %s", path)
    return path


def _plot_pools(ax, entry: Mapping) -> None:
    tl, changes = entry["timeline"], decision_objects(entry["decisions"])
    t = [row["t_s"] for row in tl]
    for role, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
        ax.step(t, [row[f"{role}_serving"] for row in tl], where="post", color=color,
                linewidth=2, label=f"{entry['label']}: {role} serving")
        ax.step(t, [row[f"{role}_target"] for row in tl], where="post", color=color,
                linestyle="--", label=f"{role} target")
    ax.step(t, [row["changing"] for row in tl], where="post", color="0.3", linewidth=0.8,
            label="starting/draining/flipping")
    ax.set_ylim(-0.1, 5.2)
    for d in changes:
        ax.annotate(f"{d.action} -> {d.targets['prefill']}P:{d.targets['decode']}D",
                    (d.at_s, 4.1), fontsize=7, color="purple", rotation=90, va="top", ha="right")
        for other in ax.figure.axes:
            other.axvline(d.at_s, color="purple", linestyle=":", linewidth=1.2)
    load = ax.twinx()
    load.plot(t, [row.get("loadavg_1m", np.nan) for row in tl], color="0.6", linewidth=0.8)
    load.set_ylabel("load average of this run, 1 min (grey)", color="0.4")
    load.set_ylim(0, max(6.0, max((row.get("loadavg_1m", 0) for row in tl), default=0) + 1))
