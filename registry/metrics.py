"""Live SLO metrics published to etcd by each router, read by the planner and the CLI.

Key: ``{prefix}/metrics/slo/{router_id}/{scope}`` under the router's lease (a dead router's
metrics vanish with it), value ``SloWindow``. ``scope`` is ``"cluster"`` (every request the
router finished) or a role value (``"prefill"``, ``"decode"``, ``"colocated"``: the requests
whose prefill, resp. decode, ran in that pool).

Definitions (DistServe, section 2): TTFT = receipt at the router -> first token sent;
TPOT = (E2E - TTFT) / (output_tokens - 1); a request *attains* the SLO when TTFT <=
``slo_ttft_ms`` and TPOT <= ``slo_tpot_ms`` (single-token outputs: TTFT only);
goodput = attaining requests finished per second of the window.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from scission.registry.records import Record

SCOPE_CLUSTER = "cluster"


def slo_prefix(prefix: str) -> str:
    return f"{prefix}/metrics/slo/"


def slo_key(prefix: str, router_id: str, scope: str) -> str:
    return f"{slo_prefix(prefix)}{router_id}/{scope}"


@dataclass(frozen=True)
class SloWindow(Record):
    """Aggregates over the last ``window_s`` seconds of one router (one scope)."""

    KIND: typing.ClassVar[str] = "slo_window"
    router_id: str
    scope: str  # SCOPE_CLUSTER or a WorkerRole value
    window_s: float
    updated_at_s: float  # wall clock
    slo_ttft_ms: float
    slo_tpot_ms: float
    num_arrivals: int  # requests received in the window
    num_finished: int  # finished (any status) in the window
    num_failed: int  # finished with an error status
    arrival_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    queue_p90_ms: float  # receipt -> placed on a worker
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    itl_p90_ms: float
    e2e_p90_ms: float
    ttft_attainment: float  # fraction of finished requests with TTFT <= SLO (0..1)
    tpot_attainment: float
    attainment: float  # both
    goodput_rps: float
    # The load's shape from arrivals (and the latest finishes) over the last ``shape_window_s``
    # (shorter than ``window_s``: what the planner sizes for). 0 = not recorded.
    shape_window_s: float = 0.0
    num_recent_arrivals: int = 0
    recent_arrival_rps: float = 0.0
    arrival_mean_prompt_tokens: float = 0.0  # of the recent arrivals whose length is known
    arrival_rms_prompt_tokens: float = 0.0  # sqrt(mean(prompt_tokens²)) of the same
    arrival_mean_max_tokens: float = 0.0  # of those that requested max_tokens
    num_recent_finished: int = 0  # ok, finished in the shape window (decode here)
    recent_mean_output_tokens: float = 0.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or min(self.num_arrivals, self.num_finished, self.num_failed) < 0:
            raise ValueError(f"window_s > 0 and counts >= 0 required: {self}")
