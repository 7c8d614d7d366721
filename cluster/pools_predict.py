"""What ``scission pools scale --dry-run`` predicts: TTFT p90 and TPOT of a disaggregated
cluster of ``prefill`` x ``decode`` workers under the measured load, from the planner's
``PerformanceModel`` (pure; no I/O).

Prefill: each worker gets ``rps / prefill`` and is the M/D/1 queue of
``PerformanceModel.max_prefill_rps_per_worker``: service ``D = step_ms(prompt)``, utilization
``rho = rps_per_worker * D``, mean wait ``W = rho * D / (2 (1 - rho))``, and
``TTFT p90 = D + ln(10) * W`` (so at the model's max rate the prediction is the SLO).

Decode: each worker gets ``rps / decode`` requests/s that stay ``output`` steps each; Little's
law gives the batch ``n = rate * output * step_s(n)`` with ``step_ms(n) = a + per_row * n``
(``per_row = b + c * ctx``, ``ctx = prompt + output / 2``), hence
``n = rate * output * a / (1000 - rate * output * per_row)`` and ``TPOT = a + per_row * n``.
A pool at or past saturation (``rho >= 1`` / the denominator <= 0) is reported as overloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scission.cluster.planner.perf_model import P90_TAIL_FACTOR, PerformanceModel


@dataclass(frozen=True)
class Prediction:
    prefill: int
    decode: int
    arrival_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    ttft_p90_ms: float | None  # None = the prefill pool is overloaded (or empty)
    prefill_utilization: float  # rho of one prefill worker
    tpot_ms: float | None  # None = the decode pool is overloaded (or empty)
    decode_batch: float  # mean decode rows per worker step
    prefill_capacity_rps: float | None  # the pool's max rate within the SLO (None = no SLO)
    decode_capacity_rps: float | None


def predict_ttft_p90_ms(model: PerformanceModel, rps_per_worker: float,
                        mean_prompt_tokens: float) -> tuple[float | None, float]:
    """(TTFT p90 in ms or None when overloaded, utilization) of one prefill worker."""
    d_ms = model.prefill.step_ms(max(mean_prompt_tokens, 1.0))
    rho = rps_per_worker * d_ms / 1000.0
    if rho >= 1.0:
        return None, rho
    wait_ms = rho * d_ms / (2.0 * (1.0 - rho))
    return d_ms + P90_TAIL_FACTOR * wait_ms, rho


def predict_tpot_ms(model: PerformanceModel, rps_per_worker: float, mean_prompt_tokens: float,
                    mean_output_tokens: float) -> tuple[float | None, float]:
    """(TPOT in ms or None when overloaded, mean batch) of one decode worker."""
    out = max(mean_output_tokens, 1.0)
    ctx = mean_prompt_tokens + out / 2.0
    per_row_ms = model.decode.b_ms_per_request + model.decode.c_ms_per_context_token * ctx
    in_flight_per_ms = rps_per_worker * out / 1000.0  # requests per ms of step time
    denominator = 1.0 - in_flight_per_ms * per_row_ms
    if denominator <= 0.0:
        return None, math.inf
    batch = in_flight_per_ms * model.decode.a_ms / denominator
    return model.decode.a_ms + per_row_ms * batch, batch


def predict(model: PerformanceModel, prefill: int, decode: int, arrival_rps: float,
            mean_prompt_tokens: float, mean_output_tokens: float,
            slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> Prediction:
    ttft, rho = (None, math.inf) if prefill == 0 else predict_ttft_p90_ms(
        model, arrival_rps / prefill, mean_prompt_tokens)
    tpot, batch = (None, math.inf) if decode == 0 else predict_tpot_ms(
        model, arrival_rps / decode, mean_prompt_tokens, mean_output_tokens)
    prefill_cap = None if slo_ttft_ms is None else prefill * model.max_prefill_rps_per_worker(
        mean_prompt_tokens, slo_ttft_ms)
    decode_cap = None if slo_tpot_ms is None else decode * model.max_decode_rps_per_worker(
        mean_prompt_tokens, mean_output_tokens, slo_tpot_ms)
    return Prediction(prefill=prefill, decode=decode, arrival_rps=arrival_rps,
                      mean_prompt_tokens=mean_prompt_tokens,
                      mean_output_tokens=mean_output_tokens, ttft_p90_ms=ttft,
                      prefill_utilization=rho, tpot_ms=tpot, decode_batch=batch,
                      prefill_capacity_rps=prefill_cap, decode_capacity_rps=decode_cap)


def prediction_text(p: Prediction) -> str:
    """One line: ``prefill=2 decode=1: TTFT p90 812 ms, TPOT 41 ms  (within SLO up to ...)``."""
    ttft = "overloaded" if p.ttft_p90_ms is None else f"{p.ttft_p90_ms:.0f} ms"
    tpot = "overloaded" if p.tpot_ms is None else f"{p.tpot_ms:.0f} ms"
    caps = ""
    if p.prefill_capacity_rps is not None and p.decode_capacity_rps is not None:
        caps = (f"  (within SLO up to {p.prefill_capacity_rps:.2f} / "
                f"{p.decode_capacity_rps:.2f} req/s prefill / decode)")
    return f"prefill={p.prefill} decode={p.decode}: TTFT p90 {ttft}, TPOT {tpot}{caps}"
